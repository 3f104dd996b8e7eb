//! `staunch vmm run` end to end with the test guest under real KVM.

mod common;
use common::*;
use staunch_testguest::proto::{self, BLOCK_SIZE};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn counter(vcpus: u8) -> Run {
    require_kvm();
    let d = tmpdir(&format!("counter{vcpus}"));
    let g = guest(&d);
    let r = run(
        staunch()
            .args(["vmm", "run", "--vcpus", &vcpus.to_string(), "--kernel"])
            .arg(&g)
            .args(["--cmdline", "staunch.work=counter staunch.reports=6 staunch.chunk=1M"]),
        None,
        T,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stderr.contains("guest powered off with exit code 0"), "{}", r.stderr);
    let ticks = r.report_with("counter=");
    assert_eq!(ticks.len(), 6, "{}", r.stdout);
    let values: Vec<u64> = ticks.iter().map(|l| field(l, "counter")).collect();
    assert!(values.windows(2).all(|w| w[1] == w[0] + (1 << 20)), "counter not monotonic: {values:?}");
    assert!(r.report_with("done code=0").len() == 1);
    r
}

#[test]
fn kvm_counter_one_vcpu() {
    let r = counter(1);
    assert!(r.report_with("counter=").iter().all(|l| field(l, "cpus") == 1));
}

#[test]
fn kvm_counter_two_vcpus_both_run() {
    let r = counter(2);
    // The AP runs: after the first tick, some tick saw its counter move as
    // well as the boot CPU's. (Any one tick may miss it when its thread was
    // not scheduled during that tick; how often is the scheduler's business,
    // not this test's.)
    let ticks = r.report_with("counter=");
    assert!(ticks[1..].iter().any(|l| field(l, "cpus") == 2), "{ticks:?}");
    assert!(ticks.iter().all(|l| field(l, "cpus") <= 2), "{ticks:?}");
}

#[test]
fn kvm_blk_verify_and_host_check() {
    require_kvm();
    let d = tmpdir("blk");
    let g = guest(&d);
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let (writes, blocks) = (300u64, 64u64);
    let r =
        run(
            staunch().args(["vmm", "run", "--kernel"]).arg(&g).arg("--disk").arg(&disk).args([
                "--cmdline",
                &format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={blocks}"),
            ]),
            None,
            T,
        );
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    let fin = r.report_with("blk written=");
    let last = fin.last().expect("blk report");
    assert!(last.contains("final=1"), "{last}");
    assert_eq!(field(last, "written"), writes);
    assert_eq!(field(last, "verified"), writes);
    assert_eq!(field(last, "mismatches"), 0);
    assert_eq!(r.report_with("blk id=\"disk.img\"").len(), 1, "{}", r.stdout);
    // The host sees exactly the last write of every block, intact.
    let bytes = std::fs::read(&disk).unwrap();
    for lba in 0..blocks {
        let mut b = [0u8; BLOCK_SIZE];
        let off = (lba as usize) * BLOCK_SIZE;
        b.copy_from_slice(&bytes[off..off + BLOCK_SIZE]);
        let seq = proto::check_block(&b, lba).unwrap_or_else(|e| panic!("block {lba}: {e:?}"));
        let expect = (0..writes).filter(|s| proto::lba_for(*s, blocks) == lba).max().unwrap();
        assert_eq!(seq, expect, "block {lba}");
    }
    assert!(bytes[(blocks as usize) * BLOCK_SIZE..].iter().all(|b| *b == 0), "wrote past the region");
}

