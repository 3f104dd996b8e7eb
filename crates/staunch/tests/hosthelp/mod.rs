//! A host run by `staunch host` in a test: its config, its supervisor, its
//! VMs' definitions, its events and status, and a teardown that leaves no
//! process behind.
#![allow(dead_code)]

use crate::common::{run, staunch, tmpdir, Run};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const BLOCKS: u64 = 128;

pub struct Host {
    pub dir: PathBuf,
    pub run: PathBuf,
    pub config: PathBuf,
    pub kernel: PathBuf,
    pub supervisor: Option<Child>,
}

impl Host {
    /// A host whose config is `run_dir` plus `extra` TOML.
    pub fn new(name: &str, extra: &str) -> Host {
        let dir = tmpdir(name);
        let run = dir.join("run");
        let config = dir.join("host.toml");
        std::fs::write(&config, format!("run_dir = \"{}\"\n{extra}", run.display())).unwrap();
        let kernel = staunch_testguest::install(&dir).unwrap();
        Host { dir, run, config, kernel, supervisor: None }
    }

    pub fn start(name: &str, extra: &str) -> Host {
        let mut h = Host::new(name, extra);
        h.start_supervisor();
        h
    }

    /// Start `staunch host` and wait until it says it is ready.
    pub fn start_supervisor(&mut self) {
        let seen = self.count("host-ready");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("host.log")).unwrap();
        let c = staunch()
            .arg("host")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.supervisor = Some(c);
        self.wait("the supervisor's host-ready", Duration::from_secs(60), |h| h.count("host-ready") > seen);
    }

    pub fn kill_supervisor(&mut self) {
        if let Some(mut c) = self.supervisor.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn vm(&self, args: &[&str]) -> Run {
        run(
            staunch().arg("vm").arg("--store").arg(self.run.join("store.sock")).args(args),
            None,
            Duration::from_secs(30),
        )
    }

    /// A test guest VM running blk-verify on its own disk served by
    /// `staunch blk`.
    pub fn blk_vm(&self, name: &str, writes: u64, extra: &str) -> PathBuf {
        let disk = self.dir.join(format!("{name}.img"));
        std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
        let def = format!(
            "kernel = \"{}\"\nmemory = 64\nvcpus = 1\ncmdline = \"staunch.work=blk-verify staunch.writes={writes} staunch.blocks={BLOCKS} staunch.qd=4 staunch.report=500\"\n{extra}\n[[disk]]\npath = \"{}\"\n",
            self.kernel.display(),
            disk.display()
        );
        self.define(name, &def);
        disk
    }

    /// `staunch vm show NAME` says `text` (the store's copy of the status
    /// follows the supervisor's within a moment).
    pub fn wait_show(&self, name: &str, text: &str) {
        self.wait(&format!("`vm show {name}` to say {text:?}"), Duration::from_secs(30), |h| {
            h.vm(&["show", name]).stdout.contains(text)
        });
    }

    pub fn define(&self, name: &str, toml: &str) -> Run {
        let f = self.dir.join(format!("{name}.toml"));
        std::fs::write(&f, toml).unwrap();
        self.vm(&["define", name, f.to_str().unwrap()])
    }

    pub fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.run.join("events.jsonl"))
    }

    pub fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }

    pub fn count_for(&self, event: &str, component: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event && e["component"] == component).count()
    }

    pub fn wait(&self, what: &str, within: Duration, f: impl Fn(&Host) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < within,
                "timed out waiting for {what}\nevents:\n{}\nstatus: {}",
                self.events().iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"),
                self.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the `n`th `event` of `component` (counting from 1).
    pub fn wait_event(&self, event: &str, component: &str, n: usize) -> Value {
        self.wait(&format!("{event} #{n} of {component}"), Duration::from_secs(90), |h| {
            h.count_for(event, component) >= n
        });
        self.events().into_iter().filter(|e| e["event"] == event && e["component"] == component).nth(n - 1).unwrap()
    }

    pub fn status(&self) -> Value {
        staunch_host::status::read(&self.run.join("host-status.json"))
    }

    pub fn component(&self, id: &str) -> Value {
        staunch_host::status::component(&self.status(), id)
    }

    pub fn healthy(&self, id: &str) -> bool {
        self.component(id)["health"] == "healthy"
    }

    /// Healthy in a status written after every event so far: an event is
    /// logged before the pass that emitted it writes its status, and a
    /// status read in between still shows the host from before.
    pub fn wait_healthy(&self, ids: &[&str]) {
        let seen = self.events().last().and_then(|e| e["time_ms"].as_u64()).unwrap_or(0);
        self.wait(&format!("{ids:?} healthy"), Duration::from_secs(90), |h| {
            h.status()["time_ms"].as_u64().is_some_and(|t| t > seen) && ids.iter().all(|i| h.healthy(i))
        });
    }

    pub fn pid(&self, id: &str) -> u32 {
        self.component(id)["pid"].as_u64().unwrap_or_else(|| panic!("no pid for {id}: {}", self.status())) as u32
    }

    pub fn vm_state(&self, name: &str) -> String {
        let vms = self.status()["vms"].clone();
        vms.as_array().into_iter().flatten().find(|v| v["name"] == name).map_or("absent".into(), |v| {
            format!("{} {}", v["state"].as_str().unwrap_or(""), v["error"].as_str().unwrap_or("")).trim().to_string()
        })
    }

    pub fn serial(&self, vm: &str) -> String {
        std::fs::read_to_string(self.run.join("vm").join(vm).join("serial.log")).unwrap_or_default()
    }

    pub fn reports(&self, vm: &str) -> usize {
        self.serial(vm).matches("blk written=").count()
    }

    /// The guest made progress: two more reports than now.
    pub fn progress(&self, vm: &str) {
        let n = self.reports(vm);
        self.wait(&format!("{vm}'s progress"), Duration::from_secs(90), |h| {
            h.reports(vm) >= n + 2 || h.serial(vm).contains("final=1")
        });
    }

    /// The guest's own verdict once it finished: every write verified, no
    /// mismatch, no I/O error, booted once; and the host's check of the
    /// disk. Returns the final report line.
    pub fn judge_blk(&self, vm: &str, disk: &Path, writes: u64) -> String {
        self.wait(&format!("{vm}'s final report"), Duration::from_secs(300), |h| h.serial(vm).contains("final=1"));
        let log = self.serial(vm);
        let last = log.lines().rfind(|l| l.contains("final=1")).unwrap().to_string();
        for (k, v) in [("written", writes), ("verified", writes), ("mismatches", 0), ("errors", 0)] {
            assert_eq!(crate::common::field(&last, k), v, "{vm}: {last}");
        }
        assert_eq!(log.matches("STAUNCH ready").count(), 1, "{vm} booted once");
        assert!(!self.run.join("vm").join(vm).join("serial.1.log").exists(), "{vm} was never restarted cold");
        crate::common::check_disk(disk, writes, BLOCKS);
        last
    }

    /// `staunch host upgrade --wait` to a copy of this build's binary
    /// (another file: the components must be seen to run it). Returns it.
    pub fn upgrade_to_a_copy(&self) -> PathBuf {
        let next = self.dir.join("staunch-next");
        std::fs::copy(env!("CARGO_BIN_EXE_staunch"), &next).unwrap();
        let up = run(
            staunch().args(["host", "upgrade", "--wait", "--config"]).arg(&self.config).arg("--binary").arg(&next),
            None,
            Duration::from_secs(120),
        );
        assert_eq!(up.status, 0, "{}\n{}\n{:?}", up.stdout, up.stderr, self.events());
        next
    }

    pub fn signal(&self, pid: u32, sig: i32) {
        assert!(pid > 1);
        // SAFETY: kill(2) of a process this test's host started.
        unsafe { libc::kill(pid as i32, sig) };
    }

    pub fn down(&mut self) {
        self.kill_supervisor();
        let _ = run(staunch().args(["host", "down", "--config"]).arg(&self.config), None, Duration::from_secs(30));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.down();
    }
}
