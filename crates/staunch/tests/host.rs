//! `staunch host`: the supervisor keeps every component of a host running
//! toward the store's definitions. Each fault is real (SIGKILL, SIGSTOP,
//! a crash-looping definition, the supervisor's own death); each run is
//! judged by the guests' own evidence and the host's check of their disks.

mod common;
mod hosthelp;
mod netns;

use common::{require_kvm, run, staunch};
use hosthelp::Host;
use std::time::Duration;

const WRITES: u64 = 60_000;

/// Backends and VMMs of two VMs: a backend's serving process SIGKILLed
/// (its spare takes over) and SIGSTOPped (hung: killed, its spare takes
/// over), stuck in a request while still answering (no progress: killed,
/// its spare replays the request), a backend's whole process group SIGKILLed (restarted; the VMM
/// reconnects and replays), a VMM SIGSTOPped (hung: SIGABRT, its crash path
/// hands the guest to its spare). No guest restarts; every write verified.
#[test]
fn kvm_host_recovers_backends_and_vmms_of_two_vms() {
    require_kvm();
    let h = Host::start("host-comp", "");
    let da = h.blk_vm("a", WRITES, "");
    let db = h.blk_vm("b", WRITES, "");
    h.wait_healthy(&["vm/a/vmm", "vm/b/vmm", "vm/a/blk0", "vm/b/blk0"]);
    h.progress("a");
    h.progress("b");

    h.signal(h.pid("vm/a/blk0"), libc::SIGKILL);
    let e = h.wait_event("component-recovered", "vm/a/blk0", 1);
    assert_eq!(e["rung"], 2, "{e}");
    h.progress("a");

    h.signal(h.pid("vm/b/blk0"), libc::SIGSTOP);
    let hung = h.wait_event("component-hung", "vm/b/blk0", 1);
    assert!(hung["detect_ms"].as_f64().unwrap() >= 100.0, "{hung}");
    h.wait_event("component-recovered", "vm/b/blk0", 1);
    h.progress("b");

    let leader = h.component("vm/a/blk0")["leader"].as_u64().unwrap() as i32;
    // SAFETY: killpg(2) of the backend's own group.
    unsafe { libc::killpg(leader, libc::SIGKILL) };
    let e = h.wait_event("component-restarted", "vm/a/blk0", 1);
    assert_eq!(e["rung"], 2, "{e}");
    h.progress("a");

    // Alive and answering, but a request never completes: no progress
    // (before the backend's own 3 s watchdog would end it).
    let ctl = h.run.join("vm/b/blk0.ctl");
    let mut s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    std::io::Write::write_all(&mut s, b"failpoint vhost.request=hang\n").unwrap();
    let stalled = h.wait_event("component-hung", "vm/b/blk0", 2);
    assert!(stalled["fault"].as_str().unwrap().starts_with("no progress"), "{stalled}");
    h.wait_event("component-recovered", "vm/b/blk0", 2);
    h.progress("b");

    h.signal(h.pid("vm/b/vmm"), libc::SIGSTOP);
    h.wait_event("component-hung", "vm/b/vmm", 1);
    h.wait_event("component-recovered", "vm/b/vmm", 1);
    h.progress("b");

    let a = h.judge_blk("a", &da, WRITES);
    let b = h.judge_blk("b", &db, WRITES);
    eprintln!("a: {a}\nb: {b}");
    assert_eq!(h.count("guest-restarted"), 0, "no guest was restarted");
    // The guests powered off: the supervisor records them as stopped.
    h.wait("both VMs stopped", Duration::from_secs(30), |h| {
        h.vm_state("a") == "stopped" && h.vm_state("b") == "stopped"
    });
    h.wait("the store's copy of a's state: stopped", Duration::from_secs(30), |h| {
        h.vm(&["list"]).stdout.lines().any(|l| l.starts_with("a ") && l.contains("stopped"))
    });
}

