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

/// Lines that are not exactly what the guest printed, with the reason.
fn broken_lines(log: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut last: Option<u64> = None;
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    for l in complete.lines() {
        let Some(rest) = l.strip_prefix("STAUNCH ") else {
            bad.push(format!("no prefix: {l:?}"));
            continue;
        };
        let Some(kv) = rest.strip_prefix("blk written=") else {
            if !(rest.starts_with("ready ") || rest.starts_with("blk capacity=") || rest.starts_with("blk id=")) {
                bad.push(format!("unknown line: {l:?}"));
            }
            continue;
        };
        let shape: Vec<&str> = kv.split(' ').collect();
        let keys = ["verified=", "mismatches=", "errors="];
        let ok = shape.len() == 4
            && shape[1..].iter().zip(keys).all(|(f, k)| f.strip_prefix(k).is_some_and(|v| v.parse::<u64>().is_ok()));
        let Some(w) = shape.first().and_then(|w| w.parse::<u64>().ok()).filter(|_| ok) else {
            bad.push(format!("malformed: {l:?}"));
            continue;
        };
        match last {
            Some(p) if w != p + EVERY => bad.push(format!("written={w} after {p}: {l:?}")),
            _ => {}
        }
        last = Some(w);
    }
    bad
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
    // The UART's own write (before and inside the device), the bus around
    // it, a hung handler, and a planned upgrade.
    let faults: &[(&str, &str)] = &[
        ("serial.write=segv", "resumed"),
        ("pio.write=segv", "resumed"),
        ("serial.write=panic", "microreset"),
        ("serial.write=abort", "resumed"),
        ("serial.write=hang", "resumed"),
        ("pio.write=panic", "microreset"),
        ("upgrade", "resumed"),
        ("serial.write=stack-overflow", "resumed"),
    ];
    for (spec, kind) in faults {
        let seen = vm.events().len();
        let before = vm.log().matches("blk written=").count();
        let r = if *spec == "upgrade" { vm.ctl(&["upgrade"]) } else { vm.ctl(&["failpoint", spec]) };
        assert_eq!(r.status, 0, "{spec}: {}", r.stderr);
        let t = Instant::now();
        while !vm.events().iter().skip(seen).any(|e| e["event"] == *kind) {
            assert!(t.elapsed() < Duration::from_secs(60), "no {kind} after {spec}: {:?}", vm.events());
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.wait_for("two more reports", |l| l.matches("blk written=").count() >= before + 2);
    }
    let log = vm.log();
    assert_eq!(log.matches("STAUNCH ready").count(), 1, "the guest booted again");
    let bad = broken_lines(&log);
    assert!(bad.is_empty(), "console bytes lost or doubled:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_a_lost_and_a_doubled_byte() {
    let good = "STAUNCH blk written=100 verified=100 mismatches=0 errors=0\n\
                STAUNCH blk written=200 verified=200 mismatches=0 errors=0\n";
    assert!(broken_lines(good).is_empty());
    assert_eq!(broken_lines(&good.replacen("STAUNCH blk written=2", "TAUNCH blk written=2", 1)).len(), 1);
    assert_eq!(broken_lines(&good.replacen("written=200", "written=2000", 1)).len(), 1);
    assert_eq!(broken_lines(&good.replacen("errors=0\n", "errors=0\n\n", 1)).len(), 1);
}
