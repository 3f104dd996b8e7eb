//! `staunch blk` or `staunch net` run as a child process group (the
//! backend and its spare) with an events file and a control socket: how
//! the campaigns, the demo and the benchmarks drive a backend they kill.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ChildBackend {
    /// The group leader: the first backend; its spares share its group.
    child: Child,
    pub sock: PathBuf,
    pub control: PathBuf,
    pub events: PathBuf,
}

pub fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > within {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

impl ChildBackend {
    /// Serve `disk` on `dir/blk.sock`; returns once a spare stands by.
    pub fn start(dir: &Path, disk: &Path) -> Result<ChildBackend> {
        let mut c = Command::new("/proc/self/exe");
        c.arg("blk").arg("--disk").arg(disk);
        Self::spawn(c, dir, "blk", true)
    }

    /// `staunch net` on `tap` in namespace `netns`, on `dir/net.sock`;
    /// returns once it listens (and, with `spare`, a spare stands by).
    pub fn start_net(dir: &Path, netns: &str, tap: &str, spare: bool) -> Result<ChildBackend> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).arg(std::env::current_exe()?).args(["net", "--tap", tap]);
        c.args(["--spare", if spare { "on" } else { "off" }]);
        Self::spawn(c, dir, "net", spare)
    }

    fn spawn(mut c: Command, dir: &Path, kind: &str, spare: bool) -> Result<ChildBackend> {
        let sock = dir.join(format!("{kind}.sock"));
        let (control, events) = (dir.join(format!("{kind}.ctl")), dir.join(format!("{kind}-events.jsonl")));
        c.arg("--socket").arg(&sock).arg("--events").arg(&events).arg("--control").arg(&control);
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{kind}-stderr.log")))?;
        c.env_remove("STAUNCH_FAILPOINTS").process_group(0);
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn()?;
        let b = ChildBackend { child, sock, control, events };
        let pid = b.child.id() as u64;
        wait_for(&format!("the {kind} backend"), Duration::from_secs(20), || {
            let ev = b.events();
            let want = if spare { "spare-ready" } else { "backend-ready" };
            let key = if spare { "of" } else { "pid" };
            ev.iter().any(|e| e["event"] == want && e[key] == pid)
        })?;
        Ok(b)
    }

    pub fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.events)
    }

    /// The process serving now (the first, or the spare that took over last).
    pub fn serving(&self) -> Option<u32> {
        let ev = self.events();
        let e = ev.iter().rev().find(|e| e["event"] == "backend-ready" || e["event"] == "backend-takeover")?;
        e["pid"].as_u64().map(|p| p as u32)
    }

    /// The serving process was replaced since `pid`, and a spare stands by
    /// again.
    pub fn replaced(&self, pid: u32) -> bool {
        let ev = self.events();
        let took = ev.iter().find(|e| e["event"] == "backend-takeover" && e["from"] == pid as u64);
        took.is_some_and(|t| ev.iter().any(|e| e["event"] == "spare-ready" && e["of"] == t["pid"]))
    }

    pub fn wait_replaced(&self, pid: u32, within: Duration) -> Result<()> {
        wait_for("the spare's takeover", within, || self.replaced(pid))
    }

    /// One request on the control socket (`ping`, `failpoint SPEC`).
    pub fn control(&self, line: &str) -> Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).context("backend control socket")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply)?;
        Ok(reply.trim().to_string())
    }

    /// Every backend process of the group.
    pub fn kill(&mut self) {
        // SAFETY: killpg(2) of the group this backend was started in.
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ChildBackend {
    fn drop(&mut self) {
        self.kill();
    }
}
