//! The config store: conformance with Debian's real XenStore clients, the
//! protocol's errors, transactions and quotas, bad input, and kill -9 at
//! every durability failpoint with the acknowledged state checked after
//! restart.

mod common;
use common::*;
use staunch_store::client::{nul, Client};
use staunch_store::wire::Op;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Store {
    child: Child,
    sock: PathBuf,
    data: PathBuf,
}

impl Store {
    fn start(dir: &Path, extra: &[&str]) -> Store {
        let (sock, data) = (dir.join("xs.sock"), dir.join("data"));
        let _ = std::fs::remove_file(&sock);
        let mut c = staunch();
        c.arg("store").arg("--socket").arg(&sock).arg("--data").arg(&data).args(extra);
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t = Instant::now();
        while Client::connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "store did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Store { child, sock, data }
    }

    /// A hot standby of the store serving `sock`, with its own data.
    fn standby(dir: &Path, sock: &Path) -> (Store, PathBuf) {
        let (data, events) = (dir.join("standby-data"), dir.join("standby-events.jsonl"));
        let mut c = staunch();
        c.arg("store").arg("--standby").arg("--socket").arg(sock).arg("--data").arg(&data).arg("--events").arg(&events);
        let log = std::fs::File::create(dir.join("standby.log")).unwrap();
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let t = Instant::now();
        while !std::fs::read_to_string(&events).unwrap_or_default().contains("store-standby-following") {
            assert!(t.elapsed() < Duration::from_secs(60), "standby did not start following");
            std::thread::sleep(Duration::from_millis(5));
        }
        (Store { child, sock: sock.to_path_buf(), data }, events)
    }

    fn client(&self) -> Client {
        Client::connect(&self.sock).unwrap()
    }

