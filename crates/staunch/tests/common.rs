//! Helpers for tests that run the real `staunch` binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
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
