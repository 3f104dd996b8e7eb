//! `staunch bench recovery`: how long the guest is stopped by each kind of
//! recovery, judged by the guest. The test guest's `counter` prints a report
//! line every couple of milliseconds, each with `maxgap_us`: the longest
//! interval its own calibrated TSC saw between two iterations of its loop
//! since its previous line. The guest's pause for one event is the largest
//! `maxgap_us` on the lines printed from the trigger until two lines after
//! the event: the primary column. Beside it, labelled as such, the host's
//! view (the largest gap between two report lines as the host reads them)
//! and the VMM's own figure from its events. A guest that does not report
//! `maxgap_us` gets "-" in the guest's column, never another figure.
//!
//! Every phase runs alone (see [`crate::idle`]): no Staunch VM while QEMU is
//! measured, no QEMU while Staunch is. Failed rounds are counted and shown,
//! never dropped.

use crate::guestrun::{cache_dir, test_guest};
use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use staunch_vmm::api::{request, ApiRequest};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const COUNTER: &str = "staunch.work=counter staunch.ring=0 staunch.chunk=500";

/// One report line of the guest: when the host read it, and the guest's own
/// longest gap since its previous line (None: the guest did not say).
#[derive(Clone, Copy)]
struct Line {
    at: Instant,
    maxgap_us: Option<u64>,
}

/// The guest's report lines, read from one or more VMM processes' stdout.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<Line>>>);

