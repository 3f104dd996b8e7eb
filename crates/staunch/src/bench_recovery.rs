//! `staunch bench recovery`: how long the guest is stopped by each kind of
//! recovery. The guest (the test guest's `counter`, printing a line every
//! couple of milliseconds) is watched from outside: the guest-visible pause
//! is the largest gap between two of its serial lines around the event. The
//! VMM's own measurement (pause start to resume, from its events) is shown
//! beside it.

use crate::guestrun::{cache_dir, test_guest};
use anyhow::{bail, Result};
use serde_json::Value;
use staunch_vmm::api::{request, ApiRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const COUNTER: &str = "staunch.work=counter staunch.ring=0 staunch.chunk=500";

struct LiveVm {
    child: Child,
    sock: PathBuf,
    events: PathBuf,
    lines: Arc<Mutex<Vec<Instant>>>,
}

/// Timestamp the guest's serial lines from `child`'s stdout.
fn watch(child: &mut Child) -> Arc<Mutex<Vec<Instant>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    watch_into(child, &lines);
    lines
}

/// Like [`watch`], appending to a shared list (two processes, one guest).
fn watch_into(child: &mut Child, lines: &Arc<Mutex<Vec<Instant>>>) {
    let out = child.stdout.take().expect("piped stdout");
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("STAUNCH") {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
            }
        }
    });
}

impl LiveVm {
    fn start(dir: &Path, mem: u64, vcpus: u8, cmdline: &str) -> Result<LiveVm> {
        Self::start_with(dir, mem, vcpus, cmdline, &[])
    }

