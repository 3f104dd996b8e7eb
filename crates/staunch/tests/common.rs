//! Helpers for tests that run the real `staunch` binary.
#![allow(dead_code)]

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
        let g = guest(dir);
        let (sock, log, events) = (dir.join("api.sock"), dir.join("serial.log"), dir.join("events.jsonl"));
        let mut c = staunch();
        c.args(["vmm", "run", "--vcpus", &vcpus.to_string(), "--kernel"]).arg(&g);
        c.arg("--api-socket").arg(&sock).arg("--events").arg(&events);
        c.arg("--serial").arg(format!("file:{}", log.display()));
        c.args(["--cmdline", cmdline]);
        if let Some(d) = disk {
            c.arg("--disk").arg(d);
        }
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
