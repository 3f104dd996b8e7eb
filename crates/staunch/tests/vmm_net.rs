//! virtio-net in Staunch's VMM over `staunch net`: the test guest's
//! `net-ping` sends numbered frames through the backend, a tap and a Linux
//! bridge in a network namespace this test creates, to `staunch net-peer`,
//! which answers them and keeps its own count. The backend is SIGKILLed,
//! killed at its transmit and receive failpoints, hung with SIGSTOP and
//! replaced, and upgraded to another binary; the VMM is upgraded and
//! crashes. Judged by the guest's counts (every reply checked, nothing
//! corrupted or reordered, the link never down) against the host's (every
//! frame the guest sent arrived).

mod common;
mod netns;
use common::*;
use netns::{Netns, Peer};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const TAP: &str = "stap0";
const BRIDGE: &str = "br0";

/// A namespace with a bridge, the backend's tap on it and the peer on the
/// bridge.
fn network(d: &Path) -> (Netns, Backend, Peer) {
    let ns = Netns::new("v");
    ns.bridge(BRIDGE, &[TAP]);
    let peer = Peer::echo(&ns, BRIDGE, d);
    let b = Backend::net(d, &ns.0, TAP);
    (ns, b, peer)
}

fn vm_on(d: &Path, b: &Backend, secs: u64) -> Vm {
    let net = format!("vhost-user={},mac=52:54:00:00:00:42", b.sock.display());
    Vm::start_with(
        d,
        1,
        &["--net", &net],
        &format!("staunch.work=net-ping staunch.secs={secs} staunch.qd=8 staunch.report_ms=250"),
    )
}

fn reports(vm: &Vm) -> usize {
    vm.log().matches("STAUNCH net sent=").count()
}

/// Wait until the guest has reported twice more (traffic is flowing).
fn progress(vm: &Vm, what: &str) {
    let before = reports(vm);
    vm.wait_for(what, |l| l.matches("STAUNCH net sent=").count() >= before + 2 || l.contains("final=1"));
}

/// The guest's final counts against the host's; `deaths` backend (or VMM)
/// processes died with frames in them. Returns the longest round trip the
/// guest saw in any report interval.
fn judge(vm: Vm, peer: Peer, deaths: u64) -> u64 {
    let r = vm.finish();
    let host = peer.finish();
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.stdout.matches("STAUNCH ready").count(), 1, "the guest booted once");
    assert!(r.stdout.contains("STAUNCH net mac=52:54:00:00:00:42 status=1"), "{}", r.stdout);
    let last = r.stdout.lines().rfind(|l| l.contains("final=1")).expect("final report");
    let g = |k| field(last, k);
    let h = |k: &str| host[k].as_u64().unwrap_or_else(|| panic!("no {k} in {host}"));
    eprintln!("vmm_net: guest: {last}\nvmm_net: host: {host}");
    assert!(g("sent") > 1000, "{last}");
    // The link was up at every report (the guest reads its status each time).
    let reports: Vec<&str> = r.stdout.lines().filter(|l| l.contains("STAUNCH net sent=")).collect();
    assert!(reports.iter().all(|l| l.contains(" link=1 ")), "{}", r.stdout);
    // Every frame the guest posted reached the host (at least once).
    assert_eq!(h("unique"), g("sent"), "guest {last}\nhost {host}");
    assert_eq!((g("corrupt"), g("reordered"), g("bad_used")), (0, 0, 0), "{last}");
    assert_eq!(h("corrupt") + h("send_errors"), 0, "{host}");
    assert_eq!(g("replies") + g("lost"), g("sent"), "{last}");
    // A reply the guest did not get was inside a process that died (one
    // frame at most per death), and the guest counted it lost.
    let missing = h("replies") - g("replies") - g("dup");
    assert!(missing >= g("lost") && missing <= deaths, "missing {missing}, deaths {deaths}: {last}\n{host}");
    r.stdout.lines().filter(|l| l.contains("net sent=")).map(|l| field(l, "maxrtt_us")).max().unwrap_or(0)
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

