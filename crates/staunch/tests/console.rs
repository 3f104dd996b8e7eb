//! The console is exactly-once: across microreset, crash recovery, hang
//! recovery and upgrade, no byte the guest printed is lost or doubled.
//!
//! The guest's block reports are a known byte stream: every line has one
//! exact shape and `written=` grows by the report interval from line to
//! line, so a lost or doubled byte anywhere (a letter, a digit, a space, a
//! newline) breaks a line's shape or its number.
mod common;
use common::*;
use std::time::{Duration, Instant};

const EVERY: u64 = 100;

fn broken_lines(log: &str) -> Vec<String> {
    staunch_testguest::console::blk_report_errors(log, EVERY)
}

/// The UART's own write (before and inside the device), the bus around it,
/// a hung handler, the vCPU loop right after an exit, and a planned upgrade:
/// each waited for (its event) and followed by two more reports.
const FAULTS: &[(&str, &str)] = &[
    ("serial.write=segv", "resumed"),
    ("pio.write=segv", "resumed"),
    ("serial.write=panic", "microreset"),
    ("serial.write=abort", "resumed"),
    ("serial.write=hang", "resumed"),
    ("pio.write=panic", "microreset"),
    ("vcpu.loop=segv", "resumed"),
    ("upgrade", "resumed"),
    ("serial.write=stack-overflow", "resumed"),
    ("vcpu.loop=hang", "resumed"),
];

fn inject_all(vm: &Vm, report: &str) {
    for (spec, kind) in FAULTS {
        let seen = vm.events().len();
        let before = vm.log().matches(report).count();
        let r = if *spec == "upgrade" { vm.ctl(&["upgrade"]) } else { vm.ctl(&["failpoint", spec]) };
        assert_eq!(r.status, 0, "{spec}: {}", r.stderr);
        let t = Instant::now();
        while !vm.events().iter().skip(seen).any(|e| e["event"] == *kind) {
            assert!(t.elapsed() < Duration::from_secs(60), "no {kind} after {spec}: {:?}", vm.events());
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.wait_for("two more reports", |l| l.matches(report).count() >= before + 2);
    }
}

/// The console workload: every byte of the stream is known from its line's
/// sequence number, so the checker counts exactly what was lost or doubled.
#[test]
fn kvm_console_stream_is_exactly_once_across_every_recovery() {
    require_kvm();
    let d = tmpdir("console-stream");
    let vm = Vm::start(&d, 2, None, "staunch.work=console staunch.reports=0");
    inject_all(&vm, "STAUNCH con seq=");
    let _ = vm.ctl(&["pause"]);
    let log = std::fs::read(&vm.log).unwrap();
    let c = staunch_testguest::proto::console::check(&log);
    assert_eq!((c.lost, c.doubled, c.extra), (0, 0, 0), "console bytes lost or doubled: {c:?}");
    assert!(c.lines as usize > FAULTS.len(), "the stream went on through every fault: {c:?}");
    assert_eq!(vm.log().matches("STAUNCH ready").count(), 1, "the guest booted again");
}

#[test]
fn kvm_console_is_exactly_once_across_every_recovery() {
    require_kvm();
    let d = tmpdir("console");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let vm = Vm::start(
        &d,
        2,
        Some(&disk),
        &format!("staunch.work=blk-verify staunch.writes=0 staunch.blocks=256 staunch.report={EVERY}"),
    );
    inject_all(&vm, "blk written=");
    let log = vm.log();
    assert_eq!(log.matches("STAUNCH ready").count(), 1, "the guest booted again");
    let bad = broken_lines(&log);
    assert!(bad.is_empty(), "console bytes lost or doubled:\n{}", bad.join("\n"));
}
