//! Network namespaces for the network tests: created per test, removed on
//! drop, so traffic stays inside what the test built.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Netns(pub String);

pub fn ip(args: &[&str]) {
    let s = Command::new("ip").args(args).status().expect("ip(8)");
    assert!(s.success(), "ip {args:?}: {s}");
}

impl Netns {
    /// A namespace named after `tag` and this process, its loopback up.
    pub fn new(tag: &str) -> Netns {
        // Unique per test, also when tests of one binary run at once.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("st{tag}{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        ip(&["netns", "add", &name]);
        let n = Netns(name);
        n.exec(&["ip", "link", "set", "lo", "up"]);
        n
    }

    pub fn exec(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.0];
        a.extend(args);
        ip(&a);
    }

    /// A persistent tap (with the virtio-net header) that a backend attaches to.
    pub fn tap(&self, tap: &str) {
        self.exec(&["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        self.exec(&["ip", "link", "set", tap, "up"]);
    }

    /// A bridge with `taps` on it, all up.
    pub fn bridge(&self, br: &str, taps: &[&str]) {
        self.exec(&["ip", "link", "add", br, "type", "bridge"]);
        self.exec(&["ip", "link", "set", br, "up"]);
        for t in taps {
            self.tap(t);
            self.exec(&["ip", "link", "set", t, "master", br]);
        }
    }
}

/// Move the calling thread into namespace `name` (sockets it opens then
/// live there).
pub fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns on a namespace file we opened; it affects this thread only.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `staunch net-peer --echo` on an interface of a namespace: answers the
/// guest's numbered frames and counts them; its counts at the end.
pub struct Peer {
    child: Option<Child>,
    out: PathBuf,
}

impl Peer {
    pub fn echo(ns: &Netns, iface: &str, dir: &Path) -> Peer {
        let out = dir.join("peer.jsonl");
        let f = std::fs::File::create(&out).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_staunch"), "net-peer", "--echo", "--iface", iface])
            .stdin(Stdio::null())
            .stdout(f)
            .spawn()
            .unwrap();
        Peer { child: Some(child), out }
    }

    /// Stop it (SIGTERM) and read its final counts.
    pub fn finish(mut self) -> serde_json::Value {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our child (`ip netns exec` execs the peer).
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
        let text = std::fs::read_to_string(&self.out).unwrap();
        let last = text.lines().last().unwrap_or_else(|| panic!("no counts from the peer"));
        let v: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["final"], true, "{text}");
        v
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