impl Lines {
    fn get(&self) -> MutexGuard<'_, Vec<Line>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self) -> usize {
        self.get().len()
    }

    /// Timestamp the report lines of `child`'s stdout, appending here (two
    /// processes, one guest: the same list).
    fn watch(&self, child: &mut Child) {
        let out = child.stdout.take().expect("piped stdout");
        let l = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(maxgap_us) = report_maxgap(&line) {
                    l.get().push(Line { at: Instant::now(), maxgap_us });
                }
            }
        });
    }

    fn wait(&self, n: usize, within: Duration, what: &str) -> Result<()> {
        let t = Instant::now();
        while self.count() < n {
            if t.elapsed() > within {
                bail!("{what} (no report line within {within:?})");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// What the guest and the host saw of a pause triggered at `t` whose
    /// end the host noticed at `t_ev`.
    fn seen(&self, t: Instant, t_ev: Instant) -> Seen {
        let l = self.get();
        Seen { guest_ms: guest_pause(&l, t, t_ev), host_ms: host_gap(&l, t) }
    }
}

/// For a report line of the guest, its `maxgap_us` if it has one; None for
/// any other output.
fn report_maxgap(line: &str) -> Option<Option<u64>> {
    let i = line.find(staunch_testguest::proto::LINE_PREFIX)?;
    Some(staunch_testguest::proto::field(line[i..].trim_end(), "maxgap_us").and_then(|v| v.parse().ok()))
}

/// The guest's own measure of a pause: the largest `maxgap_us` on the lines
/// read after `t` (the trigger) up to the second one read at or after
/// `t_ev` (the host saw the event); None if none of them carries it.
fn guest_pause(l: &[Line], t: Instant, t_ev: Instant) -> Option<f64> {
    let mut best: Option<u64> = None;
    let mut after = 0;
    for x in l.iter().filter(|x| x.at > t) {
        if let Some(g) = x.maxgap_us {
            best = Some(best.map_or(g, |b| b.max(g)));
        }
        if x.at >= t_ev {
            after += 1;
            if after == 2 {
                break;
            }
        }
    }
    best.map(|us| us as f64 / 1e3)
}

/// The host's view: the largest gap between consecutive report lines from
/// the last one before `t` on, in ms.
fn host_gap(l: &[Line], t: Instant) -> f64 {
    let first = l.iter().rposition(|x| x.at <= t).unwrap_or(0);
    l[first..].windows(2).map(|w| (w[1].at - w[0].at).as_secs_f64() * 1e3).fold(0.0, f64::max)
}

/// One recovery, as the guest and the host saw it.
#[derive(Clone, Copy)]
pub(crate) struct Seen {
    /// From the guest's own clock (`maxgap_us`); None: not reported.
    pub(crate) guest_ms: Option<f64>,
    /// From the host's reading of the report lines.
    pub(crate) host_ms: f64,
}

/// What a VM of the benchmark runs: enough to start it again after a
/// failed round.
#[derive(Clone)]
pub(crate) struct VmSpec {
    dir: PathBuf,
    mem: u64,
    vcpus: u8,
    cmdline: String,
    extra: Vec<&'static str>,
}

impl VmSpec {
    pub(crate) fn new(dir: PathBuf, mem: u64, vcpus: u8) -> VmSpec {
        VmSpec { dir, mem, vcpus, cmdline: COUNTER.into(), extra: vec![] }
    }
}

pub(crate) struct LiveVm {
    child: Child,
    pub(crate) sock: PathBuf,
    events: PathBuf,
    lines: Lines,
}

impl LiveVm {
    fn start(s: &VmSpec) -> Result<LiveVm> {
        let _ = std::fs::remove_dir_all(&s.dir);
        std::fs::create_dir_all(&s.dir)?;
        let (sock, events) = (s.dir.join("api.sock"), s.dir.join("events.jsonl"));
        let mut c = Command::new("/proc/self/exe");
        c.args(["vmm", "run", "--serial", "stdio", "--mem", &s.mem.to_string(), "--vcpus", &s.vcpus.to_string()]);
        c.arg("--kernel").arg(test_guest()?).arg("--cmdline").arg(&s.cmdline);
        c.arg("--api-socket").arg(&sock).arg("--events").arg(&events).args(&s.extra);
        c.env_remove("STAUNCH_FAILPOINTS");
        let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let lines = Lines::default();
        lines.watch(&mut child);
        let vm = LiveVm { child, sock, events, lines };
        vm.lines.wait(20, Duration::from_secs(60), "the guest did not start printing")?;
        Ok(vm)
    }

    fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.events)
    }

    /// The events after the first `seen`, up to the first `kind`.
    fn wait_event(&self, kind: &str, seen: usize) -> Result<Vec<Value>> {
        let t = Instant::now();
        loop {
            let evs = self.events();
            if let Some(i) = evs.iter().skip(seen).position(|e| e["event"] == kind) {
                return Ok(evs[seen..seen + i + 1].to_vec());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no {kind} event within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Run `act`, wait for `kind`, let the guest print again; returns what
    /// the guest and the host saw, and the VMM's events on the way.
    pub(crate) fn around(&self, kind: &str, act: impl FnOnce() -> Result<()>) -> Result<(Seen, Vec<Value>)> {
        let seen = self.events().len();
        let t = Instant::now();
        act()?;
        let evs = self.wait_event(kind, seen)?;
        let t_ev = Instant::now();
        let n = self.lines.count();
        self.lines.wait(n + 30, Duration::from_secs(30), "the guest stopped printing after the recovery")?;
        Ok((self.lines.seen(t, t_ev), evs))
    }

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

    /// Arm a failpoint. The fault may take the VMM down (into its re-exec)
    /// before it answers, so a lost reply is not an error.
    fn arm(&self, spec: &str) -> Result<()> {
        match request(&self.sock, &ApiRequest::Failpoint { spec: spec.into() }) {
            Ok(r) => anyhow::ensure!(r.ok, "{:?}", r.error),
            Err(e) => tracing::debug!("no reply after arming {spec}: {e}"),
        }
        Ok(())
    }

    /// Inject `spec`, measured around the VMM's `kind` event (the VMM's
    /// own figure from `vmm_ms`), with a ready spare first if `spare`.
    fn inject(
        &self,
        spec: &str,
        kind: &str,
        spare: bool,
        vmm_ms: impl Fn(&[Value]) -> Result<f64>,
    ) -> Result<(Seen, Option<f64>)> {
        if spare {
            self.wait_spare()?;
        }
        let (s, evs) = self.around(kind, || self.arm(spec))?;
        Ok((s, Some(vmm_ms(&evs)?)))
    }
}

/// Number `key` of the last `kind` event in `evs`.
pub(crate) fn num(evs: &[Value], kind: &str, key: &str) -> Result<f64> {
    evs.iter().rev().find(|e| e["event"] == kind).with_context(|| format!("no {kind} event"))?[key]
        .as_f64()
        .with_context(|| format!("the {kind} event has no {key}"))
}

/// A process that must not outlive its measurement, error or not: it and
/// everything below it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        end(&mut self.0);
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        end(&mut self.child);
    }
}

/// End `child` and its family. One already reaped is not signalled again
/// (its pid may be someone else's by now); what it left behind was
/// re-parented to us and goes in [`Machine::settle`].
fn end(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        staunch_vmm::handover::kill_family(child.id());
    }
    let _ = child.wait();
}