    /// Wait for the store to die on its own (an injected kill).
    fn wait_killed(&mut self) {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(s.signal(), Some(libc::SIGKILL), "{s:?}");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "store did not die at the failpoint");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn xs(store: &Store, tool: &str, args: &[&str]) -> (i32, String) {
    xs_at(&store.sock, tool, args)
}

fn xs_at(sock: &Path, tool: &str, args: &[&str]) -> (i32, String) {
    let which = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
    assert!(which.status.success(), "{tool} missing: scripts/setup.sh installs Debian's xenstore-utils");
    let o = Command::new(tool).args(args).env("XENSTORED_PATH", sock).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn store_conformance_with_debian_xenstore_utils() {
    let d = tmpdir("store-xsutils");
    let store = Store::start(&d, &[]);
    assert_eq!(xs(&store, "xenstore-write", &["/vm/1/name", "alpha", "/vm/1/mem", "512"]).0, 0);
    assert_eq!(xs(&store, "xenstore-read", &["/vm/1/name"]), (0, "alpha\n".into()));
    assert_eq!(xs(&store, "xenstore-list", &["/vm/1"]), (0, "mem\nname\n".into()));
    assert_eq!(xs(&store, "xenstore-ls", &["/vm"]).1, "1 = \"\"\n mem = \"512\"\n name = \"alpha\"\n");
    assert_eq!(xs(&store, "xenstore-exists", &["/vm/1/name"]).0, 0);
    assert_ne!(xs(&store, "xenstore-exists", &["/vm/1/nope"]).0, 0);
    assert_ne!(xs(&store, "xenstore-read", &["/vm/9"]).0, 0);
    assert_eq!(xs(&store, "xenstore-chmod", &["/vm/1/name", "n0", "r5"]).0, 0);
    let ls = xs(&store, "xenstore-ls", &["-p", "/vm"]).1;
    assert!(ls.lines().any(|l| l.contains("name = \"alpha\"") && l.ends_with("(n0,r5)")), "{ls}");
    // A watch fires once on registration, then for changes at or below it.
    // Its first line (the registration firing) says it is in place.
    let mut watch = Command::new("xenstore-watch")
        .args(["-n", "3", "/vm/1"])
        .env("XENSTORED_PATH", &store.sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first).unwrap();
    assert_eq!(first, "/vm/1\n");
    assert_eq!(xs(&store, "xenstore-write", &["/vm/1/state", "running"]).0, 0);
    assert_eq!(xs(&store, "xenstore-write", &["/vm/2/state", "ignored"]).0, 0);
    assert_eq!(xs(&store, "xenstore-rm", &["/vm/1/mem"]).0, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).unwrap();
    assert!(watch.wait().unwrap().success());
    assert_eq!(rest, "/vm/1/state\n/vm/1/mem\n");
    assert_eq!(xs(&store, "xenstore-list", &["/vm/1"]), (0, "name\nstate\n".into()));
    assert_eq!(xs(&store, "xenstore-rm", &["/vm"]).0, 0);
    assert_eq!(xs(&store, "xenstore-list", &["/"]).1, "");
}

#[test]
fn store_errors_transactions_permissions_and_quotas() {
    let d = tmpdir("store-proto");
    let store = Store::start(&d, &["--quota-nodes", "4", "--quota-watches", "4", "--quota-transactions", "2"]);
    let mut a = store.client();
    let mut b = store.client();
    assert_eq!(a.read_value(0, "/missing").unwrap(), Err("ENOENT".into()));
    assert_eq!(a.read_value(0, "/bad//path").unwrap(), Err("EINVAL".into()));
    assert_eq!(a.write_value(0, "/k", b"0").unwrap(), Ok(b"OK\0".to_vec()));
    // Optimistic transactions: a conflicting commit fails with EAGAIN.
    let t = a.transaction_start().unwrap().unwrap();
    assert_eq!(a.read_value(t, "/k").unwrap(), Ok(b"0".to_vec()));
    a.write_value(t, "/k", b"a").unwrap().unwrap();
    a.write_value(t, "/k2", b"a").unwrap().unwrap();
    assert_eq!(b.read_value(0, "/k2").unwrap(), Err("ENOENT".into()), "uncommitted write visible");
    b.write_value(0, "/k", b"b").unwrap().unwrap();
    assert_eq!(a.transaction_end(t, true).unwrap(), Err("EAGAIN".into()));
    assert_eq!(b.read_value(0, "/k2").unwrap(), Err("ENOENT".into()));
    let t = a.transaction_start().unwrap().unwrap();
    a.write_value(t, "/k2", b"c").unwrap().unwrap();
    a.transaction_end(t, true).unwrap().unwrap();
    assert_eq!(b.read_value(0, "/k2").unwrap(), Ok(b"c".to_vec()));
    assert_eq!(a.transaction_end(99, true).unwrap(), Err("ENOENT".into()));
    let (t1, t2) = (a.transaction_start().unwrap().unwrap(), a.transaction_start().unwrap().unwrap());
    assert_eq!(a.transaction_start().unwrap(), Err("EQUOTA".into()));
    a.transaction_end(t1, false).unwrap().unwrap();
    a.transaction_end(t2, false).unwrap().unwrap();
    // Permissions: domain 5 (a connection that dropped its privilege).
    a.write_value(0, "/local/domain/5/name", b"five").unwrap().unwrap();
    a.request(Op::SetPerms, 0, &nul(&["/local/domain/5", "n5"])).unwrap().unwrap();
    let mut g = store.client();
    g.request(Op::Control, 0, &nul(&["restrict", "5"])).unwrap().unwrap();
    assert_eq!(g.read_value(0, "/k").unwrap(), Err("EACCES".into()));
    assert_eq!(g.read_value(0, "name").unwrap(), Err("EACCES".into()), "dom0's node under 5's home");
    g.write_value(0, "data/a", b"1").unwrap().unwrap();
    assert_eq!(g.read_value(0, "/local/domain/5/data/a").unwrap(), Ok(b"1".to_vec()));
    g.write_value(0, "data/b", b"1").unwrap().unwrap();
    assert_eq!(g.write_value(0, "data/c", b"1").unwrap(), Err("EQUOTA".into()));
    assert_eq!(g.write_value(0, "data/a", &[b'x'; 3000]).unwrap(), Err("E2BIG".into()));
    assert_eq!(g.request(Op::Control, 0, &nul(&["restrict", "0"])).unwrap(), Err("EINVAL".into()));
    let perms = a.request(Op::GetPerms, 0, &nul(&["/local/domain/5/data/a"])).unwrap().unwrap();
    assert_eq!(perms, nul(&["n5"]));
    // Watches: relative paths come back relative; special paths fire on
    // introduce/release; the watch quota holds.
    g.request(Op::Watch, 0, &nul(&["data", "tok"])).unwrap().unwrap();
    assert_eq!(g.next_event(Duration::from_secs(30)).unwrap(), Some(("data".into(), "tok".into())));
    a.write_value(0, "/local/domain/5/data/a", b"2").unwrap().unwrap();
    assert_eq!(g.next_event(Duration::from_secs(30)).unwrap(), Some(("data/a".into(), "tok".into())));
    a.request(Op::Watch, 0, &nul(&["@introduceDomain", "i"])).unwrap().unwrap();
    assert_eq!(a.next_event(Duration::from_secs(30)).unwrap(), Some(("@introduceDomain".into(), "i".into())));
    a.request(Op::Introduce, 0, &nul(&["7", "0", "0"])).unwrap().unwrap();
    assert_eq!(a.next_event(Duration::from_secs(30)).unwrap(), Some(("@introduceDomain".into(), "i".into())));
    assert_eq!(a.request(Op::IsDomainIntroduced, 0, &nul(&["7"])).unwrap(), Ok(b"T\0".to_vec()));
    assert_eq!(g.request(Op::Introduce, 0, &nul(&["8", "0", "0"])).unwrap(), Err("EACCES".into()));
    for i in 0..3 {
        a.request(Op::Watch, 0, &nul(&["/w", &i.to_string()])).unwrap().unwrap();
    }
    assert_eq!(a.request(Op::Watch, 0, &nul(&["/w", "9"])).unwrap(), Err("EQUOTA".into()));
    assert_eq!(a.request(Op::GetDomainPath, 0, &nul(&["3"])).unwrap(), Ok(b"/local/domain/3\0".to_vec()));
}

#[test]
fn store_bad_input_gets_errors_and_hurts_no_one() {
    use std::io::{Read, Write};
    let d = tmpdir("store-bad");
    let store = Store::start(&d, &[]);
    let mut good = store.client();
    good.write_value(0, "/keep", b"v").unwrap().unwrap();
    let raw = |bytes: &[u8]| {
        let mut s = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
        s.write_all(bytes).unwrap();
        s
    };
    let hdr = |ty: u32, len: u32| staunch_store::wire::Header { ty, req_id: 1, tx_id: 0, len }.bytes();
    // Oversized: an error, then the connection is closed (the read ends).
    let mut s = raw(&hdr(2, 1 << 20));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = Vec::new();
    s.read_to_end(&mut r).expect("the store did not close the connection");
    assert!(r.ends_with(b"E2BIG\0"), "{r:?}");
    // Truncated payload, then the client goes away.
    let mut m = hdr(11, 100).to_vec();
    m.extend_from_slice(b"/x\0");
    drop(raw(&m));
    // Unknown type, a path that is not one, bytes that are not UTF-8, a
    // request with a bogus transaction id.
    let mut c = store.client();
    assert_eq!(c.request(Op::Read, 0, b"\xff\xfe\0").unwrap(), Err("EINVAL".into()));
    assert_eq!(c.read_value(0, "/a b").unwrap(), Err("EINVAL".into()));
    assert_eq!(c.read_value(0, &format!("/{}", "a".repeat(4000))).unwrap(), Err("EINVAL".into()));
    assert_eq!(c.read_value(4242, "/keep").unwrap(), Err("ENOENT".into()));
    assert_eq!(c.request(Op::Write, 0, b"no-nul").unwrap(), Err("EINVAL".into()));
    let mut s = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
    s.write_all(&staunch_store::wire::encode(99, 5, 0, b"")).unwrap();
    let reply = staunch_store::wire::read_msg(&mut s).unwrap();
    assert_eq!((reply.header.ty, reply.payload), (Op::Error as u32, b"EINVAL\0".to_vec()));
    // A flood of watches meets the quota; random garbage closes only its
    // own connection.
    let mut f = store.client();
    let refused = (0..200).filter(|i| f.request(Op::Watch, 0, &nul(&["/f", &i.to_string()])).unwrap().is_err()).count();
    assert_eq!(refused, 200 - 128);
    let mut x = 0x9e3779b97f4a7c15u64;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut s = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
        let _ = s.write_all(&junk);
    }
    // Everyone else is fine.
    assert_eq!(good.read_value(0, "/keep").unwrap(), Ok(b"v".to_vec()));
    assert!(store.client().read_value(0, "/keep").unwrap().is_ok());

    // A flood of connections: beyond the limit they are closed; the store
    // and its clients carry on, and freed places are served again.
    let d = tmpdir("store-conn-flood");
    let store = Store::start(&d, &["--max-connections", "8"]);
    // Each of the 8 confirmed served: the store may still count the probe
    // connection of `Store::start` for a moment (it has closed, but the
    // store has not seen it go), and refuse one of them meanwhile; a
    // refused client retries. Then the store holds exactly these 8.
    let mut held: Vec<Client> = (0..8)
        .map(|_| {
            let mut c = store.client();
            c.reconnect_for = Duration::from_secs(60);
            assert!(c.read_value(0, "/").unwrap().is_ok());
            c
        })
        .collect();
    let mut extra = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = extra.write_all(&staunch_store::wire::encode(Op::Read as u32, 1, 0, b"/\0"));
    let mut buf = [0u8; 16];
    // Closed by the store: end of file or a reset, not an answer, and not
    // the read timing out.
    let r = extra.read(&mut buf);
    assert!(
        matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a ninth connection was not closed: {r:?}"
    );
    assert!(held[0].read_value(0, "/").unwrap().is_ok());
    // A freed place is served again once the store has seen it go; the
    // client retries a closed connection until then.
    held.pop();
    let mut again = store.client();
    again.reconnect_for = Duration::from_secs(60);
    assert!(again.read_value(0, "/").unwrap().is_ok());
}

/// kill -9 at every durability failpoint: after restart, every acknowledged
/// write is there, the write in flight is all there or not at all, and an
/// interrupted transaction left nothing behind.
#[test]
fn store_kill9_at_every_failpoint_keeps_acknowledged_state() {
    for (point, action, victim) in [
        ("store.wal.append", "kill", "write"),
        ("store.wal.torn", "corrupt", "write"),
        ("store.wal.synced", "kill", "write"),
        ("store.tx.commit", "kill", "tx"),
        ("store.wal.synced", "kill", "tx"),
        ("store.compact.snapshot", "kill", "compact"),
        ("store.compact.renamed", "kill", "compact"),
        ("store.request", "kill", "write"),
    ] {
        let d = tmpdir(&format!("store-kill-{point}-{victim}"));
        let mut store = Store::start(&d, &[]);
        let mut c = store.client();
        c.reconnect_for = Duration::ZERO; // this store is meant to die
        for i in 0..20 {
            c.write_value(0, &format!("/acked/{i}"), format!("v{i}").as_bytes()).unwrap().unwrap();
        }
        c.request(Op::Rm, 0, &nul(&["/acked/3"])).unwrap().unwrap();
        let t = c.transaction_start().unwrap().unwrap();
        c.write_value(t, "/tx/a", b"1").unwrap().unwrap();
        c.transaction_end(t, true).unwrap().unwrap();
        c.request(Op::Control, 0, &nul(&["failpoint", &format!("{point}={action}")])).unwrap().unwrap();
        let r = match victim {
            "write" => c.write_value(0, "/victim", &[7u8; 1000]),
            "tx" => {
                let t = c.transaction_start().unwrap().unwrap();
                c.write_value(t, "/txv/a", b"1").unwrap().unwrap();
                c.write_value(t, "/txv/b", b"2").unwrap().unwrap();
                c.transaction_end(t, true)
            }
            _ => c.request(Op::Control, 0, &nul(&["compact"])),
        };
        // The client sees the connection go (a transaction comes back EAGAIN).
        let died = match &r {
            Err(_) => true,
            Ok(Err(e)) => e == "EAGAIN",
            Ok(Ok(_)) => false,
        };
        assert!(died, "{point}: the store answered {r:?} instead of dying");
        store.wait_killed();
        drop(store);

        let store = Store::start(&d, &[]);
        let mut c = store.client();
        for i in 0..20 {
            let want = if i == 3 { Err("ENOENT".into()) } else { Ok(format!("v{i}").into_bytes()) };
            assert_eq!(c.read_value(0, &format!("/acked/{i}")).unwrap(), want, "{point}/{victim}: /acked/{i}");
        }
        assert_eq!(c.read_value(0, "/tx/a").unwrap(), Ok(b"1".to_vec()), "{point}/{victim}");
        let v = c.read_value(0, "/victim").unwrap();
        assert!(v == Err("ENOENT".into()) || v == Ok(vec![7u8; 1000]), "{point}: a partial write survived: {v:?}");
        if point == "store.wal.append" || point == "store.wal.torn" || point == "store.request" {
            assert_eq!(v, Err("ENOENT".into()), "{point}: a write that never reached the log");
        }
        let (a, b) = (c.read_value(0, "/txv/a").unwrap(), c.read_value(0, "/txv/b").unwrap());
        assert_eq!(a.is_ok(), b.is_ok(), "{point}: half a transaction survived");
        assert!(store.data.join("store.log").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// kill -9 of the primary under a steady stream of writes: the standby takes
/// the socket over, the client reconnects on its own, every acknowledged
/// write is there, and a watch registered before the failover still fires.
#[test]
fn store_standby_takes_over_with_no_acknowledged_write_lost() {
    let d = tmpdir("store-failover");
    let mut primary = Store::start(&d, &[]);
    let (standby, events) = Store::standby(&d, &primary.sock);
    let mut c = primary.client();
    let mut w = primary.client();
    c.reconnect_for = Duration::from_secs(60);
    w.reconnect_for = Duration::from_secs(60);
    w.request(Op::Watch, 0, &nul(&["/after", "t"])).unwrap().unwrap();
    assert_eq!(w.next_event(Duration::from_secs(30)).unwrap(), Some(("/after".into(), "t".into())));
    let mut acked = Vec::new();
    for i in 0..600u32 {
        if i == 200 {
            let _ = primary.child.kill(); // SIGKILL
            let _ = primary.child.wait();
        }
        match c.write_value(0, &format!("/w/{i}"), i.to_string().as_bytes()).unwrap() {
            Ok(_) => acked.push(i),
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    assert!(c.reconnects >= 1, "the client never noticed the failover");
    assert_eq!(acked.len(), 600);
    // Everything acknowledged, by either store, is served by the standby.
    let mut check = standby.client();
    for i in &acked {
        assert_eq!(check.read_value(0, &format!("/w/{i}")).unwrap(), Ok(i.to_string().into_bytes()), "/w/{i}");
    }
    // The watch came back by itself: its re-registration fires once (the
    // client re-reads what it watches), then changes fire as before.
    assert_eq!(w.next_event(Duration::from_secs(30)).unwrap(), Some(("/after".into(), "t".into())));
    assert!(w.reconnects >= 1);
    check.write_value(0, "/after/x", b"1").unwrap().unwrap();
    assert_eq!(w.next_event(Duration::from_secs(30)).unwrap(), Some(("/after/x".into(), "t".into())));
    let ev = std::fs::read_to_string(&events).unwrap();
    let failover: serde_json::Value = ev
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "store-failover")
        .expect("failover event");
    assert_eq!(failover["outcome"], "standby serving", "{failover}");
    // The standby's own log holds it all.
    drop(check);
    let data = standby.data.clone();
    drop(standby);
    let (_, tree, _) = staunch_store::wal::Wal::open(&data).unwrap();
    for i in &acked {
        assert_eq!(tree.get(&format!("/w/{i}")).map(|n| n.value.clone()), Some(i.to_string().into_bytes()));
    }
    // It took over with exactly what the primary had acknowledged: the tree
    // now less the 400 writes made after the kill and /after/x (with /after).
    assert_eq!(failover["nodes"].as_u64(), Some(tree.len() as u64 - 400 - 2), "{failover}");
}

fn scrub(c: &mut Client) -> serde_json::Value {
    let r = c.request(Op::Control, 0, &nul(&["scrub"])).unwrap().unwrap();
    serde_json::from_slice(r.strip_suffix(&[0]).unwrap()).unwrap()
}

/// Corrupted bytes in memory and in the log file are found by a scrub and
/// repaired from the healthy copy; damage to both makes the store refuse to
/// serve; a corrupted snapshot keeps a store from starting at all.
#[test]
fn store_scrub_detects_and_repairs_corruption() {
    let d = tmpdir("store-scrub");
    let mut primary = Store::start(&d, &["--scrub-secs", "0", "--events", d.join("events.jsonl").to_str().unwrap()]);
    let (_standby, _) = Store::standby(&d, &primary.sock);
    let mut c = primary.client();
    for i in 0..50 {
        c.write_value(0, &format!("/vm/{i}/name"), format!("vm-{i}").as_bytes()).unwrap().unwrap();
    }
    let r = scrub(&mut c);
    assert_eq!((r["sound"].as_bool(), r["disk_ok"].as_bool()), (Some(true), Some(true)), "{r}");
    assert_eq!(r["standby"], serde_json::json!(["match"]), "{r}");

    // A node corrupted in memory: found, put back from the disk's copy.
    c.request(Op::Control, 0, &nul(&["corrupt-memory", "/vm/7/name"])).unwrap().unwrap();
    let r = scrub(&mut c);
    assert_eq!(r["memory_bad"], serde_json::json!(["/vm/7/name"]), "{r}");
    assert_eq!(r["repaired"], serde_json::json!(["memory:/vm/7/name"]), "{r}");
    assert_eq!(c.read_value(0, "/vm/7/name").unwrap(), Ok(b"vm-7".to_vec()));

    // Bytes flipped in the log file: the disk copy is written again from
    // the (verified) memory.
    let log = primary.data.join("store.log");
    let mut b = std::fs::read(&log).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&log, &b).unwrap();
    let r = scrub(&mut c);
    assert_eq!((r["disk_ok"].as_bool(), r["sound"].as_bool()), (Some(false), Some(true)), "{r}");
    assert_eq!(r["repaired"], serde_json::json!(["disk"]), "{r}");
    let (tree, _) = staunch_store::wal::Wal::verify(&primary.data).unwrap();
    assert_eq!(tree.get("/vm/49/name").unwrap().value, b"vm-49");
    assert_eq!(scrub(&mut c)["repaired"], serde_json::json!([]));

    // A node corrupted in the standby's memory: its copy no longer matches
    // the primary's; the scrub sends it a fresh snapshot.
    c.request(Op::Control, 0, &nul(&["corrupt-standby", "/vm/11/name"])).unwrap().unwrap();
    let r = scrub(&mut c);
    assert_eq!(r["standby"], serde_json::json!(["diverged: resynced"]), "{r}");
    assert_eq!(scrub(&mut c)["standby"], serde_json::json!(["match"]));

    // Memory and disk both damaged: no healthy copy here: refuse to serve.
    c.request(Op::Control, 0, &nul(&["corrupt-memory", "/vm/3/name"])).unwrap().unwrap();
    std::fs::write(primary.data.join("store.snap"), b"STNCHSNP-garbage-garbage").unwrap();
    let r = scrub(&mut c);
    assert_eq!(r["sound"].as_bool(), Some(false), "{r}");
    assert_eq!(c.read_value(0, "/vm/1/name").unwrap(), Err("EIO".into()));
    let events = std::fs::read_to_string(d.join("events.jsonl")).unwrap();
    for kind in ["store-repaired", "store-unsound"] {
        assert!(events.contains(&format!("\"event\":\"{kind}\"")), "{kind} missing:\n{events}");
    }
    let _ = primary.child.kill();
    let _ = primary.child.wait();

    // A store whose snapshot fails its CRC does not start.
    let o = staunch()
        .arg("store")
        .arg("--socket")
        .arg(d.join("other.sock"))
        .arg("--data")
        .arg(&primary.data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupted"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// One connection speaking raw wire messages: each reply must echo the
/// request's id and transaction id; an error reply comes back as its name.
struct Raw {
    s: std::os::unix::net::UnixStream,
    req: u32,
}

impl Raw {
    fn connect(store: &Store) -> Raw {
        let s = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s, req: 100 }
    }

    fn ask(&mut self, op: Op, tx: u32, payload: &[u8]) -> Result<Vec<u8>, String> {
        use std::io::Write;
        self.req += 1;
        self.s.write_all(&staunch_store::wire::encode(op as u32, self.req, tx, payload)).unwrap();
        let m = loop {
            let m = staunch_store::wire::read_msg(&mut self.s).unwrap();
            if m.header.ty != Op::WatchEvent as u32 {
                break m;
            }
        };
        assert_eq!((m.header.req_id, m.header.tx_id), (self.req, tx), "reply to {op:?} does not echo its ids");
        if m.header.ty == Op::Error as u32 {
            return Err(String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap_or(&m.payload)).into_owned());
        }
        assert_eq!(m.header.ty, op as u32);
        Ok(m.payload)
    }
}

/// A transaction reads the store as of its start. The full sequence mixes
/// reads and writes in one transaction, which no xenstore-utils tool can
/// do (each runs one kind of operation per transaction: see
/// `store_transaction_snapshot_with_debian_xenstore_utils`), so it runs
/// here with the Rust client (`a`) and raw wire messages (`b`).
#[test]
fn store_transaction_reads_the_store_as_of_its_start() {
    let d = tmpdir("store-tx-snapshot");
    let store = Store::start(&d, &[]);
    let mut a = store.client();
    let mut b = Raw::connect(&store);
    a.write_value(0, "/A", b"old").unwrap().unwrap();
    let t = a.transaction_start().unwrap().unwrap();
    assert_eq!(a.read_value(t, "/A").unwrap(), Ok(b"old".to_vec()));
    b.ask(Op::Write, 0, b"/A\0outside").unwrap();
    assert_eq!(a.read_value(t, "/A").unwrap(), Ok(b"old".to_vec()), "a write outside showed through");
    a.write_value(t, "/A", b"inside").unwrap().unwrap();
    assert_eq!(a.read_value(t, "/A").unwrap(), Ok(b"inside".to_vec()));
    assert_eq!(b.ask(Op::Read, 0, &nul(&["/A"])), Ok(b"outside".to_vec()), "an uncommitted write leaked");
    assert_eq!(a.transaction_end(t, true).unwrap(), Err("EAGAIN".into()));
    assert_eq!(a.read_value(0, "/A").unwrap(), Ok(b"outside".to_vec()));

    // The same, the transaction on the raw connection.
    let t = String::from_utf8(b.ask(Op::TransactionStart, 0, b"\0").unwrap()).unwrap();
    let t: u32 = t.trim_end_matches('\0').parse().unwrap();
    assert_eq!(b.ask(Op::Read, t, &nul(&["/A"])), Ok(b"outside".to_vec()));
    a.write_value(0, "/A", b"third").unwrap().unwrap();
    assert_eq!(b.ask(Op::Read, t, &nul(&["/A"])), Ok(b"outside".to_vec()));
    b.ask(Op::Write, t, b"/A\0mine").unwrap();
    assert_eq!(b.ask(Op::Read, t, &nul(&["/A"])), Ok(b"mine".to_vec()));
    assert_eq!(b.ask(Op::TransactionEnd, t, b"T\0"), Err("EAGAIN".into()));
    assert_eq!(a.read_value(0, "/A").unwrap(), Ok(b"third".to_vec()));

    // Listings, permissions and existence come from the snapshot too: a
    // node created outside is not there, a removed one still is.
    for (p, v) in [("/d/x", "1"), ("/d/y", "2"), ("/gone/sub", "g"), ("/p", "p")] {
        a.write_value(0, p, v.as_bytes()).unwrap().unwrap();
    }
    let t = a.transaction_start().unwrap().unwrap();
    b.ask(Op::Write, 0, b"/d/z\0new").unwrap();
    b.ask(Op::Write, 0, b"/created\0new").unwrap();
    b.ask(Op::Rm, 0, &nul(&["/gone"])).unwrap();
    b.ask(Op::Rm, 0, &nul(&["/d/y"])).unwrap();
    b.ask(Op::SetPerms, 0, &nul(&["/p", "n0", "r5"])).unwrap();
    b.ask(Op::Write, 0, b"/p\0changed").unwrap();
    assert_eq!(a.request(Op::Directory, t, &nul(&["/d"])).unwrap(), Ok(nul(&["x", "y"])));
    let part = a.request(Op::DirectoryPart, t, &nul(&["/d", "0"])).unwrap().unwrap();
    assert!(part.ends_with(b"\0x\0y\0\0"), "{part:?}");
    assert_eq!(a.request(Op::Directory, 0, &nul(&["/d"])).unwrap(), Ok(nul(&["x", "z"])));
    assert_eq!(a.read_value(t, "/d/y").unwrap(), Ok(b"2".to_vec()));
    assert_eq!(a.read_value(t, "/d/z").unwrap(), Err("ENOENT".into()));
    assert_eq!(a.read_value(t, "/created").unwrap(), Err("ENOENT".into()));
    assert_eq!(a.read_value(t, "/gone/sub").unwrap(), Ok(b"g".to_vec()));
    assert_eq!(a.request(Op::Directory, t, &nul(&["/gone"])).unwrap(), Ok(nul(&["sub"])));
    assert_eq!(a.request(Op::GetPerms, t, &nul(&["/p"])).unwrap(), Ok(nul(&["n0"])));
    assert_eq!(a.request(Op::GetPerms, 0, &nul(&["/p"])).unwrap(), Ok(nul(&["n0", "r5"])));
    assert_eq!(a.read_value(t, "/p").unwrap(), Ok(b"p".to_vec()));
    assert_eq!(a.request(Op::Directory, t, &nul(&["/"])).unwrap(), Ok(nul(&["A", "d", "gone", "p"])));
    // Writing under a node removed outside: the transaction sees it, the
    // commit cannot apply it.
    a.write_value(t, "/gone/sub2", b"x").unwrap().unwrap();
    assert_eq!(a.transaction_end(t, true).unwrap(), Err("EAGAIN".into()));
    assert_eq!(a.read_value(0, "/gone/sub2").unwrap(), Err("ENOENT".into()));
    // A transaction that read nothing changed outside commits.
    let t = a.transaction_start().unwrap().unwrap();
    assert_eq!(a.read_value(t, "/d/x").unwrap(), Ok(b"1".to_vec()));
    b.ask(Op::Write, 0, b"/elsewhere\0e").unwrap();
    a.write_value(t, "/d/x", b"11").unwrap().unwrap();
    a.transaction_end(t, true).unwrap().unwrap();
    assert_eq!(a.read_value(0, "/d/x").unwrap(), Ok(b"11".to_vec()));
}

/// Watches fire when a transaction commits, not while it runs, and never
/// for one aborted or failed.
#[test]
fn store_transaction_watches_fire_only_on_commit() {
    let d = tmpdir("store-tx-watch");
    let store = Store::start(&d, &[]);
    let mut a = store.client();
    let mut w = store.client();
    a.write_value(0, "/wt/k", b"0").unwrap().unwrap();
    w.request(Op::Watch, 0, &nul(&["/wt", "tok"])).unwrap().unwrap();
    assert_eq!(w.next_event(Duration::from_secs(2)).unwrap(), Some(("/wt".into(), "tok".into())));
    let quiet = Duration::from_millis(200);
    let t = a.transaction_start().unwrap().unwrap();
    a.write_value(t, "/wt/a", b"1").unwrap().unwrap();
    a.request(Op::Rm, t, &nul(&["/wt/k"])).unwrap().unwrap();
    assert_eq!(w.next_event(quiet).unwrap(), None, "a watch fired before the commit");
    a.transaction_end(t, true).unwrap().unwrap();
    let mut got = vec![w.next_event(Duration::from_secs(2)).unwrap(), w.next_event(Duration::from_secs(2)).unwrap()];
    got.sort();
    assert_eq!(got, vec![Some(("/wt/a".into(), "tok".into())), Some(("/wt/k".into(), "tok".into()))]);
    assert_eq!(w.next_event(quiet).unwrap(), None);
    // Aborted: nothing.
    let t = a.transaction_start().unwrap().unwrap();
    a.write_value(t, "/wt/b", b"1").unwrap().unwrap();
    a.transaction_end(t, false).unwrap().unwrap();
    assert_eq!(w.next_event(quiet).unwrap(), None);
    // Failed with EAGAIN: only the outside write fires.
    let t = a.transaction_start().unwrap().unwrap();
    a.write_value(t, "/wt/a", b"2").unwrap().unwrap();
    let mut b = store.client();
    b.write_value(0, "/wt/a", b"3").unwrap().unwrap();
    assert_eq!(w.next_event(Duration::from_secs(2)).unwrap(), Some(("/wt/a".into(), "tok".into())));
    assert_eq!(a.transaction_end(t, true).unwrap(), Err("EAGAIN".into()));
    assert_eq!(w.next_event(quiet).unwrap(), None);
}

/// One request a tool made and the store's answer: (request type,
/// transaction id, reply type, reply payload).
type Exchange = (u32, u32, u32, Vec<u8>);

/// Run a real xenstore-utils `tool` through a proxy that hands its messages
/// to the store one at a time, so the test can act outside the tool's
/// transaction between two of its requests: `between(n)` runs once the
/// store answered the tool's `n`th request inside a transaction, before the
/// tool sees the answer. Returns the tool's exit code and output, and every
/// exchange in order.
fn xs_through(
    store: &Store,
    tool: &str,
    args: &[&str],
    mut between: impl FnMut(usize) + Send,
) -> ((i32, String), Vec<Exchange>) {
    use staunch_store::wire::{encode, read_msg};
    use std::io::Write;
    let psock = store.sock.with_file_name("proxy.sock");
    let _ = std::fs::remove_file(&psock);
    let listener = std::os::unix::net::UnixListener::bind(&psock).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::scope(|sc| {
        let proxy = sc.spawn(|| {
            let t = Instant::now();
            let mut down = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "{tool} never connected: {e}"),
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            down.set_nonblocking(false).unwrap();
            down.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut up = std::os::unix::net::UnixStream::connect(&store.sock).unwrap();
            let (mut log, mut n) = (Vec::new(), 0);
            while let Ok(req) = read_msg(&mut down) {
                let h = req.header;
                up.write_all(&encode(h.ty, h.req_id, h.tx_id, &req.payload)).unwrap();
                let reply = read_msg(&mut up).unwrap();
                if h.tx_id != 0 && h.ty != Op::TransactionEnd as u32 {
                    between(n);
                    n += 1;
                }
                let r = reply.header;
                down.write_all(&encode(r.ty, r.req_id, r.tx_id, &reply.payload)).unwrap();
                log.push((h.ty, h.tx_id, r.ty, reply.payload));
            }
            log
        });
        let out = xs_at(&psock, tool, args);
        (out, proxy.join().unwrap())
    })
}

/// The replies to the requests of type `op`, errors as `E...` names.
fn replies(log: &[Exchange], op: Op) -> Vec<Result<Vec<u8>, String>> {
    log.iter()
        .filter(|e| e.0 == op as u32)
        .map(|e| {
            if e.2 == Op::Error as u32 {
                Err(String::from_utf8_lossy(e.3.strip_suffix(&[0]).unwrap_or(&e.3)).into_owned())
            } else {
                Ok(e.3.clone())
            }
        })
        .collect()
}

/// Snapshot isolation seen by Debian's real clients. xenstore-read, -list,
/// -exists, -write, -rm and -chmod run all their arguments in one
/// transaction (and retry it on EAGAIN); xenstore-ls uses none, so no tool
/// reads permissions in a transaction, and none mixes reads and writes in
/// one (that part runs with the Rust client in
/// `store_transaction_reads_the_store_as_of_its_start`). A proxy lets the
/// test change the store between two of a tool's requests.
#[test]
fn store_transaction_snapshot_with_debian_xenstore_utils() {
    let d = tmpdir("store-tx-xsutils");
    let store = Store::start(&d, &[]);
    let mut out = store.client();
    assert_eq!(xs(&store, "xenstore-write", &["/A", "old", "/d/x", "1", "/d/y", "2", "/gone", "g"]).0, 0);
    let ok = |v: &str| Ok(v.as_bytes().to_vec());
    let again = || Err("EAGAIN".to_string());

    // Read A, A written outside, read A again: the old value; the commit
    // fails and the tool's retry reads the new one.
    let (r, log) = xs_through(&store, "xenstore-read", &["/A", "/A"], |n| {
        if n == 0 {
            out.write_value(0, "/A", b"new").unwrap().unwrap();
        }
    });
    assert_eq!(replies(&log, Op::Read), vec![ok("old"), ok("old"), ok("new"), ok("new")], "{log:?}");
    assert_eq!(replies(&log, Op::TransactionEnd), vec![again(), ok("OK\0")]);
    assert_eq!(r, (0, "new\nnew\n".into()));

    // A listing keeps its snapshot: a child created outside is not in it.
    let (r, log) = xs_through(&store, "xenstore-list", &["/d", "/d"], |n| {
        if n == 0 {
            out.write_value(0, "/d/z", b"3").unwrap().unwrap();
        }
    });
    let (xy, xyz) = (ok("x\0y\0"), ok("x\0y\0z\0"));
    assert_eq!(replies(&log, Op::Directory), vec![xy.clone(), xy, xyz.clone(), xyz], "{log:?}");
    assert_eq!(replies(&log, Op::TransactionEnd), vec![again(), ok("OK\0")]);
    assert_eq!(r, (0, "x\ny\nz\nx\ny\nz\n".into()));

    // A node created outside after the transaction started does not exist
    // in it (the tool then aborts and fails).
    let (r, log) = xs_through(&store, "xenstore-exists", &["/A", "/made"], |n| {
        if n == 0 {
            out.write_value(0, "/made", b"m").unwrap().unwrap();
        }
    });
    assert_eq!(replies(&log, Op::Read), vec![ok("new"), Err("ENOENT".into())], "{log:?}");
    assert_ne!(r.0, 0);

    // A node removed outside is still there in the transaction.
    let (r, log) = xs_through(&store, "xenstore-read", &["/A", "/gone"], |n| {
        if n == 0 {
            out.request(Op::Rm, 0, &nul(&["/gone"])).unwrap().unwrap();
        }
    });
    let reads = replies(&log, Op::Read);
    assert_eq!(reads[..2], [ok("new"), ok("g")], "{log:?}");
    assert_eq!(replies(&log, Op::TransactionEnd)[0], again());
    assert_eq!(reads[2..], [ok("new"), Err("ENOENT".into())]);
    assert_ne!(r.0, 0);

    // Writes: seen by no one else, and watches fire only at the commit.
    let mut w = store.client();
    w.request(Op::Watch, 0, &nul(&["/W", "t"])).unwrap().unwrap();
    assert_eq!(w.next_event(Duration::from_secs(2)).unwrap(), Some(("/W".into(), "t".into())));
    let (r, _) = xs_through(&store, "xenstore-write", &["/W/1", "a", "/W/2", "b"], |_| {
        assert_eq!(out.read_value(0, "/W/1").unwrap(), Err("ENOENT".into()), "an uncommitted write leaked");
        assert_eq!(w.next_event(Duration::from_millis(100)).unwrap(), None, "a watch fired before the commit");
    });
    assert_eq!(r.0, 0);
    let mut got: Vec<String> = (0..2).map(|_| w.next_event(Duration::from_secs(2)).unwrap().unwrap().0).collect();
    got.sort();
    assert_eq!(got, ["/W/1", "/W/2"]);
    assert_eq!(xs(&store, "xenstore-read", &["/W/1", "/W/2"]), (0, "a\nb\n".into()));
}
