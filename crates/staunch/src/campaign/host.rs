//! `staunch campaign host`: a whole host under random faults. A real
//! `staunch host` supervises the store (primary and standby) and two VMs,
//! each with its `staunch blk` backend and the test guest's `blk-verify`;
//! the campaign injects a fault into a random component (SIGKILL, a hang by
//! SIGSTOP, a fatal signal, a failpoint, the supervisor itself, or two
//! components at once) and judges it by the guests' own evidence (progress,
//! no failed or mismatched block, boot count), the store (every
//! acknowledged write still there) and the reconciled host (every component
//! healthy again, nothing left running after the host is taken down). A VM
//! whose guest finished is judged (its final report and the host's check of
//! its disk) and replaced by a fresh one.

use super::Rng;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOCKS: u64 = 128;
const WRITES: u64 = 40_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    BlkKill,
    BlkHang,
    BlkAbrt,
    BlkGroupKill,
    VmmHang,
    VmmSegv,
    VmmFailpoint,
    VmmKill,
    StoreKill,
    StoreHang,
    StandbyKill,
    SupervisorKill,
    /// The store primary and a backend at once.
    CascadeStoreBlk,
    /// A backend and its VM's VMM at once.
    CascadeBlkVmm,
    /// A panic in the backend's device model (failpoint): its microreset.
    BlkPanic,
    /// A request that never completes while the backend answers pings.
    BlkStall,
    StandbyHang,
    /// A node corrupted in the primary's memory, then a scrub.
    StoreCorrupt,
    /// A node corrupted in the standby's copy, then a scrub.
    StandbyCorrupt,
}

const CATALOG: [Fault; 19] = [
    Fault::BlkKill,
    Fault::BlkHang,
    Fault::BlkAbrt,
    Fault::BlkGroupKill,
    Fault::VmmHang,
    Fault::VmmSegv,
    Fault::VmmFailpoint,
    Fault::VmmKill,
    Fault::StoreKill,
    Fault::StoreHang,
    Fault::StandbyKill,
    Fault::SupervisorKill,
    Fault::CascadeStoreBlk,
    Fault::CascadeBlkVmm,
    Fault::BlkPanic,
    Fault::BlkStall,
    Fault::StandbyHang,
    Fault::StoreCorrupt,
    Fault::StandbyCorrupt,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::BlkKill => "blk: SIGKILL serving process",
            Fault::BlkHang => "blk: SIGSTOP (hang)",
            Fault::BlkAbrt => "blk: SIGABRT",
            Fault::BlkGroupKill => "blk: SIGKILL every process",
            Fault::VmmHang => "vmm: SIGSTOP (hang)",
            Fault::VmmSegv => "vmm: SIGSEGV",
            Fault::VmmFailpoint => "vmm: failpoint pio.write=segv",
            Fault::VmmKill => "vmm: SIGKILL",
            Fault::StoreKill => "store: SIGKILL primary",
            Fault::StoreHang => "store: SIGSTOP primary (hang)",
            Fault::StandbyKill => "store: SIGKILL standby",
            Fault::SupervisorKill => "supervisor: SIGKILL, restarted",
            Fault::CascadeStoreBlk => "cascade: store + blk SIGKILL",
            Fault::CascadeBlkVmm => "cascade: blk SIGKILL + vmm SIGSEGV",
            Fault::BlkPanic => "blk: failpoint vhost.request=panic",
            Fault::BlkStall => "blk: failpoint vhost.request=hang",
            Fault::StandbyHang => "store: SIGSTOP standby (hang)",
            Fault::StoreCorrupt => "store: corrupt memory + scrub",
            Fault::StandbyCorrupt => "store: corrupt standby + scrub",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Recovered,
    /// The guest was booted again (rung 4): expected for a VMM SIGKILL.
    GuestRestart,
    Lost,
}

struct Row {
    fault: Fault,
    outcome: Outcome,
    /// The guests' own longest request or pause across the fault (ms).
    guest_ms: Option<f64>,
    why: String,
}

struct Host {
    dir: PathBuf,
    run: PathBuf,
    config: PathBuf,
    kernel: PathBuf,
    supervisor: Option<Child>,
    /// The last acknowledged write (a node to corrupt).
    last_ack: Option<String>,
}