    fn start_with(dir: &Path, mem: u64, vcpus: u8, cmdline: &str, extra: &[&str]) -> Result<LiveVm> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let (sock, events) = (dir.join("api.sock"), dir.join("events.jsonl"));
        let mut c = Command::new("/proc/self/exe");
        c.args(["vmm", "run", "--serial", "stdio", "--mem", &mem.to_string(), "--vcpus", &vcpus.to_string()]);
        c.arg("--kernel").arg(test_guest()?).arg("--cmdline").arg(cmdline);
        c.arg("--api-socket").arg(&sock).arg("--events").arg(&events).args(extra);
        c.env_remove("STAUNCH_FAILPOINTS");
        let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let lines = watch(&mut child);
        let vm = LiveVm { child, sock, events, lines };
        vm.wait_lines(20, Duration::from_secs(60))?;
        Ok(vm)
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn wait_lines(&self, n: usize, within: Duration) -> Result<()> {
        let t = Instant::now();
        while self.count() < n {
            if t.elapsed() > within {
                bail!("guest stopped printing");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Largest gap between consecutive serial lines from just before `t` on.
    fn gap_after(&self, t: Instant) -> f64 {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let first = l.iter().rposition(|x| *x <= t).unwrap_or(0);
        l[first..].windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).fold(0.0, f64::max)
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn wait_event(&self, kind: &str, seen: usize) -> Result<Value> {
        let t = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().skip(seen).find(|e| e["event"] == kind) {
                return Ok(e);
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no {kind} event");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Run `act`, wait for `kind`, let the guest print again; returns
    /// (guest-visible pause ms, the event).
    fn around(&self, kind: &str, act: impl FnOnce() -> Result<()>) -> Result<(f64, Value)> {
        let seen = self.events().len();
        let t = Instant::now();
        act()?;
        let ev = self.wait_event(kind, seen)?;
        let n = self.count();
        self.wait_lines(n + 30, Duration::from_secs(30))?;
        Ok((self.gap_after(t), ev))
    }

    /// Arm a failpoint. The fault may take the VMM down (into its re-exec)
    /// before it answers, so a lost reply is not an error.
    /// Wait until the VM's spare successor is ready (crash recovery then
    /// hands over to it instead of re-executing).
    fn wait_spare(&self) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if request(&self.sock, &ApiRequest::Status {}).ok().and_then(|r| r.data["spare"].as_u64()).is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("no spare successor became ready")
    }

    /// `rounds` injections of `spec`, each measured around its `kind`
    /// event (the VMM column from `vmm_ms`), each with a ready spare first
    /// if `spare`.
    fn injections(
        &self,
        what: &str,
        spec: &str,
        kind: &str,
        rounds: usize,
        spare: bool,
        vmm_ms: impl Fn(&Value) -> f64,
    ) -> Result<Row> {
        let mut row = Row::new(what);
        for _ in 0..rounds {
            if spare {
                self.wait_spare()?;
            }
            let (g, ev) = self.around(kind, || self.arm(spec))?;
            row.guest.push(g);
            row.vmm.push(vmm_ms(&ev));
        }
        Ok(row)
    }

    fn arm(&self, spec: &str) -> Result<()> {
        match request(&self.sock, &ApiRequest::Failpoint { spec: spec.into() }) {
            Ok(r) => anyhow::ensure!(r.ok, "{:?}", r.error),
            Err(e) => tracing::debug!("no reply after arming {spec}: {e}"),
        }
        Ok(())
    }

    fn stop(self) {}
}

/// A peer process that must not outlive its measurement, error or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        staunch_vmm::handover::kill_family(self.child.id());
        let _ = self.child.wait();
    }
}

impl Row {
    fn new(what: impl Into<String>) -> Row {
        Row { what: what.into(), guest: vec![], vmm: vec![], qemu: vec![] }
    }
}

struct Row {
    what: String,
    guest: Vec<f64>,
    vmm: Vec<f64>,
    /// QEMU 10 cpr-transfer, guest-visible pause measured the same way.
    qemu: Vec<f64>,
}

/// QEMU's cpr-transfer live update of the same guest (memfd-backed RAM):
/// start the old QEMU, let the guest print, start the new one waiting on the
/// cpr and migration channels, migrate over QMP, and take the largest gap
/// between the guest's serial lines across both processes.
fn qemu_cpr(qemu: &Path, dir: &Path, mem: u64, vcpus: u8) -> Result<f64> {
    use std::io::Write;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let usr = qemu.parent().and_then(|p| p.parent()).ok_or_else(|| anyhow::anyhow!("QEMU path"))?;
    let root = usr.parent().unwrap_or(usr);
    let libs = std::env::join_paths([usr.join("lib/x86_64-linux-gnu"), root.join("lib/x86_64-linux-gnu")])?;
    let kernel = test_guest()?;
    let base = |qmp: &Path| {
        let mut c = Command::new(qemu);
        c.env("LD_LIBRARY_PATH", &libs);
        c.arg("-L").arg(usr.join("share/qemu")).arg("-L").arg(usr.join("share/seabios"));
        c.args([
            "-bios",
            "qboot.rom",
            "-M",
            "microvm,rtc=off,pic=off,isa-serial=on,acpi=off,memory-backend=ram0,aux-ram-share=on",
        ]);
        c.args(["-object", &format!("memory-backend-memfd,id=ram0,size={mem}M,share=on")]);
        c.args([
            "-accel",
            "kvm",
            "-m",
            &format!("{mem}M"),
            "-smp",
            &vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
        ]);
        c.args([
            "-nographic",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
        ]);
        c.arg("-kernel").arg(&kernel).args(["-append", COUNTER]);
        c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        c
    };
    let (old_qmp, new_qmp) = (dir.join("old.qmp"), dir.join("new.qmp"));
    let (mig, cpr) = (dir.join("mig.sock"), dir.join("cpr.sock"));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut old = KillOnDrop(base(&old_qmp).spawn()?);
    watch_into(&mut old.0, &lines);
    let count = || lines.lock().unwrap_or_else(|p| p.into_inner()).len();
    let t = Instant::now();
    while count() < 20 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("QEMU guest did not print");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let chan = |kind: &str, p: &Path| serde_json::json!({"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": p}});
    let mut newc = base(&new_qmp);
    newc.arg("-incoming").arg(chan("main", &mig).to_string()).arg("-incoming").arg(chan("cpr", &cpr).to_string());
    let mut new = KillOnDrop(newc.spawn()?);
    watch_into(&mut new.0, &lines);
    let t = Instant::now();
    let sock = loop {
        match std::os::unix::net::UnixStream::connect(&old_qmp) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => bail!("QMP: {e}"),
        }
    };
    while !cpr.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = sock.try_clone()?;
    let mut r = BufReader::new(sock);
    let mut read = || -> Result<Value> {
        loop {
            let mut l = String::new();
            r.read_line(&mut l)?;
            let v: Value = serde_json::from_str(&l)?;
            if v.get("return").is_some() || v.get("error").is_some() || v.get("QMP").is_some() {
                return Ok(v);
            }
        }
    };
    read()?;
    let mut cmd = |c: Value| -> Result<Value> {
        writeln!(w, "{c}")?;
        read()
    };
    cmd(serde_json::json!({"execute": "qmp_capabilities"}))?;
    cmd(serde_json::json!({"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-transfer"}}))?;
    let t = Instant::now();
    let r = cmd(
        serde_json::json!({"execute": "migrate", "arguments": {"channels": [chan("main", &mig), chan("cpr", &cpr)]}}),
    )?;
    anyhow::ensure!(r.get("error").is_none(), "cpr-transfer: {r}");
    loop {
        let st = cmd(serde_json::json!({"execute": "query-migrate"}))?;
        match st["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => bail!("cpr-transfer failed: {st}"),
            _ if t.elapsed() > Duration::from_secs(30) => bail!("cpr-transfer did not complete"),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let n = count();
    let t1 = Instant::now();
    while count() < n + 30 && t1.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop((old, new));
    let l = lines.lock().unwrap_or_else(|p| p.into_inner());
    let first = l.iter().rposition(|x| *x <= t).unwrap_or(0);
    Ok(l[first..].windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).fold(0.0, f64::max))
}

