//! Helpers for tests that run the real `staunch` binary.
#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// KVM tests are named `kvm_*`; the test script skips them (and says so)
/// where /dev/kvm is missing. Run anyway, they fail rather than pass.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm; run the suite through scripts/test.sh, which skips KVM tests loudly when it is missing"
    );
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("staunch-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn guest(dir: &Path) -> PathBuf {
    staunch_testguest::install(dir).unwrap()
}

pub fn staunch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_staunch"));
    c.env_remove("STAUNCH_KVM_DEVICE");
    c
}

pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn reports(&self) -> Vec<&str> {
        self.stdout.lines().filter_map(staunch_testguest::report).collect()
    }
    pub fn report_with(&self, prefix: &str) -> Vec<&str> {
        self.reports().into_iter().filter(|l| l.starts_with(prefix)).collect()
    }
}

/// Run with a deadline (a hung VM fails the test instead of hanging it).
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("spawn staunch");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&input);
            std::thread::sleep(Duration::from_secs(30));
        });
    }
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "staunch did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// `staunch campaign TARGET` for a few runs: every fault that fired was
/// recovered, and nothing mismatched.
pub fn short_campaign(target: &str) -> Run {
    let r = run(
        staunch().args(["campaign", target, "--runs", "12", "--seed", "11", "--per-vm", "6"]),
        None,
        Duration::from_secs(600),
    );
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    // "recovered X/Y (...) of fired catchable faults": every one that fired.
    let tally = r.stdout.lines().find_map(|l| l.strip_prefix("recovered ")).and_then(|t| t.split_whitespace().next());
    let (x, y) = tally.expect("the campaign's tally line").split_once('/').expect("X/Y");
    assert_eq!(x, y, "{}", r.stdout);
    assert!(r.stdout.contains("data mismatches: 0;"), "{}", r.stdout);
    r
}

pub fn field(line: &str, key: &str) -> u64 {
    staunch_testguest::proto::field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}")).parse().unwrap()
}

/// A VM run by `staunch vmm run` in the background with a control socket,
/// an events file and its serial log in a file.
pub struct Vm {
    pub child: Child,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub events: PathBuf,
    pub stderr: PathBuf,
}

impl Vm {
    pub fn start(dir: &Path, vcpus: u8, disk: Option<&Path>, cmdline: &str) -> Vm {
        let disk = disk.map(|d| ["--disk".to_string(), d.display().to_string()]);
        let args: Vec<&str> = disk.iter().flatten().map(String::as_str).collect();
        Vm::start_with(dir, vcpus, &args, cmdline)
    }

