//! `staunch blk`, the vhost-user-blk backend in its own process, under the
//! VMM with the test guest's `blk-verify` (four requests in flight): the
//! backend is SIGKILLed at random moments and at each of its failpoints,
//! hung with SIGSTOP and replaced, and the VMM itself crashes and upgrades
//! while attached. Judged by the guest (every write verified, no error, no
//! mismatch) and by the host's check of the disk.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WRITES: u64 = 30_000;
const BLOCKS: u64 = 256;

fn vm_on(dir: &Path, b: &Backend, vcpus: u8) -> Vm {
    let spec = PathBuf::from(format!("vhost-user={}", b.sock.display()));
    Vm::start(
        dir,
        vcpus,
        Some(&spec),
        &format!(
            "staunch.work=blk-verify staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.qd=4 staunch.report=500"
        ),
    )
}

fn reports(vm: &Vm) -> usize {
    vm.log().matches("blk written=").count()
}

fn progress(vm: &Vm, what: &str) {
    let before = reports(vm);
    vm.wait_for(what, |l| l.matches("blk written=").count() >= before + 2 || l.contains("final=1"));
}

/// The guest's verdict and the host's check of the disk.
fn judge(vm: Vm, b: &Backend) -> Vec<Value> {
    let events = vm.events();
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    let last = r.stdout.lines().rfind(|l| l.contains("final=1")).expect("final report");
    assert_eq!(field(last, "written"), WRITES, "{last}");
    assert_eq!(field(last, "verified"), WRITES, "{last}");
    assert_eq!(field(last, "mismatches"), 0, "{last}");
    assert_eq!(field(last, "errors"), 0, "{last}");
    assert!(r.report_with("blk mismatch").is_empty(), "{}", r.stdout);
    assert_eq!(r.stdout.matches("STAUNCH ready").count(), 1, "the guest booted once");
    check_disk(&b.disk, WRITES, BLOCKS);
    events
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

#[test]
fn kvm_blk_backend_serves_the_guest() {
    require_kvm();
    let d = tmpdir("vu-blk-plain");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 2);
    // The VMM reports its link to the backend ("connected": null is "busy
    // right now": the status never waits for the device's lock, so ask
    // until a sample finds it free).
    let t = std::time::Instant::now();
    let st = loop {
        let st = vm.ctl(&["status"]);
        if st.stdout.contains("\"connected\":true") || t.elapsed() > Duration::from_secs(10) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.stdout.contains("\"connected\":true"), "{}", st.stdout);
    assert!(st.stdout.contains("blk.sock"), "{}", st.stdout);
    let ev = judge(vm, &b);
    assert_eq!(count(&ev, "backend-lost"), 0);
}

#[test]
fn kvm_blk_backend_sigkill_at_random_moments_loses_nothing() {
    require_kvm();
    let d = tmpdir("vu-blk-kill");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 2);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(20 + rng % 200));
        if i == 3 {
            // Once with no spare left: a cold start of a new backend.
            b.kill_all();
            let _ = b.start(None);
        } else {
            b.kill();
        }
        progress(&vm, "I/O after the backend was killed");
    }
    let ev = judge(vm, &b);
    // A spare keeps the connection: the VMM saw a hang-up only when no
    // spare was left.
    assert_eq!(count(&ev, "backend-lost"), 1, "{ev:?}");
    assert_eq!(count(&ev, "backend-reconnected"), 1, "{ev:?}");
    let be = b.events();
    let kept = be.iter().filter(|e| e["event"] == "backend-takeover" && e["connection"] == "kept").count();
    assert_eq!(count(&be, "backend-takeover"), 5, "{be:?}");
    assert_eq!(kept, 5, "{be:?}");
}

#[test]
fn kvm_blk_backend_killed_at_each_failpoint_loses_nothing() {
    require_kvm();
    let d = tmpdir("vu-blk-points");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 2);
    let points = ["vhost.message", "vhost.request", "vhost.completed", "vhost.inflight"];
    for (i, point) in points.into_iter().enumerate() {
        // Armed from the environment of a fresh backend (it dies after the
        // first control message of the VMM's reconnect, before telling its
        // spare), then over the control socket (it dies on the next
        // request it takes). The spare is never armed.
        let pid = if i == 0 {
            b.kill_all();
            b.start(Some(&format!("{point}=kill*1")))
        } else {
            let pid = b.primary();
            assert_eq!(b.control(&format!("failpoint {point}=kill")), "ok");
            pid
        };
        b.taken_over(pid);
        let fired = b.events().iter().filter(|e| e["event"] == "failpoint-fired" && e["point"] == point).count();
        assert_eq!(fired, 1, "{point} fired: {:?}", b.events());
        progress(&vm, "I/O after the backend died at its failpoint");
    }
    let ev = judge(vm, &b);
    let be = b.events();
    let conn: Vec<String> = be
        .iter()
        .filter(|e| e["event"] == "backend-takeover")
        .map(|e| e["connection"].as_str().unwrap_or("?").to_string())
        .collect();
    // Death in a control message: the stream's position is unknown, so the
    // spare let the connection go and the VMM reconnected (kill_all, then
    // that). Death on the data path: the connection was kept.
    assert_eq!(conn, ["dropped", "kept", "kept", "kept"], "{be:?}");
    assert!(count(&ev, "backend-reconnected") >= 1, "{ev:?}");
    // Dying after publishing a completion but before clearing it is caught
    // by the inflight region's used index (the last batch is fixed up).
    assert!(be.iter().any(|e| e["event"] == "inflight-resubmit" && e["fixed_last_batch"] == true), "{be:?}");
}