fn stats(v: &[f64]) -> (String, String) {
    if v.is_empty() {
        return ("-".into(), "-".into());
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (format!("{:.2}", s[s.len() / 2]), format!("{:.2}", s[s.len() - 1]))
}

pub fn run(quick: bool, rounds: usize, qemu: Option<PathBuf>) -> Result<i32> {
    let rounds = if quick { 2 } else { rounds.max(5) };
    let dir = cache_dir().join(format!("bench-recovery-{}", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();

    // Warm upgrade across memory sizes and vCPU counts.
    let configs: &[(u64, u8)] =
        if quick { &[(256, 1)] } else { &[(256, 1), (1024, 1), (4096, 1), (8192, 1), (1024, 2), (1024, 4)] };
    for &(mem, vcpus) in configs {
        eprintln!("warm upgrade, {mem} MiB, {vcpus} vCPU ...");
        let vm = LiveVm::start(&dir.join("up"), mem, vcpus, COUNTER)?;
        let mut row = Row::new(format!("warm upgrade, {mem} MiB, {vcpus} vCPU"));
        if let Some(q) = &qemu {
            for _ in 0..rounds {
                match qemu_cpr(q, &dir.join("qemu"), mem, vcpus) {
                    Ok(g) => row.qemu.push(g),
                    Err(e) => eprintln!("  QEMU cpr-transfer: {e}"),
                }
            }
        }
        for _ in 0..rounds {
            let (g, ev) = vm.around("resumed", || {
                request(&vm.sock, &ApiRequest::Upgrade { binary: None })?;
                Ok(())
            })?;
            row.guest.push(g);
            row.vmm.push(ev["guest_pause_ms"].as_f64().unwrap_or(0.0));
        }
        vm.stop();
        rows.push(row);
    }

    // Crash re-exec, hang escalation and microreset in one 1 GiB VM.
    eprintln!("crash re-exec, hang, microreset ...");
    let vm = LiveVm::start(&dir.join("crash"), 1024, 1, COUNTER)?;
    let pause = |ev: &Value| ev["guest_pause_ms"].as_f64().unwrap_or(0.0);
    let what = "crash (SIGSEGV in a device) -> spare takes over, 1 GiB";
    let crash = vm.injections(what, "pio.write=segv", "resumed", rounds, true, pause)?;
    let what = "hang (100 ms watchdog) -> spare takes over, 1 GiB";
    let hang = vm.injections(what, "pio.write=hang", "resumed", rounds.min(3), true, |ev| pause(ev) + 100.0)?;
    let micro = vm.injections(
        "microreset (panic in the UART model)",
        "serial.write=panic",
        "microreset",
        rounds,
        false,
        |ev| ev["recovery_us"].as_f64().unwrap_or(0.0) / 1000.0,
    )?;
    vm.stop();
    // The same crash without a spare, on its own (no other guest running).
    let bare = LiveVm::start_with(&dir.join("crash-exec"), 1024, 1, COUNTER, &["--no-spare"])?;
    let what = "crash (SIGSEGV in a device) -> re-exec, no spare, 1 GiB";
    let reexec = bare.injections(what, "pio.write=segv", "resumed", rounds, false, pause)?;
    bare.stop();
    rows.extend([crash, reexec, hang, micro]);

    // Saved-VM reboot: snapshot to a file, restore in a new process.
    let snaps: &[(u64, u64)] = if quick { &[(256, 64)] } else { &[(256, 200), (1024, 800)] };
    for &(mem, used) in snaps {
        eprintln!("snapshot + restore, {mem} MiB ({used} MiB used) ...");
        let mut row = Row::new(format!("snapshot to file + restore, {mem} MiB, {used} MiB used"));
        for _ in 0..rounds.min(3) {
            let d = dir.join("snap");
            let vm = LiveVm::start(&d, mem, 1, &format!("{COUNTER} staunch.touch={used}"))?;
            let file = d.join("vm.snap");
            let t = Instant::now();
            let r = request(&vm.sock, &ApiRequest::Snapshot { path: file.clone() })?;
            anyhow::ensure!(r.ok, "snapshot: {:?}", r.error);
            let mut vm = vm;
            let _ = vm.child.wait();
            drop(vm);
            let mut c = Command::new("/proc/self/exe");
            c.args(["vmm", "restore", "--from"]).arg(&file);
            let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
            let lines = watch(&mut child);
            let t1 = Instant::now();
            while lines.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                if t1.elapsed() > Duration::from_secs(120) {
                    bail!("restored guest never printed");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            row.guest.push(t.elapsed().as_secs_f64() * 1e3);
            row.vmm.push(r.data["save_ms"].as_f64().unwrap_or(0.0));
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&file);
        }
        rows.push(row);
    }

    // Cold reboot: a new VM from the kernel; the guest's state is gone.
    eprintln!("cold reboot ...");
    let mut cold = Row::new("cold reboot (new VM, state lost), 1 GiB");
    for _ in 0..rounds {
        let t = Instant::now();
        let mut c = Command::new("/proc/self/exe");
        c.args(["vmm", "run", "--serial", "stdio", "--mem", "1024", "--kernel"]).arg(test_guest()?);
        c.args(["--cmdline", COUNTER]);
        let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let lines = watch(&mut child);
        while lines.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("cold boot never printed");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cold.guest.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = child.kill();
        let _ = child.wait();
    }
    rows.push(cold);
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!(
        "| recovery ({rounds} rounds) | Staunch guest-visible pause p50 ms | max ms | VMM-measured p50 ms | QEMU 10 cpr-transfer p50 ms | Staunch/QEMU |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let (g50, gmax) = stats(&r.guest);
        let (v50, _) = stats(&r.vmm);
        let (q50, _) = stats(&r.qemu);
        let ratio = match (g50.parse::<f64>(), q50.parse::<f64>()) {
            (Ok(g), Ok(q)) if q > 0.0 => format!("{:.2}", g / q),
            _ => "-".into(),
        };
        println!("| {} | {g50} | {gmax} | {v50} | {q50} | {ratio} |", r.what);
    }
    println!();
    println!(
        "guest-visible pause: largest gap between the guest's serial lines (one every ~2 ms) around the event; snapshot rows: snapshot request to the restored guest's first line (VMM column: save time); cold reboot: process start to first line; microreset VMM column: handler recovery time"
    );
    Ok(0)
}