/// The rounds of one row on one side, failures included.
#[derive(Default)]
pub(crate) struct Side {
    pub(crate) guest: Vec<f64>,
    pub(crate) host: Vec<f64>,
    pub(crate) vmm: Vec<f64>,
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    /// Successful rounds whose guest did not report `maxgap_us`.
    unreported: usize,
}

impl Side {
    fn ok(&mut self, s: Seen, vmm: Option<f64>) {
        self.ok += 1;
        self.host.push(s.host_ms);
        match s.guest_ms {
            Some(g) => self.guest.push(g),
            None => self.unreported += 1,
        }
        self.vmm.extend(vmm);
    }

    fn fail(&mut self, what: &str, e: &anyhow::Error) {
        self.failed += 1;
        eprintln!("  FAILED round ({what}): {e:#}");
    }

    pub(crate) fn record(&mut self, what: &str, r: Result<(Seen, Option<f64>)>) {
        match r {
            Ok((s, v)) => self.ok(s, v),
            Err(e) => self.fail(what, &e),
        }
    }

    fn rounds(&self) -> String {
        format!("{} / {}", self.ok, self.failed)
    }
}

struct Row {
    what: String,
    staunch: Side,
    /// QEMU 10 cpr-transfer of the same guest, where there is a peer.
    qemu: Option<Side>,
    /// False where no guest clock spans the outage (a new guest).
    guest_clock: bool,
}

/// `rounds` rounds of `one` on the VM `spec` describes: started for the
/// first round and again after a failed one (the old one ended first).
pub(crate) fn on_vm(
    machine: &Machine,
    spec: &VmSpec,
    what: &str,
    rounds: usize,
    one: impl Fn(&LiveVm) -> Result<(Seen, Option<f64>)>,
) -> Side {
    let mut side = Side::default();
    let mut vm: Option<LiveVm> = None;
    for _ in 0..rounds {
        let mut round = || -> Result<(Seen, Option<f64>)> {
            if vm.is_none() {
                machine.settle()?;
                vm = Some(LiveVm::start(spec)?);
            }
            one(vm.as_ref().expect("started above"))
        };
        let r = round();
        if r.is_err() {
            vm = None;
        }
        side.record(what, r);
    }
    side
}

