//! Warm upgrade: a standby successor builds its VM around the running guest's
//! memory and takes over, and the guest carries on: its counter never resets
//! or goes back, every block write it saw complete is on disk, each upgrade
//! is an event, and a failed upgrade leaves the guest running on the old VMM.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn kvm_warm_upgrade_keeps_counter_and_all_vcpus() {
    require_kvm();
    let d = tmpdir("upgrade-counter");
    let vm = Vm::start(&d, 2, None, "staunch.work=counter staunch.chunk=1M staunch.reports=400");
    for round in 1..=3u64 {
        let before = counters(&vm.log()).len();
        let r = vm.ctl(&["upgrade"]);
        assert_eq!(r.status, 0, "upgrade {round}: {}", r.stderr);
        let status: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(status["generation"], round, "{status}");
        assert_eq!(status["last_recovery"]["cause"], "upgrade");
        assert_eq!(status["last_recovery"]["mode"], "standby");
        // The VM runs in a successor; the process we started keeps it.
        assert_ne!(status["pid"].as_u64().unwrap(), vm.child.id() as u64);
        // Both vCPUs came through: after the upgrade a tick saw the AP's
        // counter move as well as the boot CPU's. (Any one tick may show
        // cpus=1 when the AP's thread was not scheduled during it; a lost AP
        // never shows cpus=2 again.)
        vm.wait_for("progress on both vCPUs after the upgrade", |l| {
            let ticks = complete_ticks(l);
            ticks.len() >= before + 3
                && ticks[before..].iter().any(|t| staunch_testguest::proto::field(t, "cpus") == Some("2"))
        });
    }
    let last_pid = status_of(&vm)["pid"].as_u64().unwrap();
    let events = vm.events();
    let resumed: Vec<_> = events.iter().filter(|e| e["event"] == "resumed").collect();
    assert_eq!(resumed.len(), 3, "{events:?}");
    // One event per upgrade, the generation one higher each time, every vCPU restored.
    for (i, e) in resumed.iter().enumerate() {
        assert_eq!(e["generation"], i as u64 + 1, "{e}");
        assert_eq!(e["cause"], "upgrade", "{e}");
        assert_eq!(e["vcpus"], 2, "{e}");
    }
    let r = vm.finish();
    // The keeper exits with the VM's status once the successor is done.
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(!std::path::Path::new(&format!("/proc/{last_pid}")).exists(), "the successor outlived its VM");
    let c = counters(&r.stdout);
    assert_eq!(c.len(), 400);
    assert!(c.windows(2).all(|w| w[1] == w[0] + (1 << 20)), "counter skipped or went back: {c:?}");
}

/// The counter ticks among the complete lines of `log`, in order (the
/// lines [`counters`] reads).
fn complete_ticks(log: &str) -> Vec<&str> {
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(str::trim_end).filter(|l| staunch_testguest::proto::field(l, "counter").is_some()).collect()
}

