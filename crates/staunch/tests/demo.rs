//! The main job (`./scripts/demo.sh` runs `staunch demo`), shortened: it
//! must end with the guest's data intact and say so.
mod common;
use common::*;
use std::time::Duration;

#[test]
fn kvm_demo_survives_its_faults() {
    require_kvm();
    let r = run(staunch().args(["demo", "--writes", "60000"]), None, Duration::from_secs(600));
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("== OK: the guest survived"), "{}", r.stdout);
    assert!(r.stdout.contains("60000 blocks written, 60000 verified, 0 mismatches, 0 errors"), "{}", r.stdout);
    assert!(r.stdout.contains("128/128 blocks hold their last write"), "{}", r.stdout);
    assert!(r.stdout.contains("console                   : 0 lines"), "{}", r.stdout);
    // Four recoveries, each with the guest's own figure; the last one is the
    // block backend's (a separate process, killed with SIGKILL).
    // Then the network guest's two backend kills.
    assert_eq!(r.stdout.matches("by its own clock").count(), 6, "{}", r.stdout);
    assert!(r.stdout.contains("a SIGKILL of the block backend"), "{}", r.stdout);
    assert!(r.stdout.contains("a SIGKILL of the net backend"), "{}", r.stdout);
    assert!(r.stdout.contains(", 0 reordered, 0 corrupt; link up"), "{}", r.stdout);
    assert!(r.stdout.contains("replies sent: they agree"), "{}", r.stdout);
}