/// The store and the supervisor: the store primary SIGKILLed (the standby
/// serves, a new standby starts), SIGSTOPped (hung: killed, standby
/// serves), killed together with a backend (a cascade), its standby
/// killed and SIGSTOPped; then the supervisor SIGKILLed and started again, adopting every
/// component without restarting any. Acknowledged definitions survive; the
/// guest notices nothing.
#[test]
fn kvm_host_store_failovers_cascade_and_supervisor_adoption() {
    require_kvm();
    let mut h = Host::start("host-store", "");
    let da = h.blk_vm("a", WRITES, "");
    // An acknowledged write that must survive every failover below.
    let k = h.define("keep", &format!("kernel = \"{}\"\nstate = \"stopped\"\n", h.kernel.display()));
    assert_eq!(k.status, 0, "{}", k.stderr);
    h.wait_healthy(&["vm/a/vmm", "vm/a/blk0", "store", "store-standby"]);
    h.progress("a");

    h.signal(h.pid("store"), libc::SIGKILL);
    let f = h.wait_event("store-failover", "store", 1);
    assert!(f["gap_ms_by_the_store"].as_f64().is_some(), "{f}");
    h.wait_event("component-started", "store-standby", 2);
    h.wait_healthy(&["store", "store-standby"]);

    h.signal(h.pid("store"), libc::SIGSTOP);
    h.wait_event("component-hung", "store", 1);
    h.wait_event("store-failover", "store", 2);
    h.wait_event("component-started", "store-standby", 3);
    h.wait_healthy(&["store", "store-standby"]);

    // A cascade: the store and a backend die at once.
    let (store, blk) = (h.pid("store"), h.pid("vm/a/blk0"));
    h.signal(store, libc::SIGKILL);
    h.signal(blk, libc::SIGKILL);
    h.wait_event("store-failover", "store", 3);
    h.wait_event("component-recovered", "vm/a/blk0", 1);
    h.wait_healthy(&["store", "store-standby", "vm/a/blk0"]);

    h.signal(h.pid("store-standby"), libc::SIGKILL);
    h.wait_event("component-restarted", "store-standby", 1);
    h.wait_healthy(&["store", "store-standby"]);

    // A stopped standby answers nothing and acknowledges nothing: hung,
    // replaced by a fresh one (a write meanwhile makes the primary drop it).
    h.signal(h.pid("store-standby"), libc::SIGSTOP);
    let w = h.define("keep2", &format!("kernel = \"{}\"\nstate = \"stopped\"\n", h.kernel.display()));
    assert_eq!(w.status, 0, "{}", w.stderr);
    let hung = h.wait_event("component-hung", "store-standby", 1);
    assert!(hung["fault"].as_str().unwrap().contains("stopped") || hung["fault"].as_str().unwrap().contains("dropped"));
    h.wait_event("component-restarted", "store-standby", 2);
    h.wait_healthy(&["store", "store-standby"]);
    h.progress("a");

    let list = h.vm(&["list"]);
    assert!(
        list.stdout.lines().any(|l| l.starts_with("keep ")),
        "an acknowledged definition was lost:\n{}",
        list.stdout
    );

    // The supervisor dies; nothing else does. Its successor adopts.
    let before: Vec<u32> = ["store", "store-standby", "vm/a/blk0", "vm/a/vmm"].iter().map(|i| h.pid(i)).collect();
    let started = h.count("component-started");
    h.kill_supervisor();
    h.progress("a");
    h.start_supervisor();
    assert_eq!(h.count("component-adopted"), 4, "{:?}", h.events());
    assert_eq!(h.count("component-not-adopted"), 0);
    h.wait_healthy(&["store", "store-standby", "vm/a/blk0", "vm/a/vmm"]);
    let after: Vec<u32> = ["store", "store-standby", "vm/a/blk0", "vm/a/vmm"].iter().map(|i| h.pid(i)).collect();
    assert_eq!(before, after, "the same processes, adopted");
    h.progress("a");
    assert_eq!(h.count("component-started"), started, "adoption started nothing");
    h.judge_blk("a", &da, WRITES);
    assert_eq!(h.count("guest-restarted"), 0);
}