fn status_of(vm: &Vm) -> serde_json::Value {
    let r = vm.ctl(&["status"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    serde_json::from_str(r.stdout.trim()).unwrap()
}

#[test]
fn kvm_failed_upgrade_rolls_back_and_the_guest_runs_on() {
    require_kvm();
    let d = tmpdir("upgrade-rollback");
    let vm = Vm::start(&d, 1, None, "staunch.work=counter staunch.chunk=1M staunch.reports=300");
    // A successor that cannot start, and one that refuses a corrupted record
    // (after the guest was paused for it).
    let r = vm.ctl(&["upgrade", "--binary", "/nonexistent/staunch"]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("the VM continues") && r.stderr.contains("/nonexistent/staunch"), "{}", r.stderr);
    assert_eq!(vm.ctl(&["failpoint", "record.save=corrupt"]).status, 0);
    let r = vm.ctl(&["upgrade"]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("the VM continues") && r.stderr.contains("CRC"), "{}", r.stderr);
    let s = status_of(&vm);
    assert_eq!(s["generation"], 0, "{s}");
    assert_eq!(s["upgrade_failures"], 2, "{s}");
    assert_eq!(s["pid"].as_u64().unwrap(), vm.child.id() as u64);
    // The successor that refused the record is gone.
    let err = s["last_upgrade_error"].as_str().unwrap();
    let pid = err.rsplit("(successor ").next().unwrap().trim_end_matches(')');
    assert!(pid.parse::<u32>().is_ok(), "{err}");
    let t = std::time::Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the refused successor {pid} lives on: {stat}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = counters(&vm.log()).len();
    vm.wait_for("progress after the failed upgrades", |l| counters(l).len() >= before + 3);
    // And a good upgrade still works afterwards.
    let r = vm.ctl(&["upgrade"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let failed = vm.events().into_iter().filter(|e| e["event"] == "upgrade-failed").count();
    assert_eq!(failed, 2);
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    let c = counters(&r.stdout);
    assert_eq!(c.len(), 300);
    assert!(c.windows(2).all(|w| w[1] == w[0] + (1 << 20)), "counter skipped or went back: {c:?}");
}

#[test]
fn kvm_warm_upgrade_during_block_io_loses_nothing() {
    require_kvm();
    let d = tmpdir("upgrade-blk");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let (writes, blocks) = (30_000u64, 256u64);
    let vm = Vm::start(
        &d,
        1,
        Some(&disk),
        &format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={blocks} staunch.report=500"),
    );
    // The disk's descriptor is handed over, not its path: renaming the file
    // under the running VM changes nothing.
    let moved = d.join("moved.img");
    std::fs::rename(&disk, &moved).unwrap();
    for _ in 0..3 {
        let before = vm.log().matches("blk written=").count();
        assert_eq!(vm.ctl(&["upgrade"]).status, 0);
        vm.wait_for("I/O after the upgrade", |l| {
            l.matches("blk written=").count() > before + 1 || l.contains("final=1")
        });
    }
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    let last = r.stdout.lines().rfind(|l| l.contains("final=1")).expect("final report");
    assert_eq!(field(last, "verified"), writes, "{last}");
    assert_eq!(field(last, "mismatches"), 0);
    assert_eq!(field(last, "errors"), 0);
    check_disk(&moved, writes, blocks);
}

#[test]
fn kvm_control_socket_rejects_bad_requests() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm();
    let d = tmpdir("api-bad");
    let vm = Vm::start(&d, 1, None, "staunch.work=counter staunch.chunk=1M staunch.reports=100000");
    let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for bad in ["not json", r#"{"cmd":"explode"}"#, r#"{"cmd":"pause","extra":1}"#, "{}"] {
        writeln!(s, "{bad}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad} -> {line}");
        assert!(v["error"].as_str().unwrap().contains("bad request"), "{line}");
    }
    // The same connection still works, and so does the VM.
    writeln!(s, r#"{{"cmd":"status"}}"#).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    let paused = vm.ctl(&["pause"]);
    assert_eq!(paused.status, 0);
    let st = vm.ctl(&["status"]);
    assert!(st.stdout.contains("Paused"), "{}", st.stdout);
    assert_eq!(vm.ctl(&["resume"]).status, 0);
    drop(vm);
}

#[test]
fn kvm_snapshot_restore_and_cold_reboot() {
    require_kvm();
    let d = tmpdir("snapshot");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let (writes, blocks) = (20_000u64, 256u64);
    let vm = Vm::start(
        &d,
        2,
        Some(&disk),
        &format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={blocks} staunch.report=500"),
    );
    vm.wait_for("some I/O", |l| l.matches("blk written=").count() >= 3);
    let snap = d.join("vm.snap");
    let r = vm.ctl(&["snapshot", "--path", snap.to_str().unwrap()]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let saved = vm.finish();
    assert_eq!(saved.status, 0, "{}", saved.stderr);
    assert!(saved.stderr.contains("VM stopped on request"), "{}", saved.stderr);
    let before = saved.stdout.matches("blk written=").count();
    assert!(!saved.stdout.contains("final=1"), "the guest finished before the snapshot");
    // The saved VM continues from where it stopped, in a new process.
    let restored = run(staunch().args(["vmm", "restore", "--from"]).arg(&snap), None, Duration::from_secs(120));
    assert_eq!(restored.status, 0, "{}", restored.stderr);
    let log = std::fs::read_to_string(d.join("serial.log")).unwrap();
    assert!(log.matches("blk written=").count() > before);
    assert_eq!(log.matches("STAUNCH ready").count(), 1, "the guest booted again instead of continuing");
    let last = log.lines().rfind(|l| l.contains("final=1")).expect("final report");
    assert_eq!(field(last, "verified"), writes);
    assert_eq!(field(last, "mismatches"), 0);
    check_disk(&disk, writes, blocks);

    // Cold reboot: the guest starts over (its counter from zero).
    let d2 = tmpdir("reboot");
    let vm = Vm::start(&d2, 1, None, "staunch.work=counter staunch.chunk=1M staunch.reports=100000");
    vm.wait_for("ticks", |l| counters(l).len() >= 3);
    assert_eq!(vm.ctl(&["reboot"]).status, 0);
    vm.wait_for("a second boot", |l| l.matches("STAUNCH ready").count() >= 2);
    vm.wait_for("ticks again", |l| l.split("STAUNCH ready").nth(2).is_some_and(|t| counters(t).len() >= 2));
    let after = vm.log();
    let second = after.split("STAUNCH ready").nth(2).unwrap();
    assert_eq!(counters(second)[0], 1 << 20, "counter restarted from zero");
    assert!(vm.events().iter().any(|e| e["event"] == "cold-reboot"));
    drop(vm);
}