#[test]
fn kvm_blk_read_only_refuses_writes() {
    require_kvm();
    let d = tmpdir("ro");
    let g = guest(&d);
    let disk = d.join("ro.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let r = run(
        staunch()
            .args(["vmm", "run", "--kernel"])
            .arg(&g)
            .arg("--disk")
            .arg(format!("{},ro", disk.display()))
            .args(["--cmdline", "staunch.work=blk-verify"]),
        None,
        T,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.report_with("blk capacity=2048 ro=1").len(), 1, "{}", r.stdout);
    assert_eq!(r.report_with("blk ro-write status=1").len(), 1, "{}", r.stdout);
    assert_eq!(r.report_with("done code=0").len(), 1);
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn kvm_config_file_and_serial_file() {
    require_kvm();
    let d = tmpdir("cfg");
    let g = guest(&d);
    let disk = d.join("c.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = d.join("serial.log");
    let cfg = d.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "kernel = {:?}\ncmdline = \"staunch.work=blk-verify staunch.writes=32 staunch.blocks=8\"\nmem_mib = 64\nvcpus = 2\nserial = {{ file = {:?} }}\n[[disks]]\npath = {:?}\n",
            g.display().to_string(),
            out.display().to_string(),
            disk.display().to_string()
        ),
    )
    .unwrap();
    let r = run(staunch().args(["vmm", "run", "--config"]).arg(&cfg), None, T);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "serial went to a file, not stdout: {}", r.stdout);
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(log.contains("STAUNCH blk written=32 verified=32 mismatches=0 errors=0 final=1"), "{log}");
}

#[test]
fn kvm_serial_input_reaches_guest() {
    require_kvm();
    let d = tmpdir("echo");
    let g = guest(&d);
    let r = run(
        staunch().args(["vmm", "run", "--kernel"]).arg(&g).args(["--cmdline", "staunch.work=echo"]),
        Some(b"hello staunch\nquit\n"),
        T,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.report_with("echo hello staunch").len(), 1, "{}", r.stdout);
    assert_eq!(r.report_with("done code=0").len(), 1, "{}", r.stdout);
}

#[test]
fn kvm_guest_bad_config_reported() {
    require_kvm();
    let d = tmpdir("badcfg");
    let g = guest(&d);
    let r =
        run(staunch().args(["vmm", "run", "--kernel"]).arg(&g).args(["--cmdline", "staunch.work=nonsense"]), None, T);
    // The VMM did its job: the guest powered off and said why.
    assert_eq!(r.status, 0);
    assert!(r.stderr.contains("exit code 5"), "{}", r.stderr);
    assert_eq!(r.report_with("error config unknown workload").len(), 1, "{}", r.stdout);
}

#[test]
fn kvm_guest_reset_ends_the_vm_cleanly() {
    require_kvm();
    let d = tmpdir("reset");
    let g = guest(&d);
    let r = run(staunch().args(["vmm", "run", "--kernel"]).arg(&g).args(["--cmdline", "staunch.work=reset"]), None, T);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stderr.contains("guest requested a reset"), "{}", r.stderr);
    assert_eq!(r.report_with("resetting").len(), 1);
    assert!(r.report_with("done").is_empty(), "guest ran past its reset: {}", r.stdout);
}

#[test]
fn kvm_serial_over_unix_socket_survives_upgrade() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    require_kvm();
    let d = tmpdir("unix");
    let g = guest(&d);
    let (sock, api) = (d.join("console.sock"), d.join("api.sock"));
    let mut child = staunch()
        .args(["vmm", "run", "--kernel"])
        .arg(&g)
        .arg("--serial")
        .arg(format!("unix:{}", sock.display()))
        .arg("--api-socket")
        .arg(&api)
        .args(["--cmdline", "staunch.work=echo"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut s = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("console socket never appeared: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut expect = |s: &mut UnixStream, send: &str| {
        s.write_all(format!("{send}\n").as_bytes()).unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "console closed");
            if line.contains(&format!("STAUNCH echo {send}")) {
                break;
            }
        }
    };
    // Output before the client connected is dropped; input drives the echo.
    expect(&mut s, "ping over unix");
    // The same connection stays attached through a re-exec of the VMM.
    let up = run(staunch().arg("vm").arg("--socket").arg(&api).arg("upgrade"), None, Duration::from_secs(60));
    assert_eq!(up.status, 0, "{}", up.stderr);
    expect(&mut s, "still here after the upgrade");
    s.write_all(b"quit\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
}