/// QEMU's cpr-transfer live update of the same guest (memfd-backed RAM):
/// start the old QEMU, let the guest print, start the new one waiting on the
/// cpr and migration channels, migrate over QMP, and measure the pause the
/// same way as Staunch's, over the report lines of both processes. Returns
/// it with QEMU's own "downtime" from query-migrate.
fn qemu_cpr(qemu: &Path, dir: &Path, mem: u64, vcpus: u8) -> Result<(Seen, Option<f64>)> {
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
    let lines = Lines::default();
    let mut old = KillOnDrop(base(&old_qmp).spawn()?);
    lines.watch(&mut old.0);
    lines.wait(20, Duration::from_secs(30), "the guest under QEMU did not start printing")?;
    let chan = |kind: &str, p: &Path| serde_json::json!({"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": p}});
    let mut newc = base(&new_qmp);
    newc.arg("-incoming").arg(chan("main", &mig).to_string()).arg("-incoming").arg(chan("cpr", &cpr).to_string());
    let mut new = KillOnDrop(newc.spawn()?);
    lines.watch(&mut new.0);
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
    let downtime = loop {
        let st = cmd(serde_json::json!({"execute": "query-migrate"}))?;
        match st["return"]["status"].as_str() {
            Some("completed") => break st["return"]["downtime"].as_f64(),
            Some("failed") => bail!("cpr-transfer failed: {st}"),
            _ if t.elapsed() > Duration::from_secs(30) => bail!("cpr-transfer did not complete"),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let t_ev = Instant::now();
    let n = lines.count();
    lines.wait(n + 30, Duration::from_secs(30), "the guest stopped printing after cpr-transfer")?;
    drop((old, new));
    Ok((lines.seen(t, t_ev), downtime))
}

fn stats(v: &[f64]) -> (String, String) {
    if v.is_empty() {
        return ("-".into(), "-".into());
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (format!("{:.2}", s[s.len() / 2]), format!("{:.2}", s[s.len() - 1]))
}

pub(crate) fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied()
}

pub fn run(quick: bool, rounds: usize, qemu: Option<PathBuf>, machine: &Machine) -> Result<i32> {
    let rounds = if quick { rounds.clamp(1, 2) } else { rounds.max(5) };
    let dir = cache_dir().join(format!("bench-recovery-{}", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();

    // Warm upgrade across memory sizes and vCPU counts; QEMU's cpr-transfer
    // of the same guest first, alone, then Staunch, alone.
    let configs: &[(u64, u8)] =
        if quick { &[(256, 1)] } else { &[(256, 1), (1024, 1), (4096, 1), (8192, 1), (1024, 2), (1024, 4)] };
    for &(mem, vcpus) in configs {
        let what = format!("warm upgrade, {mem} MiB, {vcpus} vCPU");
        let peer = qemu.as_ref().map(|q| {
            eprintln!("{what}: QEMU cpr-transfer ...");
            let mut side = Side::default();
            for _ in 0..rounds {
                let r = machine.settle().and_then(|()| qemu_cpr(q, &dir.join("qemu"), mem, vcpus));
                side.record("QEMU cpr-transfer", r);
            }
            side
        });
        eprintln!("{what}: Staunch ...");
        let staunch = on_vm(machine, &VmSpec::new(dir.join("up"), mem, vcpus), &what, rounds, warm_upgrade);
        rows.push(Row { what, staunch, qemu: peer, guest_clock: true });
    }

    // Crash through the spare, hang escalation and microreset in one 1 GiB
    // VM; the crash without a spare in another, on its own.
    eprintln!("crash, hang, microreset ...");
    let spec = VmSpec::new(dir.join("crash"), 1024, 1);
    let pause = |evs: &[Value]| num(evs, "resumed", "guest_pause_ms");
    let crash = "crash (SIGSEGV in a device) -> spare takes over, 1 GiB";
    let crash = (crash, on_vm(machine, &spec, crash, rounds, |vm| vm.inject("pio.write=segv", "resumed", true, pause)));
    let hang = "hang (100 ms watchdog) -> spare takes over, 1 GiB";
    let hang = (
        hang,
        on_vm(machine, &spec, hang, rounds.min(3), |vm| {
            // The watchdog's measured stuck time, then the pause to resume.
            vm.inject("pio.write=hang", "resumed", true, |evs| Ok(num(evs, "hang-detected", "stuck_ms")? + pause(evs)?))
        }),
    );
    let micro = "microreset (panic in the UART model)";
    let micro = (
        micro,
        on_vm(machine, &spec, micro, rounds, |vm| {
            vm.inject("serial.write=panic", "microreset", false, |evs| {
                Ok(num(evs, "microreset", "recovery_us")? / 1000.0)
            })
        }),
    );
    let bare = VmSpec { extra: vec!["--no-spare"], ..VmSpec::new(dir.join("crash-exec"), 1024, 1) };
    let reexec = "crash (SIGSEGV in a device) -> re-exec, no spare, 1 GiB";
    let reexec =
        (reexec, on_vm(machine, &bare, reexec, rounds, |vm| vm.inject("pio.write=segv", "resumed", false, pause)));
    for (what, staunch) in [crash, reexec, hang, micro] {
        rows.push(Row { what: what.into(), staunch, qemu: None, guest_clock: true });
    }

    // Saved-VM reboot: snapshot to a file, restore in a new process.
    let snaps: &[(u64, u64)] = if quick { &[(256, 64)] } else { &[(256, 200), (1024, 800)] };
    for &(mem, used) in snaps {
        eprintln!("snapshot + restore, {mem} MiB ({used} MiB used) ...");
        let what = format!("snapshot to file + restore, {mem} MiB, {used} MiB used");
        let mut side = Side::default();
        for _ in 0..rounds.min(3) {
            let r = machine.settle().and_then(|()| snapshot_restore(&dir.join("snap"), mem, used));
            side.record(&what, r);
        }
        rows.push(Row { what, staunch: side, qemu: None, guest_clock: true });
    }

    // Cold reboot: a new VM from the kernel; the guest's state is gone.
    eprintln!("cold reboot ...");
    let what = "cold reboot (new VM, state lost), 1 GiB";
    let mut cold = Side::default();
    for _ in 0..rounds {
        let r = machine.settle().and_then(|()| cold_boot());
        cold.record(what, r);
    }
    rows.push(Row { what: what.into(), staunch: cold, qemu: None, guest_clock: false });
    machine.settle()?;
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&rows, machine);
    Ok(0)
}

/// One warm upgrade of a running VM: what the guest saw, and the VMM's
/// own figure (its `resumed` event's `guest_pause_ms`).
pub(crate) fn warm_upgrade(vm: &LiveVm) -> Result<(Seen, Option<f64>)> {
    let (s, evs) = vm.around("resumed", || {
        let r = request(&vm.sock, &ApiRequest::Upgrade { binary: None })?;
        anyhow::ensure!(r.ok, "upgrade refused: {:?}", r.error);
        Ok(())
    })?;
    Ok((s, Some(num(&evs, "resumed", "guest_pause_ms")?)))
}

/// One saved-VM reboot: the outage from the snapshot request to the
/// restored guest's first line (the VMM's figure: its save time).
pub(crate) fn snapshot_restore(d: &Path, mem: u64, used: u64) -> Result<(Seen, Option<f64>)> {
    let spec = VmSpec { cmdline: format!("{COUNTER} staunch.touch={used}"), ..VmSpec::new(d.to_path_buf(), mem, 1) };
    let mut vm = LiveVm::start(&spec)?;
    let file = d.join("vm.snap");
    let lines = vm.lines.clone();
    let t = Instant::now();
    let r = request(&vm.sock, &ApiRequest::Snapshot { path: file.clone() })?;
    anyhow::ensure!(r.ok, "snapshot: {:?}", r.error);
    let _ = vm.child.wait();
    drop(vm);
    let n = lines.count();
    let mut c = Command::new("/proc/self/exe");
    c.args(["vmm", "restore", "--from"]).arg(&file);
    let mut child = KillOnDrop(c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?);
    lines.watch(&mut child.0);
    lines.wait(n + 1, Duration::from_secs(120), "the restored guest never printed")?;
    let first = lines.get()[n].at;
    lines.wait(n + 3, Duration::from_secs(30), "the restored guest stopped printing")?;
    let guest_ms = guest_pause(&lines.get(), t, first);
    drop(child);
    let _ = std::fs::remove_file(&file);
    Ok((Seen { guest_ms, host_ms: (first - t).as_secs_f64() * 1e3 }, r.data["save_ms"].as_f64()))
}

/// One cold boot: process start to the guest's first line.
pub(crate) fn cold_boot() -> Result<(Seen, Option<f64>)> {
    let t = Instant::now();
    let mut c = Command::new("/proc/self/exe");
    c.args(["vmm", "run", "--serial", "stdio", "--mem", "1024", "--kernel"]).arg(test_guest()?);
    c.args(["--cmdline", COUNTER]);
    let mut child = KillOnDrop(c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?);
    let lines = Lines::default();
    lines.watch(&mut child.0);
    lines.wait(1, Duration::from_secs(60), "the cold-booted guest never printed")?;
    let first = lines.get()[0].at;
    Ok((Seen { guest_ms: None, host_ms: (first - t).as_secs_f64() * 1e3 }, None))
}

fn print_table(rows: &[Row], machine: &Machine) {
    println!();
    machine.banner();
    println!(
        "| {} | Staunch rounds ok / failed | guest pause (guest clock) p50 ms | max ms | serial-line gap seen by the host p50 ms | max ms | VMM-reported p50 ms | QEMU 10 cpr-transfer rounds ok / failed | QEMU guest pause (guest clock) p50 ms | QEMU serial-line gap seen by the host p50 ms | QEMU-reported downtime p50 ms | Staunch/QEMU |",
        machine.head("recovery")
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut unreported = Vec::new();
    let mut stopped_clock = Vec::new();
    for r in rows {
        let s = &r.staunch;
        let (g50, gmax) = if r.guest_clock { stats(&s.guest) } else { ("n/a".into(), "n/a".into()) };
        let (h50, hmax) = stats(&s.host);
        let (v50, _) = stats(&s.vmm);
        if r.guest_clock && s.unreported > 0 {
            unreported.push(format!("{} (Staunch, {} of {} rounds)", r.what, s.unreported, s.ok));
        }
        // The pause a VMM reports about itself is time the guest could not
        // run: a guest clock far below it has been stopped across the pause.
        // (The host's line gap is no check: it adds the line interval and
        // the console's buffering.)
        let mut clock_check = |side: &Side, who: &str| {
            if let (Some(g), Some(v)) = (median(&side.guest), median(&side.vmm)) {
                if g < v / 2.0 && v - g > 1.0 {
                    stopped_clock.push(format!("{} ({who}: guest {g:.2} ms, reported {v:.2} ms)", r.what));
                }
            }
        };
        if r.guest_clock {
            clock_check(s, "Staunch");
        }
        let (qr, qg, qh, qv, ratio) = match &r.qemu {
            Some(q) => {
                if q.unreported > 0 {
                    unreported.push(format!("{} (QEMU, {} of {} rounds)", r.what, q.unreported, q.ok));
                }
                clock_check(q, "QEMU");
                // Like with like: the guest's clock on both sides if both
                // have it, else the host's view on both.
                let ratio = match (median(&s.guest), median(&q.guest), median(&s.host), median(&q.host)) {
                    (Some(a), Some(b), _, _) if b > 0.0 => format!("{:.2} (guest clock)", a / b),
                    (_, _, Some(a), Some(b)) if b > 0.0 => format!("{:.2} (host-seen gap)", a / b),
                    _ => "-".into(),
                };
                (q.rounds(), stats(&q.guest).0, stats(&q.host).0, stats(&q.vmm).0, ratio)
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {g50} | {gmax} | {h50} | {hmax} | {v50} | {qr} | {qg} | {qh} | {qv} | {ratio} |",
            r.what,
            s.rounds()
        );
    }
    println!();
    println!("guest pause (guest clock), the primary figure: the largest maxgap_us (the guest's own longest interval between two iterations of its loop, from its calibrated TSC) on the report lines printed from the trigger until two lines after the event; p50 and max over the rounds that succeeded.");
    let measured = rows.iter().filter(|r| r.guest_clock).flat_map(|r| [Some(&r.staunch), r.qemu.as_ref()]).flatten();
    let (rounds, with) = measured.fold((0, 0), |(n, g), s| (n + s.ok, g + s.guest.len()));
    if with == 0 && rounds > 0 {
        println!("NOTE: \"-\" under guest pause (guest clock), every row: the guest did not report maxgap_us on its report lines (this test guest does not measure it); no other figure is put in its place.");
    } else if !unreported.is_empty() {
        println!(
            "NOTE: \"-\" (or fewer rounds) under guest pause (guest clock): the guest did not report maxgap_us in {}; no other figure is put in its place.",
            unreported.join("; ")
        );
    }
    if !stopped_clock.is_empty() {
        println!(
            "WARNING: the guest's clock saw much less than the pause its VMM reports in {}: a VMM that restores the guest's TSC without the time that passed hides the pause from the guest's clock.",
            stopped_clock.join("; ")
        );
    }
    println!("serial-line gap seen by the host (secondary): the largest gap between two of the guest's report lines (one every ~2 ms) as the host reads them, from the last line before the trigger until 30 lines after the event; snapshot rows: snapshot request to the restored guest's first line; cold reboot: process start to the first line (a new guest: no guest clock spans the outage, n/a).");
    println!("VMM-reported: the VMM's own figure from its events, not the guest's: pause to resume (warm upgrade, crash); hang: the watchdog's measured stuck time (hang-detected stuck_ms) plus pause to resume; microreset: the handler's recovery time; snapshot: save time. QEMU-reported downtime: QEMU's own figure from query-migrate.");
    println!("rounds ok / failed: every round is counted; a failed round is reported on stderr and its VM started afresh; no Staunch VM ran while QEMU was measured, nor QEMU while Staunch was.");
    machine.footer();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_pause_is_the_guests_own_figure_or_nothing() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let line = |ms, g| Line { at: at(ms), maxgap_us: g };
        // Trigger at 10 ms, event seen at 40 ms: lines at 12 and 41 and 43
        // count, 45 does not; the 9 ms line is before the trigger.
        let l = [
            line(9, Some(9000)),
            line(12, Some(100)),
            line(41, Some(28_000)),
            line(43, Some(300)),
            line(45, Some(50_000)),
        ];
        assert_eq!(guest_pause(&l, at(10), at(40)), Some(28.0));
        assert!((host_gap(&l, at(10)) - 29.0).abs() < 0.01);
        // Today's guest: no maxgap_us, no guest figure.
        let l = [line(9, None), line(12, None), line(41, None), line(43, None)];
        assert_eq!(guest_pause(&l, at(10), at(40)), None);
    }

    #[test]
    fn report_lines_carry_maxgap() {
        assert_eq!(report_maxgap("STAUNCH counter=5 tick=3 cpus=1 maxgap_us=1234\r"), Some(Some(1234)));
        assert_eq!(report_maxgap("\u{1b}[0mSTAUNCH blk written=7 maxgap_us=88"), Some(Some(88)));
        assert_eq!(report_maxgap("STAUNCH counter=5 tick=3 cpus=1"), Some(None));
        assert_eq!(report_maxgap("some other output"), None);
    }
}