#[test]
fn kvm_net_ping_survives_backend_faults() {
    require_kvm();
    let d = tmpdir("vmm-net");
    let (_ns, mut b, peer) = network(&d);
    b.run_from_copy(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 30);
    progress(&vm, "traffic");
    let faults = ["kill", "net.tx", "net.rx", "hang", "upgrade", "kill"];
    for (i, fault) in faults.iter().enumerate() {
        b.fault(fault);
        // A moment that differs from fault to fault.
        std::thread::sleep(Duration::from_millis(150 + 97 * i as u64));
        progress(&vm, &format!("traffic after {fault}"));
    }
    let events = vm.events();
    let worst = judge(vm, peer, faults.len() as u64);
    let be = b.events();
    let kept: Vec<&str> = be
        .iter()
        .filter(|e| e["event"] == "backend-takeover")
        .map(|e| e["connection"].as_str().unwrap_or("?"))
        .collect();
    eprintln!("vmm_net: longest round trip in a report interval {worst} us (guest-measured)");
    // The spare kept the VMM's connection every time: the VMM never saw
    // the backend go, so nothing could look like a link event.
    assert_eq!(kept, ["kept"; 6], "{be:?}");
    assert_eq!(count(&events, "backend-lost"), 0, "{events:?}");
    for point in ["net.tx", "net.rx"] {
        assert!(be.iter().any(|e| e["event"] == "failpoint-fired" && e["point"] == point), "{point}: {be:?}");
    }
}

#[test]
fn kvm_net_vmm_crash_and_upgrade_with_traffic_flowing() {
    require_kvm();
    let d = tmpdir("vmm-net-vmm");
    let (_ns, mut b, peer) = network(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 20);
    progress(&vm, "traffic before the upgrade");
    assert_eq!(vm.ctl(&["upgrade"]).status, 0);
    progress(&vm, "traffic after the upgrade");
    vm.crash_and_wait();
    progress(&vm, "traffic after the VMM crashed");
    b.kill();
    progress(&vm, "traffic after the backend was killed under the new VMM");
    // The VMM's processes died with frames of theirs in the backend, and
    // the backend once: at most one frame each.
    let worst = judge(vm, peer, 3);
    eprintln!("vmm_net: longest round trip in a report interval {worst} us (guest-measured)");
    // Each VMM generation connected to the backend with the same inflight
    // region (it travels in the VM's record).
    b.same_inflight_region(3);
}

/// The short version of `staunch campaign net` (its long runs are a
/// separate command): random faults of the backend, judged by the guest's
/// counts and, at the end of each VM, the host's.
#[test]
fn kvm_short_net_campaign() {
    require_kvm();
    short_campaign("net");
}

/// VM to VM: two guests, each on its own `staunch net` and tap, on one
/// bridge; one's `net-ping` is answered by the other's `net-echo`, and
/// both backends are SIGKILLed while frames flow.
#[test]
fn kvm_net_vm_to_vm_through_a_bridge() {
    require_kvm();
    let d = tmpdir("vmm-net-v2v");
    let (da, db) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let ns = Netns::new("w");
    ns.bridge(BRIDGE, &["stap0", "stap1"]);
    let mut ba = Backend::net(&da, &ns.0, "stap0");
    let mut bb = Backend::net(&db, &ns.0, "stap1");
    let _ = ba.start(None);
    let _ = bb.start(None);
    let net = format!("vhost-user={},mac=52:54:00:00:00:0b", bb.sock.display());
    let echo = Vm::start_with(&db, 1, &["--net", &net], "staunch.work=net-echo staunch.report_ms=3600000");
    echo.wait_for("the echo guest's network", |l| l.contains("STAUNCH net mac=52:54:00:00:00:0b status=1"));
    let ping = vm_on(&da, &ba, 12);
    progress(&ping, "traffic");
    for echo_side in [true, false, true] {
        if echo_side {
            bb.kill();
        } else {
            ba.kill();
        }
        progress(&ping, "traffic after a kill");
    }
    let r = ping.finish();
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    let last = r.stdout.lines().rfind(|l| l.contains("final=1")).expect("final report");
    let g = |k| field(last, k);
    eprintln!("vmm_net: vm to vm: {last}");
    assert!(g("replies") > 1000, "{last}");
    assert_eq!(g("replies") + g("lost"), g("sent"), "{last}");
    // A frame inside a dying backend at most, per kill.
    assert!(g("lost") <= 3, "{last}");
    assert_eq!((g("corrupt"), g("reordered"), g("bad_used")), (0, 0, 0), "{last}");
    assert!(r.stdout.lines().filter(|l| l.contains("net sent=")).all(|l| l.contains(" link=1 ")), "{}", r.stdout);
    drop(echo);
}