    /// With more options for `vmm run` (`--net ...`).
    pub fn start_with(dir: &Path, vcpus: u8, args: &[&str], cmdline: &str) -> Vm {
        let g = guest(dir);
        let (sock, log, events) = (dir.join("api.sock"), dir.join("serial.log"), dir.join("events.jsonl"));
        let mut c = staunch();
        c.args(["vmm", "run", "--vcpus", &vcpus.to_string(), "--kernel"]).arg(&g);
        c.arg("--api-socket").arg(&sock).arg("--events").arg(&events);
        c.arg("--serial").arg(format!("file:{}", log.display()));
        c.args(["--cmdline", cmdline]);
        c.args(args);
        // A file, not a pipe: nobody reads a pipe until the end, and a VMM
        // that fills one (its events are on stderr too) would block on it.
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().unwrap();
        let vm = Vm { child, sock, log, events, stderr: dir.join("stderr.log") };
        vm.wait_for("first report", |l| l.contains("STAUNCH "));
        vm
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) {
        let t = Instant::now();
        while !f(&self.log()) {
            assert!(t.elapsed() < Duration::from_secs(120), "timed out waiting for {what}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Run {
        run(staunch().arg("vm").arg("--socket").arg(&self.sock).args(args), None, Duration::from_secs(60))
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Crash the VMM (SIGSEGV at the next port write) and wait until its
    /// successor has resumed the VM.
    pub fn crash_and_wait(&self) {
        let resumed = |vm: &Vm| vm.events().iter().filter(|e| e["event"] == "resumed").count();
        let seen = resumed(self);
        assert_eq!(self.ctl(&["failpoint", "pio.write=segv"]).status, 0);
        let t = Instant::now();
        while resumed(self) <= seen {
            assert!(t.elapsed() < Duration::from_secs(60), "no crash recovery: {:?}", self.events());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn finish(mut self) -> Run {
        let status = {
            let t = Instant::now();
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    break s;
                }
                assert!(t.elapsed() < Duration::from_secs(120), "VM did not finish:\n{}", self.log());
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        Run { status: status.code().unwrap_or(-1), stdout: self.log(), stderr }
    }
}

/// Counter values of complete lines (the log may end mid-line while the
/// guest is still printing).
pub fn counters(log: &str) -> Vec<u64> {
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| staunch_testguest::proto::field(l.trim_end(), "counter"))
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Every block of a `blk-verify` region holds its last write, intact.
pub fn check_disk(disk: &Path, writes: u64, blocks: u64) {
    let bytes = std::fs::read(disk).unwrap();
    for lba in 0..blocks.min(writes) {
        let off = lba as usize * 4096;
        let b: &[u8; 4096] = bytes[off..off + 4096].try_into().unwrap();
        let seq = staunch_testguest::proto::check_block(b, lba).unwrap_or_else(|e| panic!("block {lba}: {e:?}"));
        assert_eq!(seq, (0..writes).filter(|s| s % blocks == lba).max().unwrap(), "block {lba}");
    }
}

impl Drop for Vm {
    /// A failed test must not leave its VMM (or its successor) running.
    fn drop(&mut self) {
        staunch_vmm::handover::kill_family(self.child.id());
        let _ = self.child.wait();
    }
}

/// `staunch blk` (or `staunch net`) started by a test, in its own process
/// group with the spares it starts, an events file and a control socket.
pub struct Backend {
    pub bin: PathBuf,
    pub sock: PathBuf,
    pub disk: PathBuf,
    pub events: PathBuf,
    pub log: PathBuf,
    /// The process `start` spawned: the group leader of the backend and
    /// every spare it starts (each spare takes over when its primary dies).
    pub child: Option<Child>,
    /// Virtqueues a block backend offers (`--queues`).
    pub queues: u16,
    /// `staunch net` on this tap, in this network namespace, instead.
    pub net: Option<(String, String)>,
}

/// The first event in the events file `path` that `f` accepts, waiting up
/// to 30 s for it.
pub fn wait_event_in(path: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        if let Some(e) = staunch_events::read(path).into_iter().find(&f) {
            return e;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no {what}: {:?}", staunch_events::read(path));
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Backend {
    pub fn new(dir: &Path) -> Backend {
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
        Backend {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_staunch")),
            sock: dir.join("blk.sock"),
            disk,
            events: dir.join("blk-events.jsonl"),
            log: dir.join("blk.log"),
            child: None,
            queues: 1,
            net: None,
        }
    }

    /// `staunch net` on `tap` in network namespace `netns`.
    pub fn net(dir: &Path, netns: &str, tap: &str) -> Backend {
        Backend {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_staunch")),
            sock: dir.join("net.sock"),
            disk: PathBuf::new(),
            events: dir.join("net-events.jsonl"),
            log: dir.join("net.log"),
            child: None,
            queues: 1,
            net: Some((netns.into(), tap.into())),
        }
    }

    pub fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.events)
    }

    pub fn wait_event(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_event_in(&self.events, what, f)
    }

    /// Start a backend (failpoints armed in it, not in its spares), wait
    /// until it listens; its pid.
    pub fn start(&mut self, failpoints: Option<&str>) -> u64 {
        use std::os::unix::process::CommandExt;
        let mut c = match &self.net {
            Some((netns, tap)) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", netns]).arg(&self.bin).args(["net", "--tap", tap]);
                c
            }
            None => {
                let mut c = std::process::Command::new(&self.bin);
                c.arg("blk").arg("--disk").arg(&self.disk).arg("--queues").arg(self.queues.to_string());
                c
            }
        };
        c.arg("--socket")
            .arg(&self.sock)
            .arg("--events")
            .arg(&self.events)
            .arg("--control")
            .arg(self.sock.with_extension("ctl"));
        if let Some(f) = failpoints {
            c.env("STAUNCH_FAILPOINTS", f);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = c.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let pid = child.id() as u64;
        self.child = Some(child);
        self.wait_event("backend-ready", |e| e["event"] == "backend-ready" && e["pid"] == pid);
        self.wait_event("its spare", |e| e["event"] == "spare-ready" && e["of"] == pid);
        pid
    }

    /// One request on the serving process's control socket.
    pub fn control(&self, line: &str) -> String {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.sock.with_extension("ctl")).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(s).read_line(&mut reply).unwrap();
        reply.trim().to_string()
    }

    pub fn count(&self, f: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().filter(|e| f(e)).count()
    }

    /// Install a new binary over the backend's path (`bin`, which must be
    /// a copy of its own) and SIGUSR2 the serving process: it execs the new
    /// file, keeping its socket, and starts a spare of its own.
    pub fn upgrade(&self) {
        use std::os::unix::fs::MetadataExt;
        let staged = self.bin.with_file_name("staunch.new");
        std::fs::copy(env!("CARGO_BIN_EXE_staunch"), &staged).unwrap();
        std::fs::rename(&staged, &self.bin).unwrap();
        let pid = self.primary();
        self.signal(libc::SIGUSR2);
        // A spare started from the new file takes the session over.
        let e = self.wait_event("the upgraded spare's takeover", |e| {
            e["event"] == "backend-takeover" && e["from"] == pid && e["upgraded"] == true
        });
        let new = e["pid"].as_u64().unwrap();
        self.wait_event("its spare", |e| e["event"] == "spare-ready" && e["of"] == new);
        let exe = std::fs::metadata(format!("/proc/{new}/exe")).unwrap().ino();
        assert_eq!(exe, std::fs::metadata(&self.bin).unwrap().ino(), "the backend runs the new file");
    }

    /// Run the backend from a copy of the binary in `dir/bin` (so it can be
    /// upgraded in place).
    pub fn run_from_copy(&mut self, dir: &Path) {
        let bin = dir.join("bin/staunch");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(&self.bin, &bin).unwrap();
        self.bin = bin;
    }

    /// The process serving now.
    pub fn primary(&self) -> u64 {
        let ev = self.events();
        let e = ev.iter().rev().find(|e| e["event"] == "backend-ready" || e["event"] == "backend-takeover");
        e.expect("a running backend")["pid"].as_u64().unwrap()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a process of the backend's group.
        unsafe { libc::kill(self.primary() as i32, sig) };
    }

    /// Wait for the spare to take over from `pid` (and to start its own).
    pub fn taken_over(&self, pid: u64) -> u64 {
        let e = self.wait_event("takeover", |e| e["event"] == "backend-takeover" && e["from"] == pid);
        let new = e["pid"].as_u64().unwrap();
        self.wait_event("the new spare", |e| e["event"] == "spare-ready" && e["of"] == new);
        new
    }

    /// SIGKILL the serving process; its spare takes over.
    pub fn kill(&mut self) {
        let pid = self.primary();
        self.signal(libc::SIGKILL);
        self.taken_over(pid);
    }

    /// One fault of the serving process, waited out until its spare took
    /// over: `kill` (SIGKILL), `hang` (SIGSTOP, then what a supervisor does:
    /// SIGKILL 300 ms later), `upgrade` (to the file at `bin`), or a
    /// failpoint's name (death there).
    pub fn fault(&mut self, fault: &str) {
        match fault {
            "kill" => self.kill(),
            "hang" => {
                self.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(300));
                self.kill();
            }
            "upgrade" => self.upgrade(),
            point => {
                let pid = self.primary();
                assert_eq!(self.control(&format!("failpoint {point}=kill")), "ok");
                self.taken_over(pid);
            }
        }
    }

    /// The inflight regions (inodes) the frontends asked for, checked to be
    /// one and the same, seen at least `n` times.
    pub fn same_inflight_region(&self, n: usize) {
        let be = self.events();
        let inodes: Vec<u64> =
            be.iter().filter(|e| e["event"] == "inflight-region").map(|e| e["inode"].as_u64().unwrap()).collect();
        assert!(inodes.len() >= n, "{be:?}");
        assert!(inodes.iter().all(|i| *i == inodes[0]), "{inodes:?}");
    }

    /// SIGKILL the backend and every spare: nothing listens any more.
    pub fn kill_all(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: killpg(2) on the group the backend was started in.
            unsafe { libc::killpg(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill_all();
    }
}
