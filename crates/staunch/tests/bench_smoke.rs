//! The benchmark harness runs end to end (short version; numbers are not
//! asserted: timing belongs in benchmarks, not tests).

mod common;
use common::*;
use std::time::Duration;

#[test]
fn kvm_bench_quick_prints_table() {
    require_kvm();
    let r = run(staunch().args(["bench", "--quick"]), None, Duration::from_secs(300));
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    for row in ["boot to first guest line", "PIO exit round trip", "MMIO exit round trip", "virtio-blk 4 KiB reads"] {
        let line = r.stdout.lines().find(|l| l.contains(row)).unwrap_or_else(|| panic!("no row {row}:\n{}", r.stdout));
        let staunch: f64 = line.split('|').nth(3).unwrap().trim().parse().unwrap();
        assert!(staunch > 0.0, "{line}");
        // With QEMU fetched (scripts/test.sh does), the peer column is filled.
        if r.stderr.contains("peer: QEMU emulator") {
            assert!(line.split('|').nth(5).unwrap().contains("er is better"), "{line}");
        }
    }
}

#[test]
fn store_bench_quick_prints_table() {
    let r = run(staunch().args(["bench", "store", "--quick"]), None, Duration::from_secs(300));
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    for row in
        ["writes (put)", "reads (get)", "watch: write to event", "transactions", "failover gap", "restart to serving"]
    {
        let line = r.stdout.lines().find(|l| l.contains(row)).unwrap_or_else(|| panic!("no row {row}:\n{}", r.stdout));
        let staunch: f64 = line.split('|').nth(3).unwrap().trim().parse().unwrap();
        assert!(staunch > 0.0, "{line}");
        // With etcd fetched (scripts/test.sh does), the peer column is filled.
        if r.stderr.contains("peer: etcd 3.4") && !row.starts_with("failover") {
            assert!(line.split('|').nth(4).unwrap().trim().parse::<f64>().is_ok(), "{line}");
        }
    }
}