impl Host {
    fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.run.join("events.jsonl"))
    }
    fn status(&self) -> Value {
        staunch_host::status::read(&self.run.join("host-status.json"))
    }
    fn component(&self, id: &str) -> Value {
        staunch_host::status::component(&self.status(), id)
    }
    fn pid(&self, id: &str) -> Option<u32> {
        self.component(id)["pid"].as_u64().map(|p| p as u32)
    }
    fn all_healthy(&self, ids: &[String]) -> bool {
        ids.iter().all(|i| self.component(i)["health"] == "healthy")
    }
    fn serial(&self, vm: &str) -> String {
        std::fs::read_to_string(self.run.join("vm").join(vm).join("serial.log")).unwrap_or_default()
    }
    fn start_supervisor(&mut self) -> Result<()> {
        let seen = self.events().iter().filter(|e| e["event"] == "host-ready").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("host.log"))?;
        let c = Command::new("/proc/self/exe")
            .arg("host")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.supervisor = Some(c);
        wait(Duration::from_secs(60), || self.events().iter().filter(|e| e["event"] == "host-ready").count() > seen)
            .context("the supervisor did not become ready")
    }
    fn kill_supervisor(&mut self) {
        if let Some(mut c) = self.supervisor.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn define(&self, name: &str) -> Result<PathBuf> {
        let disk = self.dir.join(format!("{name}.img"));
        std::fs::write(&disk, vec![0u8; 16 << 20])?;
        let def = format!(
            "kernel = \"{}\"\nmemory = 64\nvcpus = 1\ncmdline = \"staunch.work=blk-verify staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.qd=4 staunch.report=500\"\n[[disk]]\npath = \"{}\"\n",
            self.kernel.display(),
            disk.display()
        );
        let mut c = staunch_host::storeio::connect(&self.run.join("store.sock"))?;
        let def = staunch_host::def::VmDef::from_toml(&def).map_err(|e| anyhow::anyhow!("{e}"))?;
        staunch_host::storeio::define(&mut c, name, &def)?;
        Ok(disk)
    }
}

fn wait(within: Duration, f: impl Fn() -> bool) -> Result<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > within {
            bail!("timed out");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn signal(pid: Option<u32>, sig: i32) {
    if let Some(p) = pid.filter(|p| *p > 1) {
        // SAFETY: kill(2) of a component of the campaign's own host.
        unsafe { libc::kill(p as i32, sig) };
    }
}

fn reports(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("STAUNCH blk written=") && l.ends_with(|c: char| c.is_ascii_digit())).collect()
}

/// One VM of the campaign: its name, disk, and the guest restarts it had.
struct Vm {
    name: String,
    disk: PathBuf,
}

pub fn run(a: &super::CampaignArgs, rng: &mut Rng) -> Result<i32> {
    let dir = crate::guestrun::cache_dir().join(format!("campaign-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let run = dir.join("run");
    let config = dir.join("host.toml");
    std::fs::write(&config, format!("run_dir = \"{}\"\n", run.display()))?;
    let mut h = Host {
        kernel: crate::guestrun::test_guest()?,
        dir: dir.clone(),
        run,
        config,
        supervisor: None,
        last_ack: None,
    };
    h.start_supervisor()?;
    let res = campaign(&mut h, a, rng);
    h.kill_supervisor();
    let down = Command::new("/proc/self/exe").args(["host", "down", "--config"]).arg(&h.config).output()?;
    let orphans = orphans(&h.run);
    let (rows, checks) = res?;
    if !down.status.success() {
        bail!("host down: {}", String::from_utf8_lossy(&down.stderr));
    }
    Ok(report(&rows, &checks, orphans, a))
}

/// Processes still running with the campaign's run directory on their
/// command line after `host down`.
fn orphans(run: &Path) -> usize {
    std::thread::sleep(Duration::from_millis(200));
    let needle = run.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            !stat.contains(") Z ") && String::from_utf8_lossy(&cmd).contains(&needle)
        })
        .count()
}

/// What the end of each VM and of the campaign found.
#[derive(Default)]
struct Checks {
    vms: usize,
    mismatched_vms: Vec<String>,
    writes_lost: usize,
    writes_checked: usize,
}

