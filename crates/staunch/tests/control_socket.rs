//! The control socket's last word: a VMM that stops, hands over or reboots
//! after a request writes the whole reply before it goes.
mod common;
use common::*;

/// The connection thread is made slow (`api.reply=slow`: it stalls before it
/// writes), as a loaded host makes it; the VMM must still wait for the reply
/// to be on the socket before it stops. Without that wait the client reads
/// nothing or a truncated line.
#[test]
fn kvm_snapshot_reply_survives_a_slow_connection_thread() {
    require_kvm();
    let d = tmpdir("ctl-snapshot");
    let vm = Vm::start(&d, 1, None, "staunch.work=counter staunch.chunk=1M");
    // Three hits: the reply to this very request, the CLI's status request
    // before the snapshot, then the snapshot's reply.
    let r = vm.ctl(&["failpoint", "api.reply=slow*3"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let snap = d.join("vm.snap");
    let r = vm.ctl(&["snapshot", "--path", snap.to_str().unwrap()]);
    assert_eq!(r.status, 0, "snapshot reply: {}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("bytes"), "the reply's data is missing: {}", r.stdout);
    let done = vm.finish();
    assert_eq!(done.status, 0, "{}", done.stderr);
    assert!(snap.metadata().unwrap().len() > 0);
}

/// The same for a warm upgrade: the old VMM leaves right after the handover.
#[test]
fn kvm_upgrade_reply_survives_a_slow_connection_thread() {
    require_kvm();
    let d = tmpdir("ctl-upgrade");
    let vm = Vm::start(&d, 1, None, "staunch.work=counter staunch.chunk=1M");
    assert_eq!(vm.ctl(&["failpoint", "api.reply=slow*3"]).status, 0);
    let r = vm.ctl(&["upgrade"]);
    assert_eq!(r.status, 0, "upgrade reply: {}\n{}", r.stdout, r.stderr);
    // The guest goes on in the successor.
    vm.wait_for("the successor", |_| vm.events().iter().any(|e| e["event"] == "resumed"));
    let before = counters(&vm.log()).len();
    vm.wait_for("ticks after the upgrade", |l| counters(l).len() > before + 1);
    assert_eq!(vm.log().matches("STAUNCH ready").count(), 1);
}