/// A VM with a NIC: `staunch net` in the namespace the definition names,
/// on a tap on a bridge where `staunch net-peer` answers the guest's
/// numbered frames. Its backend SIGKILLed (the spare keeps the
/// connection), SIGSTOPped (hung: killed, the spare takes over) and
/// upgraded by a rolling upgrade; judged by the guest's counts against the
/// host's: every frame it sent arrived, nothing corrupted or reordered,
/// the link never down, a reply missing only where a process died.
#[test]
fn kvm_host_nic_vm_survives_its_net_backend_faults() {
    require_kvm();
    let h = Host::start("host-net", "");
    let ns = netns::Netns::new("h");
    ns.bridge("br0", &["htap0"]);
    let peer = netns::Peer::echo(&ns, "br0", &h.dir);
    let def = format!(
        "kernel = \"{}\"\nmemory = 64\nvcpus = 1\ncmdline = \"staunch.work=net-ping staunch.secs=25 staunch.qd=8 staunch.report_ms=250\"\n[[nic]]\ntap = \"htap0\"\nmac = \"52:54:00:00:00:43\"\nnetns = \"{}\"\n",
        h.kernel.display(),
        ns.0
    );
    let d = h.define("n", &def);
    assert_eq!(d.status, 0, "{}", d.stderr);
    h.wait_healthy(&["vm/n/net0", "vm/n/vmm"]);
    let sent = |h: &Host| h.serial("n").matches("STAUNCH net sent=").count();
    let progress = |h: &Host, what: &str| {
        let n = sent(h);
        h.wait(what, Duration::from_secs(60), |h| sent(h) >= n + 2 || h.serial("n").contains("final=1"));
    };
    progress(&h, "traffic");

    h.signal(h.pid("vm/n/net0"), libc::SIGKILL);
    h.wait_event("component-recovered", "vm/n/net0", 1);
    progress(&h, "traffic after a SIGKILL of the net backend");
    h.signal(h.pid("vm/n/net0"), libc::SIGSTOP);
    h.wait_event("component-hung", "vm/n/net0", 1);
    h.wait_event("component-recovered", "vm/n/net0", 2);
    progress(&h, "traffic after a hang of the net backend");
    let next = h.upgrade_to_a_copy();
    assert_eq!(exe(h.pid("vm/n/net0")), next, "the net backend runs the new binary");
    progress(&h, "traffic after the upgrade");

    h.wait("the guest's final report", Duration::from_secs(120), |h| h.serial("n").contains("final=1"));
    let host = peer.finish();
    let log = h.serial("n");
    let last = log.lines().rfind(|l| l.contains("final=1")).unwrap();
    let g = |k| common::field(last, k);
    let hc = |k: &str| host[k].as_u64().unwrap_or_else(|| panic!("no {k} in {host}"));
    eprintln!("host net: guest: {last}\nhost net: peer: {host}");
    assert_eq!(log.matches("STAUNCH ready").count(), 1, "the guest booted once");
    assert!(g("sent") > 500, "{last}");
    assert!(log.lines().filter(|l| l.contains("STAUNCH net sent=")).all(|l| l.contains(" link=1 ")), "{log}");
    assert_eq!(hc("unique"), g("sent"), "every frame reached the peer: {last}\n{host}");
    assert_eq!((g("corrupt"), g("reordered"), g("bad_used")), (0, 0, 0), "{last}");
    assert_eq!(hc("corrupt") + hc("send_errors"), 0, "{host}");
    assert_eq!(g("replies") + g("lost"), g("sent"), "{last}");
    // Three processes died or were replaced with frames possibly in them.
    let missing = hc("replies") - g("replies") - g("dup");
    assert!(missing >= g("lost") && missing <= 3, "missing {missing}: {last}\n{host}");
    assert_eq!(h.count("guest-restarted"), 0);
}

