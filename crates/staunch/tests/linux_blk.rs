//! Real Linux over `staunch blk`: Debian's cloud kernel under QEMU (TCG, a
//! real vhost-user-blk frontend) boots the project's busybox initramfs
//! (scripts/initramfs.sh), whose `staunch-linux-blk` writes checksummed,
//! sequence-numbered blocks with O_DIRECT through the kernel's virtio-blk
//! driver, reads each back and verifies it. Meanwhile the serving backend
//! process is SIGKILLed three times (its spare takes over) and upgraded in
//! place once. Judged by the guest (every write verified, no error, no
//! mismatch), by the kernel (no block I/O error on the console) and by the
//! host's check of the disk.

mod common;
mod qemulinux;
use common::*;
use qemulinux::{assets, Assets, Qemu};
use std::path::Path;
use std::time::{Duration, Instant};

const WRITES: u64 = 40_000;
const BLOCKS: u64 = 256;
const QD: u64 = 4;
const REPORT: u64 = 500;

fn start(d: &Path, a: &Assets, sock: &Path) -> Qemu {
    let append = format!("staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.qd={QD} staunch.report={REPORT}");
    let chardev = format!("socket,id=c0,path={},reconnect-ms=10", sock.display());
    // Two vCPUs and two queues: the guest's writers spread over both.
    Qemu::start(d, a, 2, &append, &["-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"])
}

/// Two more reports from the guest: its I/O goes on.
fn progress(q: &mut Qemu, what: &str) {
    let n = q.log().matches("STAUNCH blk written=").count();
    q.wait_for(what, Duration::from_secs(60), |l| l.matches("STAUNCH blk written=").count() >= n + 2);
}

#[test]
fn linux_over_staunch_blk_survives_kills_and_an_upgrade() {
    let a = assets();
    let d = tmpdir("linux-blk");
    let t0 = Instant::now();
    // Run from a copy of the binary, so it can be upgraded in place.
    let mut b = Backend::new(&d);
    b.queues = 2;
    b.run_from_copy(&d);
    let _ = b.start(None);
    let mut q = start(&d, &a, &b.sock);
    q.wait_for("the guest's first report", Duration::from_secs(180), |l| l.contains("STAUNCH blk written="));
    let boot = t0.elapsed();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for fault in ["kill", "kill", "upgrade", "kill"] {
        // Spread over the run, in the middle of the guest's I/O.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 2000));
        match fault {
            "kill" => b.kill(),
            _ => b.upgrade(),
        }
        progress(&mut q, &format!("the guest's I/O after the backend {fault}"));
    }
    q.wait_for("the guest to finish", Duration::from_secs(180), |l| l.contains("STAUNCH done"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = q.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "QEMU did not power off:\n{}", q.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = q.log();
    let ev = b.events();
    let report: Vec<&str> = log.lines().filter(|l| l.contains("STAUNCH blk written=")).collect();
    let maxio = report.iter().map(|l| field(l, "maxio_us")).max().unwrap();
    eprintln!(
        "linux_blk: {:.1} s in all, first report after {:.1} s, {} reports, longest guest I/O {maxio} us",
        t0.elapsed().as_secs_f64(),
        boot.as_secs_f64(),
        report.len()
    );
    assert!(status.success(), "QEMU: {status}\n{log}");
    assert!(log.contains("STAUNCH done code=0"), "{log}");
    let last = report.iter().rfind(|l| l.contains("final=1")).expect("a final report");
    assert_eq!(field(last, "written"), WRITES, "{last}");
    assert_eq!(field(last, "verified"), WRITES, "{last}");
    assert_eq!(field(last, "mismatches"), 0, "{last}");
    assert_eq!(field(last, "errors"), 0, "{last}");
    // Discard and write-zeroes reached the device (the kernel saw them
    // offered) and left zeros.
    let trim = log.lines().find(|l| l.contains("STAUNCH blk trim")).expect("the trim line");
    assert!(field(trim, "discard_max_bytes") > 0, "{trim}");
    assert!(field(trim, "write_zeroes_max_bytes") > 0, "{trim}");
    assert_eq!(field(trim, "zeroed"), 1, "{trim}");
    assert_eq!(field(trim, "errors"), 0, "{trim}");
    for bad in ["I/O error", "blk_update_request", "Buffer I/O error", "STAUNCH blk error", "STAUNCH blk mismatch"] {
        assert!(!log.contains(bad), "the console has {bad:?}:\n{log}");
    }
    // QEMU took both queues (one inflight region covers them).
    assert!(ev.iter().any(|e| e["event"] == "inflight-region" && e["queues"] == 2), "{ev:?}");
    // Three kills and an upgrade: each spare kept QEMU's connection, and
    // the last one served QEMU's control messages at the guest's power-off
    // (the rings stopped there).
    let takeovers = ev.iter().filter(|e| e["event"] == "backend-takeover").count();
    assert_eq!(takeovers, 4, "{ev:?}");
    let kept = ev.iter().filter(|e| e["event"] == "backend-takeover" && e["connection"] == "kept").count();
    assert_eq!(kept, 4, "{ev:?}");
    let resumed = ev.iter().filter(|e| e["event"] == "connection-resumed").count();
    assert_eq!(resumed, 4, "{ev:?}");
    let upgrades = ev.iter().filter(|e| e["event"] == "backend-takeover" && e["upgraded"] == true).count();
    assert_eq!(upgrades, 1, "{ev:?}");
    check_disk(&b.disk, WRITES, BLOCKS);
    // And the host sees the trimmed blocks as zeros in the image.
    let img = std::fs::read(&b.disk).unwrap();
    let at = BLOCKS as usize * 4096;
    assert!(img[at..at + 32 * 4096].iter().all(|&x| x == 0), "the discarded/zeroed blocks hold data");
    // Passed: the directory (a disk and two copies of the binary) goes.
    drop((q, b));
    let _ = std::fs::remove_dir_all(&d);
}
