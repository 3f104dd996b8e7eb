//! Real Linux over `staunch blk`: Debian's cloud kernel under QEMU (TCG, a
//! real vhost-user-blk frontend) boots the project's busybox initramfs
//! (scripts/initramfs.sh), whose `staunch-linux-blk` writes checksummed,
//! sequence-numbered blocks with O_DIRECT through the kernel's virtio-blk
//! driver, reads each back and verifies it. Meanwhile the serving backend
//! process is SIGKILLed three times (its spare takes over) and upgraded in
//! place once. Judged by the guest (every write verified, no error, no
//! mismatch), by the kernel (no block I/O error on the console) and by the
//! host's check of the disk.

mod common;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WRITES: u64 = 40_000;
const BLOCKS: u64 = 256;
const QD: u64 = 4;
const REPORT: u64 = 500;

/// The cache of scripts/qemu.sh, assets.sh and initramfs.sh.
fn cache() -> PathBuf {
    std::env::var_os("STAUNCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache"))
}

struct Assets {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// The assets, or None (the test is skipped, loudly) when one is missing
/// outside CI. In CI a missing asset fails the test.
fn assets() -> Option<Assets> {
    let c = cache();
    let a = Assets {
        qemu: c.join("qemu/root/usr/bin/qemu-system-x86_64"),
        kernel: std::env::var_os("STAUNCH_LINUX_KERNEL").map(PathBuf::from).unwrap_or(c.join("linux/vmlinuz")),
        initramfs: c.join("initramfs/initramfs.cpio.gz"),
    };
    let missing: Vec<_> = [&a.qemu, &a.kernel, &a.initramfs].into_iter().filter(|p| !p.exists()).collect();
    if missing.is_empty() {
        return Some(a);
    }
    let msg = format!(
        "missing {missing:?}: run scripts/qemu.sh, scripts/assets.sh and scripts/initramfs.sh (scripts/test.sh does)"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    // Straight to stderr: the test harness captures eprintln!.
    let bar = "#".repeat(64);
    let _ = writeln!(std::io::stderr(), "{bar}\n#  SKIPPING linux_blk (not passed): {msg}\n{bar}");
    None
}

/// `staunch blk` in its own process group, run from a copy of the binary
/// (so it can be upgraded in place).
struct Backend {
    bin: PathBuf,
    sock: PathBuf,
    disk: PathBuf,
    events: PathBuf,
    child: Child,
}

impl Backend {
    fn start(dir: &Path) -> Backend {
        let bin = dir.join("bin/staunch");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_staunch"), &bin).unwrap();
        let (sock, disk, events) = (dir.join("blk.sock"), dir.join("disk.img"), dir.join("blk-events.jsonl"));
        std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
        let log = std::fs::File::create(dir.join("blk.log")).unwrap();
        let child = Command::new(&bin)
            .arg("blk")
            .arg("--socket")
            .arg(&sock)
            .arg("--disk")
            .arg(&disk)
            .arg("--events")
            .arg(&events)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let b = Backend { bin, sock, disk, events, child };
        let pid = b.child.id() as u64;
        b.wait_event("backend-ready", |e| e["event"] == "backend-ready" && e["pid"] == pid);
        b.wait_event("its spare", |e| e["event"] == "spare-ready" && e["of"] == pid);
        b
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, f: impl Fn(&Value) -> bool) -> usize {
        self.events().iter().filter(|e| f(e)).count()
    }

    fn wait_event(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(&f) {
                return e;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no {what}: {:?}", self.events());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process serving now.
    fn primary(&self) -> u64 {
        let ev = self.events();
        let e = ev.iter().rev().find(|e| e["event"] == "backend-ready" || e["event"] == "backend-takeover");
        e.expect("a running backend")["pid"].as_u64().unwrap()
    }

    /// SIGKILL the serving process and wait for its spare to take over
    /// (and to start a spare of its own).
    fn kill(&self) {
        let pid = self.primary();
        // SAFETY: kill(2) on the serving process of the backend we started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let e = self.wait_event("takeover", |e| e["event"] == "backend-takeover" && e["from"] == pid);
        let new = e["pid"].as_u64().unwrap();
        self.wait_event("the new spare", |e| e["event"] == "spare-ready" && e["of"] == new);
    }

    /// Install a new binary over the backend's path and SIGUSR2 the serving
    /// process: it execs the new file, keeping its socket.
    fn upgrade(&self) {
        let staged = self.bin.with_file_name("staunch.new");
        std::fs::copy(env!("CARGO_BIN_EXE_staunch"), &staged).unwrap();
        std::fs::rename(&staged, &self.bin).unwrap();
        let pid = self.primary();
        let upgraded = |e: &Value| e["event"] == "backend-ready" && e["pid"] == pid && e["upgraded"] == true;
        let spares = |e: &Value| e["event"] == "spare-ready" && e["of"] == pid;
        let (before, spares_before) = (self.count(upgraded), self.count(spares));
        // SAFETY: kill(2) on the serving process of the backend we started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
        // The new image says it is ready, then starts a spare of its own.
        let t = Instant::now();
        while self.count(upgraded) == before || self.count(spares) == spares_before {
            assert!(t.elapsed() < Duration::from_secs(30), "no upgraded backend with a spare: {:?}", self.events());
            std::thread::sleep(Duration::from_millis(5));
        }
        let exe = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino();
        assert_eq!(exe, std::fs::metadata(&self.bin).unwrap().ino(), "the backend runs the new file");
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: killpg(2) on the group the backend was started in.
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// QEMU, its console in a file. On each backend disconnect (a SIGKILL or an
/// upgrade) its stderr says "Failed to set msg fds." and "vhost VQ 0 ring
/// restore failed": it cannot ask the dead backend for the ring's state and
/// takes it from the used index; then it reconnects (reconnect-ms).
struct Qemu {
    child: Child,
    log: PathBuf,
    stderr: PathBuf,
}

impl Qemu {
    fn start(dir: &Path, a: &Assets, sock: &Path) -> Qemu {
        let (log, stderr) = (dir.join("console.log"), dir.join("qemu.stderr"));
        let root = a.qemu.parent().unwrap().parent().unwrap();
        let libs = [root.join("lib/x86_64-linux-gnu"), root.parent().unwrap().join("lib/x86_64-linux-gnu")];
        let mut c = Command::new(&a.qemu);
        c.env("LD_LIBRARY_PATH", std::env::join_paths(libs).unwrap());
        c.arg("-L").arg(root.join("share/qemu")).arg("-L").arg(root.join("share/seabios"));
        c.args(["-accel", "tcg", "-M", "q35", "-m", "512", "-smp", "1"]);
        c.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem"]);
        c.arg("-kernel").arg(&a.kernel).arg("-initrd").arg(&a.initramfs);
        c.arg("-append").arg(format!(
            "console=ttyS0 quiet panic=-1 staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.qd={QD} staunch.report={REPORT}"
        ));
        c.arg("-chardev").arg(format!("socket,id=c0,path={},reconnect-ms=10", sock.display()));
        c.args(["-device", "vhost-user-blk-pci,chardev=c0"]);
        c.arg("-serial").arg(format!("file:{}", log.display()));
        c.args(["-display", "none", "-nodefaults", "-no-user-config", "-no-reboot"]);
        let err = std::fs::File::create(&stderr).unwrap();
        let child = c.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
        Qemu { child, log, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn reports(&self) -> usize {
        self.log().matches("STAUNCH blk written=").count()
    }

    fn wait_for(&mut self, what: &str, within: Duration, f: impl Fn(&str) -> bool) {
        let t = Instant::now();
        while !f(&self.log()) {
            let gone = self.child.try_wait().unwrap();
            let late = t.elapsed() > within;
            if gone.is_some() || late {
                let why = if late { format!("timed out after {within:?}") } else { format!("QEMU ended: {gone:?}") };
                let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                panic!("waiting for {what}: {why}\nconsole:\n{}\nQEMU's stderr:\n{err}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Two more reports from the guest: its I/O goes on.
    fn progress(&mut self, what: &str) {
        let n = self.reports();
        self.wait_for(what, Duration::from_secs(60), |l| l.matches("STAUNCH blk written=").count() >= n + 2);
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn linux_over_staunch_blk_survives_kills_and_an_upgrade() {
    let Some(a) = assets() else { return };
    let d = tmpdir("linux-blk");
    let t0 = Instant::now();
    let b = Backend::start(&d);
    let mut q = Qemu::start(&d, &a, &b.sock);
    q.wait_for("the guest's first report", Duration::from_secs(180), |l| l.contains("STAUNCH blk written="));
    let boot = t0.elapsed();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for fault in ["kill", "kill", "upgrade", "kill"] {
        // Spread over the run, in the middle of the guest's I/O.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 2000));
        match fault {
            "kill" => b.kill(),
            _ => b.upgrade(),
        }
        q.progress(&format!("the guest's I/O after the backend {fault}"));
    }
    q.wait_for("the guest to finish", Duration::from_secs(180), |l| l.contains("STAUNCH done"));
    let t = Instant::now();
    let status = loop {
        if let Some(s) = q.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "QEMU did not power off:\n{}", q.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = q.log();
    let ev = b.events();
    let report: Vec<&str> = log.lines().filter(|l| l.contains("STAUNCH blk written=")).collect();
    let maxio = report.iter().map(|l| field(l, "maxio_us")).max().unwrap();
    eprintln!(
        "linux_blk: {:.1} s in all, first report after {:.1} s, {} reports, longest guest I/O {maxio} us",
        t0.elapsed().as_secs_f64(),
        boot.as_secs_f64(),
        report.len()
    );
    assert!(status.success(), "QEMU: {status}\n{log}");
    assert!(log.contains("STAUNCH done code=0"), "{log}");
    let last = report.iter().rfind(|l| l.contains("final=1")).expect("a final report");
    assert_eq!(field(last, "written"), WRITES, "{last}");
    assert_eq!(field(last, "verified"), WRITES, "{last}");
    assert_eq!(field(last, "mismatches"), 0, "{last}");
    assert_eq!(field(last, "errors"), 0, "{last}");
    for bad in ["I/O error", "blk_update_request", "Buffer I/O error", "STAUNCH blk error", "STAUNCH blk mismatch"] {
        assert!(!log.contains(bad), "the console has {bad:?}:\n{log}");
    }
    let takeovers = ev.iter().filter(|e| e["event"] == "backend-takeover").count();
    assert_eq!(takeovers, 3, "{ev:?}");
    let upgrades = ev.iter().filter(|e| e["event"] == "backend-ready" && e["upgraded"] == true).count();
    assert_eq!(upgrades, 1, "{ev:?}");
    check_disk(&b.disk, WRITES, BLOCKS);
    // Passed: the directory (a disk and two copies of the binary) goes.
    drop((q, b));
    let _ = std::fs::remove_dir_all(&d);
}