fn campaign(h: &mut Host, a: &super::CampaignArgs, rng: &mut Rng) -> Result<(Vec<Row>, Checks)> {
    let mut rows = Vec::new();
    let mut checks = Checks::default();
    let mut round = 0;
    let mut vms: Vec<Vm> = Vec::new();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Duration::from_secs(a.deadline.max(20));
    for i in 0..a.runs {
        // Two VMs run at all times; one whose guest finished is judged.
        // A guest about to finish is left to finish, not faulted: its end
        // would stop its components before the fault's evidence appears.
        vms.retain(|v| {
            let near_end = reports(&h.serial(&v.name))
                .last()
                .and_then(|l| staunch_testguest::proto::field(l, "written")?.parse::<u64>().ok())
                .is_some_and(|w| w + 8_000 >= WRITES);
            if near_end {
                let _ = wait(Duration::from_secs(120), || h.serial(&v.name).contains("final=1"));
            }
            if h.serial(&v.name).contains("final=1") {
                judge_vm(h, v, &mut checks);
                false
            } else {
                true
            }
        });
        while vms.len() < 2 {
            let name = format!("v{round}");
            round += 1;
            let disk = h.define(&name)?;
            vms.push(Vm { name, disk });
        }
        let ids: Vec<String> = ["store".to_string(), "store-standby".to_string()]
            .into_iter()
            .chain(vms.iter().flat_map(|v| [format!("vm/{}/blk0", v.name), format!("vm/{}/vmm", v.name)]))
            .collect();
        if wait(Duration::from_secs(120), || h.all_healthy(&ids)).is_err() {
            bail!("the host did not become healthy before run {i}: {}", h.status());
        }
        for v in &vms {
            wait(Duration::from_secs(60), || !reports(&h.serial(&v.name)).is_empty()).ok();
        }
        // An acknowledged write, to find again at the end.
        let key = format!("/campaign/ack/{i}");
        let ack = staunch_host::storeio::connect(&h.run.join("store.sock"))
            .ok()
            .and_then(|mut c| c.write_value(0, &key, i.to_string().as_bytes()).ok());
        if let Some(Ok(_)) = ack {
            h.last_ack = Some(key.clone());
            acked.insert(key, i.to_string());
        }
        let fault = CATALOG[(rng.next() % CATALOG.len() as u64) as usize];
        let vm = &vms[(rng.next() % 2) as usize];
        let before: Vec<usize> = vms.iter().map(|v| reports(&h.serial(&v.name)).len()).collect();
        let restarts_before = count(h, "guest-restarted");
        let evidence_before = evidence(h, fault, &vm.name);
        let t = wall_ms();
        inject(h, fault, &vm.name)?;
        let j = Judging { vms: &vms, before: &before, restarts_before, evidence_before, ids: &ids, deadline, t };
        let row = judge(h, fault, &vm.name, &j);
        eprintln!(
            "[{:>4}/{}] {:<38} {:?}  guest {} ms  {}",
            i + 1,
            a.runs,
            fault.name(),
            row.outcome,
            row.guest_ms.map_or("-".into(), |g| format!("{g:.1}")),
            row.why
        );
        rows.push(row);
    }
    for v in &vms {
        if wait(Duration::from_secs(300), || h.serial(&v.name).contains("final=1")).is_ok() {
            judge_vm(h, v, &mut checks);
        } else {
            checks.mismatched_vms.push(format!("{}: never finished", v.name));
        }
    }
    let mut c = staunch_host::storeio::connect(&h.run.join("store.sock"))?;
    for (k, v) in &acked {
        checks.writes_checked += 1;
        if staunch_host::storeio::read(&mut c, k)?.as_deref() != Some(v.as_str()) {
            checks.writes_lost += 1;
        }
    }
    Ok((rows, checks))
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn count(h: &Host, event: &str) -> usize {
    h.events().iter().filter(|e| e["event"] == event).count()
}

fn inject(h: &mut Host, f: Fault, vm: &str) -> Result<()> {
    let blk = format!("vm/{vm}/blk0");
    let vmm = format!("vm/{vm}/vmm");
    match f {
        Fault::BlkKill => signal(h.pid(&blk), libc::SIGKILL),
        Fault::BlkHang => signal(h.pid(&blk), libc::SIGSTOP),
        Fault::BlkAbrt => signal(h.pid(&blk), libc::SIGABRT),
        Fault::BlkGroupKill => {
            if let Some(l) = h.component(&blk)["leader"].as_u64() {
                // SAFETY: killpg(2) of the backend's own group.
                unsafe { libc::killpg(l as i32, libc::SIGKILL) };
            }
        }
        Fault::VmmHang => signal(h.pid(&vmm), libc::SIGSTOP),
        Fault::VmmSegv => signal(h.pid(&vmm), libc::SIGSEGV),
        Fault::VmmFailpoint => {
            let sock = h.run.join("vm").join(vm).join("api.sock");
            let req = staunch_vmm::api::ApiRequest::Failpoint { spec: "pio.write=segv".into() };
            staunch_vmm::api::request_within(&sock, &req, Duration::from_secs(5))?;
        }
        Fault::VmmKill => signal(h.pid(&vmm), libc::SIGKILL),
        Fault::StoreKill => signal(h.pid("store"), libc::SIGKILL),
        Fault::StoreHang => signal(h.pid("store"), libc::SIGSTOP),
        Fault::StandbyKill => signal(h.pid("store-standby"), libc::SIGKILL),
        Fault::SupervisorKill => {
            h.kill_supervisor();
            h.start_supervisor()?;
        }
        Fault::CascadeStoreBlk => {
            let (s, b) = (h.pid("store"), h.pid(&blk));
            signal(s, libc::SIGKILL);
            signal(b, libc::SIGKILL);
        }
        Fault::CascadeBlkVmm => {
            let (b, v) = (h.pid(&blk), h.pid(&vmm));
            signal(b, libc::SIGKILL);
            signal(v, libc::SIGSEGV);
        }
        Fault::BlkPanic | Fault::BlkStall => {
            let action = if f == Fault::BlkPanic { "panic" } else { "hang" };
            let ctl = h.run.join("vm").join(vm).join("blk0.ctl");
            let mut s = std::os::unix::net::UnixStream::connect(&ctl)?;
            std::io::Write::write_all(&mut s, format!("failpoint vhost.request={action}\n").as_bytes())?;
        }
        Fault::StandbyHang => signal(h.pid("store-standby"), libc::SIGSTOP),
        Fault::StoreCorrupt | Fault::StandbyCorrupt => {
            use staunch_store::{client::nul, wire::Op};
            let what = if f == Fault::StoreCorrupt { "corrupt-memory" } else { "corrupt-standby" };
            let mut c = staunch_host::storeio::connect(&h.run.join("store.sock"))?;
            let key = h.last_ack.clone().unwrap_or_else(|| "/campaign".into());
            c.request(Op::Control, 0, &nul(&[what, &key]))?.map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            c.request(Op::Control, 0, &nul(&["scrub"]))?.map_err(|e| anyhow::anyhow!("scrub: {e}"))?;
        }
    }
    Ok(())
}

/// The sign that the fault was dealt with, as counts of the events that
/// show it (the supervisor's, or the VMM's own for a crash it recovered
/// itself): each must grow.
fn evidence(h: &Host, f: Fault, vm: &str) -> Vec<usize> {
    let blk = format!("vm/{vm}/blk0");
    let vmm = format!("vm/{vm}/vmm");
    let ev = h.events();
    let n = |event: &str, comp: &str| ev.iter().filter(|e| e["event"] == event && e["component"] == comp).count();
    let resumed = || {
        let p = h.run.join("vm").join(vm).join("vmm-events.jsonl");
        staunch_events::read(&p).iter().filter(|e| e["event"] == "resumed").count()
    };
    let blk_back = || n("component-recovered", &blk) + n("component-restarted", &blk);
    match f {
        Fault::BlkKill | Fault::BlkAbrt => vec![blk_back()],
        Fault::BlkHang => vec![n("component-hung", &blk)],
        Fault::BlkGroupKill => vec![n("component-restarted", &blk)],
        Fault::VmmHang => vec![n("component-hung", &vmm)],
        Fault::VmmSegv | Fault::VmmFailpoint => vec![resumed()],
        Fault::VmmKill => vec![n("guest-restarted", &vmm)],
        Fault::StoreKill | Fault::StoreHang => vec![n("store-failover", "store")],
        Fault::StandbyKill => vec![n("component-started", "store-standby") + n("component-restarted", "store-standby")],
        Fault::SupervisorKill => vec![ev.iter().filter(|e| e["event"] == "component-adopted").count()],
        Fault::CascadeStoreBlk => vec![n("store-failover", "store"), blk_back()],
        Fault::CascadeBlkVmm => vec![blk_back(), resumed()],
        Fault::BlkPanic => {
            let p = h.run.join("vm").join(vm).join("blk0-events.jsonl");
            vec![staunch_events::read(&p).iter().filter(|e| e["event"] == "microreset").count()]
        }
        Fault::BlkStall => vec![n("component-hung", &blk)],
        Fault::StandbyHang => vec![n("component-hung", "store-standby")],
        Fault::StoreCorrupt | Fault::StandbyCorrupt => {
            let p = h.run.join("store-events.jsonl");
            vec![staunch_events::read(&p).iter().filter(|e| e["event"] == "store-repaired").count()]
        }
    }
}

struct Judging<'a> {
    vms: &'a [Vm],
    before: &'a [usize],
    restarts_before: usize,
    evidence_before: Vec<usize>,
    ids: &'a [String],
    deadline: Duration,
    /// Wall-clock ms of the injection.
    t: u64,
}