/// The serving process of each component, by the file it runs.
fn exe(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

/// A rolling upgrade of every component to another binary (standby, store,
/// backend, VMM, one at a time: a fresh standby, a failover, an upgrade
/// through the spare, a warm upgrade), then proactive rejuvenation on a
/// 2 s timer after the supervisor was restarted with that policy (it
/// adopts, and keeps the upgraded binary). The guest is never restarted
/// and verifies every write.
#[test]
fn kvm_host_rolling_upgrade_and_rejuvenation() {
    require_kvm();
    let mut h = Host::start("host-upgrade", "");
    // Long enough to outlast the upgrade and two rounds of rejuvenation.
    let writes = 400_000;
    let da = h.blk_vm("a", writes, "");
    let all = ["store", "store-standby", "vm/a/blk0", "vm/a/vmm"];
    h.wait_healthy(&all);
    h.progress("a");

    let next = h.upgrade_to_a_copy();
    h.wait_healthy(&all);
    for id in all {
        assert_eq!(exe(h.pid(id)), next, "{id} runs the new binary: {}", h.status());
        assert_eq!(h.component(id)["generation"], 1, "{id}");
    }
    let order: Vec<String> = h
        .events()
        .iter()
        .filter(|e| e["event"] == "component-rejuvenated" && e["why"] == "upgrade")
        .map(|e| e["component"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["store-standby", "store", "vm/a/blk0", "vm/a/vmm"], "dependency order");
    h.progress("a");

    // Rejuvenation by age, under a supervisor that adopted everything.
    h.kill_supervisor();
    let cfg = std::fs::read_to_string(&h.config).unwrap();
    let policy = "[rejuvenate]\nvmm = \"2s\"\nbackend = \"2s\"\nstore = \"2s\"\nspacing_ms = 200\n";
    std::fs::write(&h.config, format!("{cfg}{policy}")).unwrap();
    h.start_supervisor();
    // (Each store failover starts a fresh standby: it may never get old.)
    for id in ["store", "vm/a/blk0", "vm/a/vmm"] {
        let e = h.wait_event("component-rejuvenated", id, 2);
        assert_eq!(e["why"], "timer", "{e}");
    }
    h.wait_healthy(&all);
    for id in all {
        assert_eq!(exe(h.pid(id)), next, "{id} still runs the upgraded binary");
    }
    h.judge_blk("a", &da, writes);
    // Until the guest powered off (a renewal may be cut short by it).
    let mut evs: Vec<_> = h.events().into_iter().take_while(|e| e["event"] != "vm-stopped").collect();
    // The VMM's exit at the guest's poweroff, just before.
    if evs.last().is_some_and(|e| e["event"] == "component-died" && e["component"] == "vm/a/vmm") {
        evs.pop();
    }
    for bad in ["guest-restarted", "guest-lost", "component-died", "component-rejuvenate-failed"] {
        assert!(!evs.iter().any(|e| e["event"] == bad), "{bad}: {evs:?}");
    }
}

/// A binary that does not say it is staunch is refused before anything
/// runs it; one that answers `--version` but cannot serve halts the
/// rolling upgrade at its first component (the store's standby), and what
/// starts afterwards starts from the old binary again.
#[test]
fn host_upgrade_refuses_or_halts_on_a_bad_binary() {
    let h = Host::start("host-badup", "[rejuvenate]\ntimeout_ms = 3000\n");
    h.wait_healthy(&["store", "store-standby"]);
    let up = |bin: &std::path::Path| {
        run(
            staunch().args(["host", "upgrade", "--wait", "--config"]).arg(&h.config).arg("--binary").arg(bin),
            None,
            Duration::from_secs(60),
        )
    };
    let r = up(std::path::Path::new("/bin/true"));
    assert_eq!(r.status, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("host-upgrade-refused"), "{}", r.stdout);
    assert_eq!(h.count("component-rejuvenating"), 0, "nothing was touched");

    let bad = h.dir.join("staunch-broken");
    let real = env!("CARGO_BIN_EXE_staunch");
    std::fs::write(&bad, format!("#!/bin/sh\n[ \"$1\" = --version ] && exec {real} --version\nexit 3\n")).unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = up(&bad);
    assert_eq!(r.status, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("host-upgrade-halted"), "{}", r.stdout);
    let halted = h.events().into_iter().find(|e| e["event"] == "host-upgrade-halted").unwrap();
    assert_eq!(halted["at"], "store-standby", "{halted}");
    h.wait_healthy(&["store", "store-standby"]);
    assert_eq!(exe(h.pid("store-standby")).to_str(), Some(real), "the standby runs the old binary again");
    assert_eq!(exe(h.pid("store")).to_str(), Some(real), "the primary was never touched");
}

/// An uncatchable VMM death (SIGKILL) loses the guest's CPU state: the
/// supervisor boots the guest again from its disk and reports a guest
/// restart (rung 4), never a recovery. A definition whose VMM dies at
/// every start is put into backoff by the restart budget, and the other VM
/// keeps running.
#[test]
fn kvm_host_vmm_sigkill_is_a_cold_restart_and_crash_loops_back_off() {
    require_kvm();
    let h = Host::start("host-cold", "[restart]\nburst = 3\ninterval_s = 60\nbackoff_ms = 5000\n");
    h.blk_vm("a", 100_000_000, "");
    h.wait_healthy(&["vm/a/vmm"]);
    h.progress("a");
    h.signal(h.pid("vm/a/vmm"), libc::SIGKILL);
    let lost = h.wait_event("guest-lost", "vm/a/vmm", 1);
    assert_eq!(lost["rung"], 4, "{lost}");
    let r = h.wait_event("guest-restarted", "vm/a/vmm", 1);
    assert_eq!(r["rung"], 4, "{r}");
    assert_eq!(h.count_for("component-recovered", "vm/a/vmm"), 0, "a guest restart is not a recovery");
    h.wait_healthy(&["vm/a/vmm"]);
    h.wait("the second boot", Duration::from_secs(60), |h| h.serial("a").contains("STAUNCH ready"));
    assert!(h.run.join("vm/a/serial.1.log").exists(), "the first boot's console is kept");
    assert_eq!(h.component("vm/a/vmm")["boots"], 2);
    h.progress("a");

    // Not a kernel: the VMM exits at once, every time.
    let junk = h.dir.join("junk.elf");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let d = h.define("loop", &format!("kernel = \"{}\"\nmemory = 32\n", junk.display()));
    assert_eq!(d.status, 0, "{}", d.stderr);
    let e = h.wait_event("restart-budget-exhausted", "vm/loop/vmm", 1);
    assert_eq!(e["restarts"], 3, "{e}");
    // host-status.json follows the event within the same pass.
    h.wait("loop's state: backoff", Duration::from_secs(10), |h| h.vm_state("loop").starts_with("backoff"));
    h.wait_show("loop", "state = backoff");
    // No restart while in backoff.
    let n = h.count_for("guest-restarted", "vm/loop/vmm");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(h.count_for("guest-restarted", "vm/loop/vmm"), n, "restarted in a tight loop");
    h.progress("a");
    assert!(h.healthy("vm/a/vmm"));
}

/// Bad definitions get an error that names the key, and do not stop the
/// supervisor from running the other VMs: the CLI refuses what it can
/// check; what reaches the store anyway (written by any store client) is
/// the VM's recorded state.
#[test]
fn kvm_host_bad_definitions_are_named_and_recorded() {
    require_kvm();
    let h = Host::start("host-bad", "");
    let k = h.kernel.display().to_string();
    let cases: [(&str, String, &str); 4] = [
        ("unknown", format!("kernel = \"{k}\"\ncolour = \"red\"\n"), "unknown field `colour`"),
        ("nokernel", "memory = 64\n".into(), "kernel"),
        ("huge", format!("kernel = \"{k}\"\nmemory = 100000000\n"), "memory"),
        ("nodisk", format!("kernel = \"{k}\"\n[[disk]]\npath = \"/nonexistent.img\"\n"), "disk/0/path"),
    ];
    for (name, def, key) in &cases {
        let r = h.define(name, def);
        assert_ne!(r.status, 0, "{name} accepted");
        assert!(r.stderr.contains(key), "{name}: {}", r.stderr);
    }
    let disk = h.blk_vm("good", 100_000_000, "");
    h.wait_healthy(&["vm/good/vmm"]);
    // Past the CLI: straight into the store, one transaction per VM (as
    // `vm define` does: the supervisor never sees half a definition).
    let mut c = staunch_store::client::Client::connect(&h.run.join("store.sock")).unwrap();
    let raw = [("/staunch/vm/raw/kernel", k.as_str()), ("/staunch/vm/raw/vcpus", "lots")];
    let twin = [("/staunch/vm/twin/kernel", k.as_str()), ("/staunch/vm/twin/disk/0/path", disk.to_str().unwrap())];
    for keys in [raw, twin] {
        let tx = c.transaction_start().unwrap().unwrap();
        for (path, value) in keys {
            c.write_value(tx, path, value.as_bytes()).unwrap().unwrap();
        }
        c.transaction_end(tx, true).unwrap().unwrap();
    }
    h.wait("errors recorded", Duration::from_secs(30), |h| {
        h.vm_state("raw").starts_with("error vcpus") && h.vm_state("twin").starts_with("error disk/0/path")
    });
    assert!(h.vm_state("twin").contains("good's disk"), "{}", h.vm_state("twin"));
    h.wait_show("raw", "error = vcpus");
    assert!(h.healthy("vm/good/vmm"), "the good VM kept running");
    assert!(h.component("vm/raw/vmm").is_null() && h.component("vm/twin/vmm").is_null());
    h.progress("good");
}

/// Level-triggered reconciliation: definitions changed while the
/// supervisor was down (one VM stopped, another defined) are applied when
/// it comes back, after adopting what runs; running it again changes
/// nothing.
#[test]
fn kvm_host_reconciles_what_changed_while_it_was_down() {
    require_kvm();
    let mut h = Host::start("host-reconcile", "");
    h.blk_vm("a", 100_000_000, "");
    h.wait_healthy(&["vm/a/vmm", "store-standby"]);
    h.kill_supervisor();
    assert_eq!(h.vm(&["stop", "a"]).status, 0);
    h.blk_vm("b", 100_000_000, "");
    h.start_supervisor();
    h.wait("a stopped and b running", Duration::from_secs(90), |h| {
        h.vm_state("a") == "stopped" && h.healthy("vm/b/vmm")
    });
    assert!(h.component("vm/a/vmm").is_null() && h.component("vm/a/blk0").is_null());
    assert_eq!(h.count_for("component-adopted", "vm/a/vmm"), 1, "adopted, then stopped as defined");
    h.progress("b");
    // Converged: another supervisor start adopts everything and starts nothing.
    let started = h.count("component-started");
    h.kill_supervisor();
    h.start_supervisor();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(h.count("component-started"), started, "{:?}", h.events());
    assert_eq!(h.vm(&["start", "a"]).status, 0);
    h.wait_healthy(&["vm/a/vmm"]);
    assert_eq!(h.vm(&["undefine", "b"]).status, 0);
    h.wait("b gone", Duration::from_secs(30), |h| h.vm_state("b") == "absent" && h.component("vm/b/vmm").is_null());
    let unknown = h.vm(&["start", "nosuch"]);
    assert_ne!(unknown.status, 0);
    assert!(unknown.stderr.contains("no VM named 'nosuch'"), "{}", unknown.stderr);
}

/// systemd's notify protocol, for real: READY=1 once the store serves and
/// the definitions are read, WATCHDOG=1 every half of WATCHDOG_USEC; and a
/// second supervisor on the same host is refused.
#[test]
fn host_speaks_sd_notify_and_refuses_a_second_supervisor() {
    let h = Host::new("host-notify", "");
    let sock = h.dir.join("notify.sock");
    let rx = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log = std::fs::File::create(h.dir.join("host.log")).unwrap();
    let mut child = staunch()
        .arg("host")
        .arg("--config")
        .arg(&h.config)
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "200000")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.iter().filter(|m: &&String| m.as_str() == "WATCHDOG=1").count() < 3 {
        let n = rx.recv(&mut buf).expect("a notification");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].starts_with("READY=1"), "{got:?}");
    let second = run(staunch().arg("host").arg("--config").arg(&h.config), None, Duration::from_secs(30));
    assert_ne!(second.status, 0);
    assert!(second.stderr.contains("another supervisor"), "{}", second.stderr);
    let _ = child.kill();
    let _ = child.wait();
}

