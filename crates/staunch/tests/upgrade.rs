//! Warm upgrade: the VMM re-executes itself around the running guest's memory
//! and the guest carries on: its counter never resets or goes back, every
//! block write it saw complete is on disk, and each upgrade is an event.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Vm {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    events: PathBuf,
}

impl Vm {
    fn start(dir: &Path, vcpus: u8, disk: Option<&Path>, cmdline: &str) -> Vm {
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
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let vm = Vm { child, sock, log, events };
        vm.wait_for("first report", |l| l.contains("STAUNCH "));
        vm
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) {
        let t = Instant::now();
        while !f(&self.log()) {
            assert!(t.elapsed() < Duration::from_secs(120), "timed out waiting for {what}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ctl(&self, args: &[&str]) -> Run {
        run(staunch().arg("vm").arg("--socket").arg(&self.sock).args(args), None, Duration::from_secs(60))
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn finish(mut self) -> Run {
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
        let mut stderr = String::new();
        use std::io::Read;
        self.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        Run { status: status.code().unwrap_or(-1), stdout: self.log(), stderr }
    }
}

/// Counter values of complete lines (the log may end mid-line while the
/// guest is still printing).
fn counters(log: &str) -> Vec<u64> {
    let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| staunch_testguest::proto::field(l.trim_end(), "counter"))
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn kvm_warm_upgrade_keeps_counter_and_all_vcpus() {
    require_kvm();
    let d = tmpdir("upgrade-counter");
    let vm = Vm::start(&d, 2, None, "staunch.work=counter staunch.chunk=1M staunch.reports=400");
    for round in 1..=3u64 {
        let before = counters(&vm.log()).len();
        let r = vm.ctl(&["upgrade"]);
        assert_eq!(r.status, 0, "upgrade {round}: {}", r.stderr);
        let status: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(status["generation"], round, "{status}");
        assert_eq!(status["last_recovery"]["cause"], "upgrade");
        vm.wait_for("progress after the upgrade", |l| counters(l).len() >= before + 3);
    }
    let events = vm.events();
    let resumed: Vec<_> = events.iter().filter(|e| e["event"] == "resumed").collect();
    assert_eq!(resumed.len(), 3, "{events:?}");
    assert!(resumed.iter().all(|e| e["guest_pause_ms"].as_f64().unwrap() > 0.0));
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    let c = counters(&r.stdout);
    assert_eq!(c.len(), 400);
    assert!(c.windows(2).all(|w| w[1] == w[0] + (1 << 20)), "counter skipped or went back: {c:?}");
    // Both vCPUs kept counting through every upgrade.
    let ticks: Vec<&str> = r.stdout.lines().filter(|l| l.contains("counter=")).collect();
    assert!(ticks[1..].iter().all(|l| l.contains("cpus=2")), "an AP stopped");
}

#[test]
fn kvm_warm_upgrade_during_block_io_loses_nothing() {
    require_kvm();
    let d = tmpdir("upgrade-blk");
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let (writes, blocks) = (30_000u64, 256u64);
    let vm = Vm::start(
        &d,
        1,
        Some(&disk),
        &format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={blocks} staunch.report=500"),
    );
    for _ in 0..3 {
        let before = vm.log().matches("blk written=").count();
        assert_eq!(vm.ctl(&["upgrade"]).status, 0);
        vm.wait_for("I/O after the upgrade", |l| {
            l.matches("blk written=").count() > before + 1 || l.contains("final=1")
        });
    }
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    let last = r.stdout.lines().rfind(|l| l.contains("final=1")).expect("final report");
    assert_eq!(field(last, "verified"), writes, "{last}");
    assert_eq!(field(last, "mismatches"), 0);
    assert_eq!(field(last, "errors"), 0);
    let bytes = std::fs::read(&disk).unwrap();
    for lba in 0..blocks {
        let off = lba as usize * 4096;
        let b: &[u8; 4096] = bytes[off..off + 4096].try_into().unwrap();
        let seq = staunch_testguest::proto::check_block(b, lba).unwrap_or_else(|e| panic!("block {lba}: {e:?}"));
        assert_eq!(seq, (0..writes).filter(|s| s % blocks == lba).max().unwrap());
    }
}

#[test]
fn kvm_control_socket_rejects_bad_requests() {
    use std::io::{BufRead, BufReader, Write};
    require_kvm();
    let d = tmpdir("api-bad");
    let vm = Vm::start(&d, 1, None, "staunch.work=counter staunch.chunk=1M staunch.reports=100000");
    let mut s = std::os::unix::net::UnixStream::connect(&vm.sock).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for bad in ["not json", r#"{"cmd":"explode"}"#, r#"{"cmd":"pause","extra":1}"#, "{}"] {
        writeln!(s, "{bad}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad} -> {line}");
        assert!(v["error"].as_str().unwrap().contains("bad request"), "{line}");
    }
    // The same connection still works, and so does the VM.
    writeln!(s, r#"{{"cmd":"status"}}"#).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    let paused = vm.ctl(&["pause"]);
    assert_eq!(paused.status, 0);
    let st = vm.ctl(&["status"]);
    assert!(st.stdout.contains("Paused"), "{}", st.stdout);
    assert_eq!(vm.ctl(&["resume"]).status, 0);
    let mut child = vm.child;
    let _ = child.kill();
    let _ = child.wait();
}