/// Within the deadline: the fault's evidence, every component healthy
/// again in a status written after the injection, and every guest
/// reporting progress (two more reports, or its end).
fn judge(h: &Host, f: Fault, vm: &str, j: &Judging) -> Row {
    let (vms, before, ids, deadline) = (j.vms, j.before, j.ids, j.deadline);
    let t = Instant::now();
    // Let the fault take effect before asking whether all is well again.
    std::thread::sleep(Duration::from_millis(150));
    // After a guest restart its console starts over (the old one is kept
    // as serial.N.log): fewer reports than before, then two of the new boot.
    let progressed = |i: usize| {
        let log = h.serial(&vms[i].name);
        let n = reports(&log).len();
        n >= before[i] + 2 || log.contains("final=1") || (n < before[i] && n >= 2)
    };
    // A VM whose guest finished meanwhile is stopped by the supervisor.
    let live = || {
        let done: Vec<String> =
            vms.iter().filter(|v| h.serial(&v.name).contains("final=1")).map(|v| format!("vm/{}/", v.name)).collect();
        ids.iter().filter(|i| !done.iter().any(|d| i.starts_with(d.as_str()))).cloned().collect::<Vec<_>>()
    };
    let dealt = || evidence(h, f, vm).iter().zip(&j.evidence_before).all(|(a, b)| a > b);
    let fresh = || h.status()["time_ms"].as_u64().unwrap_or(0) > j.t + 100;
    let ok = wait(deadline.saturating_sub(t.elapsed()), || {
        dealt() && fresh() && h.all_healthy(&live()) && (0..vms.len()).all(progressed)
    })
    .is_ok();
    let restarted = count(h, "guest-restarted") > j.restarts_before;
    // One more report from each guest still running: the one that carries
    // a long request is printed after it completed, which may be after
    // the progress above was seen.
    if ok {
        let now: Vec<usize> = vms.iter().map(|v| reports(&h.serial(&v.name)).len()).collect();
        let _ = wait(Duration::from_secs(3), || {
            vms.iter().zip(&now).all(|(v, n)| {
                let log = h.serial(&v.name);
                reports(&log).len() > *n || log.contains("final=1")
            })
        });
    }
    // The guests' own figure: their longest request or pause (by their
    // clock, which runs on while the VMM is stopped) in the reports since.
    let guest_ms = vms
        .iter()
        .zip(before)
        .flat_map(|(v, b)| {
            reports(&h.serial(&v.name))
                .into_iter()
                .skip(*b)
                .flat_map(|l| {
                    ["maxio_us", "maxgap_us"]
                        .into_iter()
                        .filter_map(|k| staunch_testguest::proto::field(l, k)?.parse::<f64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        .map(|us| us / 1e3);
    let (outcome, why) = match (ok, restarted) {
        (false, _) => (
            Outcome::Lost,
            format!("within {deadline:?}: dealt with {}, healthy {}: {}", dealt(), h.all_healthy(&live()), h.status()),
        ),
        (true, true) => (Outcome::GuestRestart, "guest booted again from its disk (rung 4)".into()),
        (true, false) => (Outcome::Recovered, String::new()),
    };
    Row { fault: f, outcome, guest_ms: if outcome == Outcome::Recovered { guest_ms } else { None }, why }
}

/// A finished guest: its reports (every boot) show no failed or
/// mismatched block, and its disk holds every block's last write.
fn judge_vm(h: &Host, v: &Vm, checks: &mut Checks) {
    checks.vms += 1;
    let dir = h.run.join("vm").join(&v.name);
    let mut logs = vec![h.serial(&v.name)];
    for n in 1.. {
        match std::fs::read_to_string(dir.join(format!("serial.{n}.log"))) {
            Ok(l) => logs.push(l),
            Err(_) => break,
        }
    }
    let bad = logs.iter().flat_map(|l| reports(l)).find(|l| {
        ["mismatches", "errors"].iter().any(|k| staunch_testguest::proto::field(l, k).is_some_and(|x| x != "0"))
    });
    if let Some(l) = bad {
        checks.mismatched_vms.push(format!("{}: {l}", v.name));
        return;
    }
    if let Err(e) = check_disk(&v.disk, WRITES) {
        checks.mismatched_vms.push(format!("{}: disk: {e}", v.name));
    }
}

fn check_disk(disk: &Path, writes: u64) -> Result<(), String> {
    let bytes = std::fs::read(disk).map_err(|e| e.to_string())?;
    for lba in 0..BLOCKS.min(writes) {
        let off = lba as usize * 4096;
        let b: &[u8; 4096] = bytes[off..off + 4096].try_into().map_err(|_| "short disk".to_string())?;
        let seq = staunch_testguest::proto::check_block(b, lba).map_err(|e| format!("block {lba}: {e:?}"))?;
        let want = (0..writes).filter(|s| s % BLOCKS == lba).max().unwrap_or(0);
        if seq != want {
            return Err(format!("block {lba} holds write {seq}, not {want}"));
        }
    }
    Ok(())
}

fn report(rows: &[Row], c: &Checks, orphans: usize, a: &super::CampaignArgs) -> i32 {
    println!();
    println!("| component: fault | injections | recovered (no guest restart) | guest restarts (rung 4) | lost | guests' longest stall p50 ms | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let line = |name: &str, rs: Vec<&Row>| {
        let n = |o| rs.iter().filter(|r| r.outcome == o).count();
        let mut g: Vec<f64> = rs.iter().filter_map(|r| r.guest_ms).collect();
        g.sort_by(f64::total_cmp);
        let p50 = g.get(g.len() / 2).map_or("-".into(), |x| format!("{x:.1}"));
        let max = g.last().map_or("-".into(), |x| format!("{x:.1}"));
        println!(
            "| {name} | {} | {} | {} | {} | {p50} | {max} |",
            rs.len(),
            n(Outcome::Recovered),
            n(Outcome::GuestRestart),
            n(Outcome::Lost)
        );
    };
    for f in CATALOG {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.fault == f).collect();
        if !rs.is_empty() {
            line(f.name(), rs);
        }
    }
    let not_kill: Vec<&Row> = rows.iter().filter(|r| r.fault != Fault::VmmKill).collect();
    line("**all but VMM SIGKILL**", not_kill.clone());
    let rec = not_kill.iter().filter(|r| r.outcome == Outcome::Recovered).count();
    let frac = if not_kill.is_empty() { 1.0 } else { rec as f64 / not_kill.len() as f64 };
    println!();
    println!(
        "recovered {rec}/{} ({:.1} %) of faults other than a VMM SIGKILL without a guest restart",
        not_kill.len(),
        frac * 100.0
    );
    println!("VMs judged: {}; data mismatches: {}; store: {}/{} acknowledged writes found; orphan processes after host down: {orphans}",
        c.vms, c.mismatched_vms.len(), c.writes_checked - c.writes_lost, c.writes_checked);
    for m in &c.mismatched_vms {
        println!("  MISMATCH {m}");
    }
    let failed = !c.mismatched_vms.is_empty() || c.writes_lost > 0 || orphans > 0 || frac < a.min_recovered;
    i32::from(failed)
}
