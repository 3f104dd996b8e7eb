//! Real Linux over `staunch net`: Debian's cloud kernel under QEMU (TCG, a
//! real vhost-user-net frontend, `virtio-net-pci`) on a tap in a network
//! namespace this test creates. The guest's busybox answers TCP on port 7
//! (an echo per connection); a client in the namespace keeps one connection
//! busy with numbered requests while the serving backend process is
//! SIGKILLed, dies at its transmit and receive failpoints, hangs and is
//! replaced, and is upgraded to another binary (each time its spare keeps
//! QEMU's connection). Judged by the
//! client (the same TCP connection throughout, every reply the request's
//! own bytes, in order), by QEMU (it never saw the backend go: no
//! reconnect, so no link flap) and by the guest's console (no link down).

mod common;
mod netns;
mod qemulinux;
use common::*;
use netns::Netns;
use qemulinux::{assets, Qemu};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: &str = "10.77.0.2";
const HOST: &str = "10.77.0.1/24";
const TAP: &str = "stap0";

/// What the client saw: requests answered, the longest round trip, and
/// the first thing that went wrong.
struct Seen {
    answered: u64,
    longest: Duration,
    error: Option<String>,
}

/// One TCP connection to the guest's echo, numbered requests until `stop`.
fn client(ns: &str, stop: Arc<AtomicBool>) -> Seen {
    netns::enter(ns);
    let t = Instant::now();
    let s = loop {
        match std::net::TcpStream::connect_timeout(&format!("{GUEST}:7").parse().unwrap(), Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(60) => {
                return Seen { answered: 0, longest: Duration::ZERO, error: Some(format!("connect: {e}")) };
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut seen = Seen { answered: 0, longest: Duration::ZERO, error: None };
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let req = format!("request {} {}\n", seen.answered, "x".repeat((seen.answered % 700) as usize));
        let t = Instant::now();
        if let Err(e) = w.write_all(req.as_bytes()) {
            seen.error = Some(format!("send {}: {e}", seen.answered));
            break;
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(_) if line == req => {}
            Ok(0) => {
                seen.error = Some(format!("the connection closed at request {}", seen.answered));
                break;
            }
            Ok(_) => {
                seen.error = Some(format!("request {}: got {:?}", seen.answered, &line[..line.len().min(80)]));
                break;
            }
            Err(e) => {
                seen.error = Some(format!("request {}: {e}", seen.answered));
                break;
            }
        }
        seen.longest = seen.longest.max(t.elapsed());
        seen.answered += 1;
    }
    seen
}

#[test]
fn linux_over_staunch_net_keeps_a_tcp_connection_through_kills() {
    let a = assets();
    let d = tmpdir("linux-net");
    let ns = Netns::new("n");
    ns.tap(TAP);
    ns.exec(&["ip", "addr", "add", HOST, "dev", TAP]);
    // Run from a copy of the binary, so it can be upgraded in place.
    let mut b = Backend::net(&d, &ns.0, TAP);
    b.run_from_copy(&d);
    let _ = b.start(None);
    let chardev = format!("socket,id=c0,path={},reconnect-ms=10", b.sock.display());
    let mut q = Qemu::start(
        &d,
        &a,
        1,
        &format!("staunch.net={GUEST}/24"),
        &[
            "-chardev",
            &chardev,
            "-netdev",
            "vhost-user,id=n0,chardev=c0",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=",
        ],
    );
    q.wait_for("the guest's network", Duration::from_secs(180), |l| l.contains("STAUNCH net up"));
    let stop = Arc::new(AtomicBool::new(false));
    let (name, stop2) = (ns.0.clone(), stop.clone());
    let talking = std::thread::spawn(move || client(&name, stop2));
    // Let the connection get going, then fault the serving backend, each
    // time after the spare that took over has a spare of its own: SIGKILL,
    // death at the transmit and the receive failpoints, a hang (SIGSTOP,
    // then what a supervisor does: SIGKILL), an upgrade to another binary.
    std::thread::sleep(Duration::from_secs(3));
    let faults = ["kill", "net.tx", "net.rx", "hang", "upgrade", "kill"];
    for fault in faults {
        b.fault(fault);
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = talking.join().unwrap();
    let ev = b.events();
    eprintln!(
        "linux_net: {} requests answered on one connection, longest round trip {:.1} ms, {} takeovers",
        seen.answered,
        seen.longest.as_secs_f64() * 1e3,
        ev.iter().filter(|e| e["event"] == "backend-takeover").count()
    );
    assert_eq!(seen.error, None, "the client's connection\nconsole:\n{}", q.log());
    assert!(seen.answered >= 50, "{} requests", seen.answered);
    // The spare kept QEMU's connection each time (no inflight region for
    // net: the rings went on from the guest's used index).
    let conns: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "backend-takeover")
        .map(|e| e["connection"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(conns, ["kept"; 6], "{ev:?}");
    for point in ["net.tx", "net.rx"] {
        assert!(ev.iter().any(|e| e["event"] == "failpoint-fired" && e["point"] == point), "{point}: {ev:?}");
    }
    assert_eq!(ev.iter().filter(|e| e["event"] == "backend-takeover" && e["upgraded"] == true).count(), 1, "{ev:?}");
    let err = std::fs::read_to_string(d.join("qemu.stderr")).unwrap_or_default();
    assert!(!err.contains("Failed to set msg fds"), "QEMU saw the backend go:\n{err}");
    let log = q.log();
    assert!(!log.contains("Link is Down") && !log.contains("NETDEV WATCHDOG"), "{log}");
    drop(q);
    drop(b);
    drop(ns);
    let _ = std::fs::remove_dir_all(&d);
}