/// A malformed host config is refused with the key named.
#[test]
fn host_config_errors_name_the_key() {
    let h = Host::new("host-badcfg", "[health]\nhang_ms = 100\nheartbeat = 5\n");
    let r = run(staunch().arg("host").arg("--config").arg(&h.config), None, Duration::from_secs(30));
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("unknown field `heartbeat`"), "{}", r.stderr);
}

/// The host campaign, short: random faults into random components of a
/// host with two VMs, judged by the guests, the store and the reconciled
/// host (`staunch campaign host --runs 300` is the long version).
#[test]
fn kvm_short_host_campaign() {
    require_kvm();
    let r = run(staunch().args(["campaign", "host", "--runs", "10", "--seed", "5"]), None, Duration::from_secs(900));
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("(100.0 %) of faults other than a VMM SIGKILL"), "{}", r.stdout);
    assert!(r.stdout.contains("data mismatches: 0;"), "{}", r.stdout);
    assert!(r.stdout.contains("orphan processes after host down: 0"), "{}", r.stdout);
}

/// The shipped systemd unit supervises the supervisor the way the docs say
/// (and kills only it), and the shipped host.toml is a valid config.
#[test]
fn shipped_unit_and_host_config_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("dist/staunch-host.service")).unwrap();
    for line in ["Type=notify", "Restart=always", "KillMode=process", "WatchdogSec=5s", "NotifyAccess=main"] {
        assert!(unit.lines().any(|l| l.trim() == line), "{line} missing from the unit");
    }
    let cfg = staunch_host::HostConfig::from_file(&root.join("dist/host.toml")).unwrap();
    assert_eq!(cfg.health.hang_ms, 100);
}