#[test]
fn kvm_blk_backend_hung_with_sigstop_is_replaced() {
    require_kvm();
    let d = tmpdir("vu-blk-stop");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 1);
    progress(&vm, "I/O before the hang");
    b.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    // What a supervisor does with a hung backend: kill it; the spare serves.
    b.kill();
    progress(&vm, "I/O after the hung backend was replaced");
    judge(vm, &b);
}

/// A planned upgrade: a new binary is installed over the old one's path and
/// SIGUSR2 makes the backend start a spare from the new file, stop its
/// rings and exit; the spare takes the connection over.
#[test]
fn kvm_blk_backend_upgrades_to_another_binary_mid_io() {
    require_kvm();
    let d = tmpdir("vu-blk-upgrade");
    let mut b = Backend::new(&d);
    b.run_from_copy(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 2);
    for _ in 0..2 {
        progress(&vm, "I/O before the upgrade");
        b.upgrade();
        progress(&vm, "I/O after the upgrade");
    }
    let ev = judge(vm, &b);
    // Through the spare: the VMM never saw the backend go.
    assert_eq!(count(&ev, "backend-lost"), 0, "{ev:?}");
    let be = b.events();
    assert_eq!(be.iter().filter(|e| e["event"] == "backend-upgrade" && e["via"] == "spare").count(), 2, "{be:?}");
    let kept =
        be.iter().filter(|e| e["event"] == "backend-takeover" && e["upgraded"] == true && e["connection"] == "kept");
    assert_eq!(kept.count(), 2, "{be:?}");
}

#[test]
fn kvm_vmm_crash_and_upgrade_while_attached_to_the_backend() {
    require_kvm();
    let d = tmpdir("vu-blk-vmm");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let vm = vm_on(&d, &b, 2);
    progress(&vm, "I/O before the upgrade");
    assert_eq!(vm.ctl(&["upgrade"]).status, 0);
    progress(&vm, "I/O after the upgrade");
    vm.crash_and_wait();
    progress(&vm, "I/O after the VMM crashed");
    // And the backend dies once more under the recovered VMM.
    b.kill();
    progress(&vm, "I/O after the backend was killed under the new VMM");
    judge(vm, &b);
    // Every VMM generation (first, upgraded, crash successor) handed the
    // backend the same inflight region: it travels with the VM's record.
    // The last kill kept the connection (no new handover).
    b.same_inflight_region(3);
    let be = b.events();
    assert!(be.iter().any(|e| e["event"] == "backend-takeover" && e["connection"] == "kept"), "{be:?}");
}

/// The short version of `staunch campaign blk` (its long runs are a
/// separate command): random backend faults, judged by the guest and the
/// host's check of the disk.
#[test]
fn kvm_short_blk_campaign() {
    require_kvm();
    let r = short_campaign("blk");
    let tally = r.stdout.lines().find_map(|l| l.strip_prefix("recovered ")).and_then(|t| t.split_whitespace().next());
    let fired: u32 = tally.and_then(|t| t.split_once('/')).and_then(|(_, y)| y.parse().ok()).unwrap_or(0);
    assert!(fired >= 10, "{}", r.stdout);
}

#[test]
fn blk_backend_refuses_bad_disks_and_a_socket_in_use() {
    let d = tmpdir("vu-blk-bad");
    let run_blk = |disk: &str, sock: &Path| {
        run(staunch().arg("blk").arg("--socket").arg(sock).args(["--disk", disk]), None, Duration::from_secs(10))
    };
    let sock = d.join("b.sock");
    let r = run_blk(d.join("missing.img").to_str().unwrap(), &sock);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("missing.img"), "{}", r.stderr);
    let odd = d.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let r = run_blk(odd.to_str().unwrap(), &sock);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("512-byte sectors"), "{}", r.stderr);
    let mut b = Backend::new(&d);
    b.sock = sock.clone();
    let _ = b.start(None);
    let r = run_blk(b.disk.to_str().unwrap(), &sock);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
}

/// Malformed vhost-user messages end the connection, never the backend,
/// which serves the next frontend as if nothing happened.
#[test]
fn blk_backend_survives_malformed_messages() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let d = tmpdir("vu-blk-garbage");
    let mut b = Backend::new(&d);
    let _ = b.start(None);
    let hdr = |code: u32, flags: u32, size: u32| {
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m
    };
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        hdr(9999, 1, 0),                     // unknown request
        [hdr(8, 1, 8), vec![0; 8]].concat(), // SET_VRING_NUM with a short body
        [hdr(8, 1, 8), 0u32.to_le_bytes().to_vec(), 7u32.to_le_bytes().to_vec()].concat(), // size 7
        [hdr(5, 1, 8), vec![1; 8]].concat(), // SET_MEM_TABLE without fds
        [hdr(2, 1, 8), u64::MAX.to_le_bytes().to_vec()].concat(), // features never offered
        [hdr(24, 1, 12), vec![0xff; 12]].concat(), // GET_CONFIG before CONFIG was negotiated
        hdr(1, 1, 0x10_0000),                // oversized
        vec![1, 2],                          // torn header
    ];
    for m in &cases {
        let mut s = UnixStream::connect(&b.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(m);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    assert!(b.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the backend died");
    assert_eq!(count(&b.events(), "backend-takeover"), 0, "{:?}", b.events());
    // The next frontend is served: GET_FEATURES is answered.
    let mut s = UnixStream::connect(&b.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hdr(1, 1, 0)).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
    let disconnected = b.events().iter().filter(|e| e["event"] == "frontend-disconnected").count();
    assert!(disconnected >= cases.len(), "{:?}", b.events());
}
