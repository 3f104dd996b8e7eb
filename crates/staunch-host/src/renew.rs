//! Planned renewals: proactive rejuvenation on a timer (RootHammer) and the
//! host-wide rolling upgrade to a new binary. Both replace a component's
//! serving process without its guest noticing more than a pause: a VMM by
//! a warm upgrade (its successor takes the guest over in memory), a backend
//! by an upgrade through its spare (the frontend keeps its connection), the
//! store primary by a failover to its standby, the standby by a fresh one.
//!
//! One renewal at a time on the host, at least `rejuvenate.spacing_ms`
//! apart, and none while any component is starting, recovering or hung: a
//! renewal never competes with a repair. A rolling upgrade goes in
//! dependency order (standby, store, backends, VMMs) and halts at the
//! first component that fails to take the new binary (the old process
//! serves on); asking again (a new generation) retries.

use crate::component::{Health, Kind, VmPaths};
use crate::probe::{Target, ping};
use crate::proc;
use crate::storeio::Upgrade;
use crate::supervisor::{Supervisor, last_event, wall_ms};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError, channel};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Why {
    /// Its process ran for its kind's rejuvenation period.
    Timer,
    /// A rolling upgrade asked for a newer generation.
    Upgrade,
}

/// A renewal in progress.
/// A new binary being asked for its version before any component runs it.
pub struct Preflight {
    pub upgrade: Upgrade,
    pub started: Instant,
    pub rx: Receiver<Result<String, String>>,
}

/// What `BINARY --version` says, if it says it is staunch. Read from its
/// output, not its exit status (the supervisor reaps every child).
fn version_of(bin: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut c = std::process::Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    // One that does not answer is killed after 10 s (by pidfd: its pid may
    // have been reaped and reused by then).
    if let Ok(fd) = proc::pidfd_open(c.id()) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            proc::pidfd_kill(&fd);
        });
    }
    let mut out = String::new();
    let _ = c.stdout.take().expect("piped").take(4096).read_to_string(&mut out);
    let out = out.trim().to_string();
    if out.starts_with("staunch ") { Ok(out) } else { Err(format!("`--version` said {out:?}, not staunch's version")) }
}

pub struct Renewal {
    pub id: String,
    pub why: Why,
    /// The process that served when it began, and the component's leader
    /// (a VMM's keeper, a backend's first process: it stays through a
    /// renewal, and changes only if the component was restarted).
    pub from: u32,
    pub leader: u32,
    /// The serving process did not run `binary` when it began: an exec in
    /// place shows as the same pid now running it.
    pub exe_changes: bool,
    pub started: Instant,
    pub started_ms: u64,
    pub binary: PathBuf,
    pub generation: u64,
    pub action: &'static str,
    /// VMMs and backends: the thread that asked and waits for the new
    /// process to answer.
    pub done: Option<Receiver<Result<(), String>>>,
}

/// Where a component sits in a rolling upgrade's order.
fn rank(kind: &Kind) -> u8 {
    match kind {
        Kind::Store { standby: true, .. } => 0,
        Kind::Store { standby: false, .. } => 1,
        Kind::Blk { .. } | Kind::Net { .. } => 2,
        Kind::Vmm { .. } => 3,
    }
}

/// The rejuvenation policy a kind of component follows.
fn policy(kind: &Kind) -> &'static str {
    match kind {
        Kind::Vmm { .. } => "vmm",
        Kind::Blk { .. } | Kind::Net { .. } => "backend",
        Kind::Store { .. } => "store",
    }
}

impl Supervisor {
    pub(crate) fn renew(&mut self) {
        // A new generation is taken between renewals only, so that the
        // binary a failed renewal goes back to is the one before it.
        if self.renewal.is_some() {
            self.follow_renewal();
            return;
        }
        self.take_upgrade();
        if !self.ready
            || self.comps.values().any(|c| matches!(c.health, Health::Starting | Health::Recovering | Health::Hung))
        {
            return;
        }
        // Timed renewals are spread out; a rolling upgrade goes on as soon
        // as the previous step is done and everything is healthy.
        let spacing = Duration::from_millis(self.cfg.rejuvenate.spacing_ms);
        let spaced = self.last_renewal.is_none_or(|t| t.elapsed() >= spacing);
        match self.next_renewal() {
            Some((id, Why::Upgrade)) => self.begin_renewal(&id, Why::Upgrade),
            Some((id, Why::Timer)) if spaced => self.begin_renewal(&id, Why::Timer),
            _ => {}
        }
    }

    /// A new generation in the store: the binary every component is to run,
    /// once it has shown it runs (`BINARY --version` answers `staunch ...`;
    /// asked on a thread: the loop never waits for it).
    fn take_upgrade(&mut self) {
        if let Some(p) = &self.preflight {
            let verdict = match p.rx.try_recv() {
                Ok(v) => v,
                Err(TryRecvError::Empty) if p.started.elapsed() < Duration::from_secs(10) => return,
                Err(_) => Err("no answer to --version within 10 s".into()),
            };
            let p = self.preflight.take().expect("checked");
            match verdict {
                Ok(version) => self.accept_upgrade(p.upgrade, &version),
                Err(e) => self.refuse_upgrade(&p.upgrade, &e),
            }
            return;
        }
        let Some(u) = self.link.upgrade() else { return };
        let seen = self.upgrade.as_ref().map_or(0, |w| w.generation).max(self.refused.unwrap_or(0));
        if u.generation <= seen {
            return;
        }
        if !u.binary.is_file() {
            return self.refuse_upgrade(&u, "not a file");
        }
        let (tx, rx) = channel();
        let bin = u.binary.clone();
        let _ = std::thread::Builder::new().name("preflight".into()).spawn(move || {
            let _ = tx.send(version_of(&bin));
        });
        self.preflight = Some(Preflight { upgrade: u, started: Instant::now(), rx });
    }

    fn refuse_upgrade(&mut self, u: &Upgrade, why: &str) {
        self.refused = Some(u.generation);
        self.emit(
            "host-upgrade-refused",
            json!({"component": "host", "generation": u.generation, "binary": u.binary,
                   "fault": why, "outcome": "every component keeps its binary"}),
        );
    }

    fn accept_upgrade(&mut self, u: Upgrade, version: &str) {
        self.prev_bin = Some(self.bin.clone());
        self.bin = u.binary.clone();
        self.dirty = true;
        let behind = self.comps.values().filter(|c| c.rec.generation < u.generation).count();
        if behind > 0 {
            self.emit(
                "host-upgrade-started",
                json!({"component": "host", "generation": u.generation, "binary": u.binary,
                       "version": version, "components": behind}),
            );
        }
        self.upgrade = Some(u);
    }

    fn next_renewal(&mut self) -> Option<(String, Why)> {
        if let Some(u) = self.upgrade.clone()
            && self.halted != Some(u.generation)
        {
            let mut behind: Vec<_> = self
                .comps
                .iter()
                .filter(|(_, c)| c.rec.generation < u.generation)
                .map(|(i, c)| (rank(&c.rec.kind), i))
                .collect();
            behind.sort();
            if let Some((_, id)) = behind.iter().find(|(_, id)| self.comps[*id].health == Health::Healthy) {
                return Some(((*id).clone(), Why::Upgrade));
            }
            if behind.is_empty() && self.upgraded != Some(u.generation) {
                self.upgraded = Some(u.generation);
                self.emit(
                    "host-upgrade-done",
                    json!({"component": "host", "generation": u.generation, "binary": u.binary,
                           "components": self.comps.len()}),
                );
            }
        }
        // The component that is most overdue.
        let now = Instant::now();
        self.comps
            .iter()
            .filter(|(_, c)| c.health == Health::Healthy)
            .filter(|(id, _)| self.renew_retry.get(*id).is_none_or(|t| now >= *t))
            .filter_map(|(id, c)| {
                let period = self.cfg.rejuvenate.period(policy(&c.rec.kind))?;
                // Since its process started or it took its role (a promoted
                // standby is an old process in a new role).
                let age = proc::age(c.serving_pid())?;
                let age = self.renewed_at.get(id).map_or(age, |t| age.min(t.elapsed()));
                (age >= period).then(|| (age - period, id.clone()))
            })
            .max()
            .map(|(_, id)| (id, Why::Timer))
    }

    fn begin_renewal(&mut self, id: &str, why: Why) {
        let binary = self.bin.clone();
        let generation = match why {
            Why::Upgrade => self.upgrade.as_ref().map_or(0, |u| u.generation),
            Why::Timer => self.comps[id].rec.generation,
        };
        let timeout = Duration::from_millis(self.cfg.rejuvenate.timeout_ms);
        let standby_ok = self.comps.get("store-standby").is_some_and(|s| s.health == Health::Healthy);
        let c = self.comps.get_mut(id).expect("chosen from the components");
        let from = c.serving_pid();
        let leader = c.rec.leader.pid;
        let exe_changes = !runs(from, &binary);
        c.renewing = true;
        let (action, done) = match c.rec.kind.clone() {
            Kind::Vmm { vm } => {
                let api = VmPaths::new(&self.cfg, &vm).api();
                let b = binary.clone();
                (
                    "warm upgrade: the successor takes the guest over in memory",
                    Some(spawn(move || vmm(&api, &b, from, timeout))),
                )
            }
            Kind::Blk { vm, index } | Kind::Net { vm, index } => {
                let name = c.rec.kind.name();
                let ctl = VmPaths::new(&self.cfg, &vm).backend(name, index, ".ctl");
                let b = binary.clone();
                (
                    "upgrade through its spare: the frontend keeps its connection",
                    Some(spawn(move || backend(&ctl, &b, from, exe_changes, timeout))),
                )
            }
            Kind::Store { standby: true, .. } => {
                proc::signal(from, libc::SIGTERM);
                ("a fresh standby replaces it", None)
            }
            Kind::Store { standby: false, .. } if standby_ok => {
                proc::signal(from, libc::SIGTERM);
                ("failover to the standby; a fresh standby follows", None)
            }
            Kind::Store { standby: false, .. } => {
                let _ = self.launch(id);
                ("restart from its log (no standby: clients wait for it)", None)
            }
        };
        self.emit(
            "component-rejuvenating",
            json!({"component": id, "why": why, "from": from, "binary": binary, "generation": generation, "action": action}),
        );
        self.renewal = Some(Renewal {
            id: id.to_string(),
            why,
            from,
            leader,
            exe_changes,
            started: Instant::now(),
            started_ms: wall_ms(),
            binary,
            generation,
            action,
            done,
        });
    }

    fn follow_renewal(&mut self) {
        let r = self.renewal.as_mut().expect("checked");
        let asked = match &r.done {
            None => Ok(true),
            Some(rx) => match rx.try_recv() {
                Ok(Ok(())) => {
                    r.done = None;
                    Ok(true)
                }
                Ok(Err(e)) => Err(e),
                Err(TryRecvError::Empty) => Ok(false),
                Err(TryRecvError::Disconnected) => Err("the renewal's thread ended without a word".into()),
            },
        };
        let (id, from, leader) = (r.id.clone(), r.from, r.leader);
        let timeout = Duration::from_millis(self.cfg.rejuvenate.timeout_ms);
        let Some(c) = self.comps.get(&id) else {
            let r = self.renewal.take().expect("checked");
            self.emit(
                "component-rejuvenate-abandoned",
                json!({"component": r.id, "why": r.why, "outcome": "it was stopped"}),
            );
            return;
        };
        // A VMM's first process stays as its keeper after handing over (it
        // does not touch the guest): the serving process is what counts.
        let in_place = matches!(c.rec.kind, Kind::Blk { .. } | Kind::Net { .. })
            && self.renewal.as_ref().is_some_and(|r| r.exe_changes && runs(from, &r.binary));
        let replaced = c.health == Health::Healthy
            && (in_place
                || c.serving_pid() != from && (from == c.rec.leader.pid || !c.fds.iter().any(|(i, _)| i.pid == from)));
        // A VMM or backend restarted meanwhile (its renewal crashed it, or
        // something else did) was not renewed: it was repaired.
        let restarted = !matches!(c.rec.kind, Kind::Store { .. }) && c.rec.leader.pid != leader;
        match asked {
            _ if restarted => self.renewal_failed("it died and was restarted during its renewal"),
            Ok(true) if replaced => self.renewed(),
            Err(e) => self.renewal_failed(&e),
            _ if c.health == Health::Backoff => {
                self.renewal_failed("its new process dies at every start (restart budget exhausted)")
            }
            _ if r_elapsed(&self.renewal) > timeout => {
                let state = format!(
                    "health {:?}, serving {}, watching {:?}, asked {asked:?}",
                    c.health,
                    c.serving_pid(),
                    c.fds.iter().map(|(i, _)| i.pid).collect::<Vec<_>>()
                );
                self.renewal_failed(&format!("not replaced within {} ms ({state})", timeout.as_millis()))
            }
            _ => {}
        }
    }

    fn renewed(&mut self) {
        let r = self.renewal.take().expect("checked");
        let c = self.comps.get_mut(&r.id).expect("checked");
        c.renewing = false;
        // A store process replaced is a new process started from `bin`
        // (its record says so already); a VMM or backend took `binary`.
        if !matches!(c.rec.kind, Kind::Store { .. }) {
            c.rec.generation = c.rec.generation.max(r.generation);
            c.rec.binary = Some(r.binary.clone());
        }
        let to = c.serving_pid();
        let mut ev = json!({"component": r.id, "why": r.why, "rung": "planned", "from": r.from, "to": to,
                            "took_ms": r.started.elapsed().as_secs_f64() * 1e3, "binary": r.binary,
                            "generation": r.generation, "outcome": r.action});
        match &c.rec.kind {
            Kind::Vmm { vm } => {
                let resumed = last_event(&VmPaths::new(&self.cfg, vm).vmm_events(), "resumed")
                    .filter(|e| e["time_ms"].as_u64().unwrap_or(0) >= r.started_ms);
                ev["guest_pause_ms_by_the_vmm"] = resumed.map(|e| e["guest_pause_ms"].clone()).unwrap_or_default();
            }
            Kind::Store { standby: false, .. } => {
                let f = last_event(&self.cfg.run_dir.join("store-events.jsonl"), "store-failover")
                    .filter(|e| e["time_ms"].as_u64().unwrap_or(0) >= r.started_ms);
                ev["gap_ms_by_the_store"] = f.map(|e| e["gap_ms"].clone()).unwrap_or_default();
            }
            _ => {}
        }
        self.renew_retry.remove(&r.id);
        self.renewed_at.insert(r.id.clone(), Instant::now());
        self.last_renewal = Some(Instant::now());
        self.note(&r.id, "component-rejuvenated", ev);
    }

    fn renewal_failed(&mut self, why: &str) {
        let r = self.renewal.take().expect("checked");
        if let Some(c) = self.comps.get_mut(&r.id) {
            c.renewing = false;
        }
        let period = self.comps.get(&r.id).and_then(|c| self.cfg.rejuvenate.period(policy(&c.rec.kind)));
        self.renew_retry.insert(r.id.clone(), Instant::now() + period.unwrap_or(Duration::from_secs(60)));
        self.last_renewal = Some(Instant::now());
        self.note(
            &r.id,
            "component-rejuvenate-failed",
            json!({"component": r.id, "why": r.why, "fault": why, "from": r.from,
                   "outcome": "the component is judged as usual from here"}),
        );
        if r.why == Why::Upgrade {
            // What starts from now on (repairs too) starts from the binary
            // that worked.
            self.halted = Some(r.generation);
            if let Some(b) =
                self.prev_bin.clone().filter(|_| self.upgrade.as_ref().is_some_and(|u| u.generation == r.generation))
            {
                self.bin = b;
            }
            self.dirty = true;
            self.emit(
                "host-upgrade-halted",
                json!({"component": "host", "generation": r.generation, "at": r.id, "fault": why,
                       "binary_now": self.bin,
                       "outcome": "the rest keep their binary; new processes start from the old one; ask again to retry"}),
            );
        }
    }
}

fn r_elapsed(r: &Option<Renewal>) -> Duration {
    r.as_ref().map_or(Duration::ZERO, |r| r.started.elapsed())
}

fn spawn(f: impl FnOnce() -> Result<(), String> + Send + 'static) -> Receiver<Result<(), String>> {
    let (tx, rx) = channel();
    let _ = std::thread::Builder::new().name("renewal".into()).spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Until another process answers `target` (or `failed` says why not).
fn until_replaced(
    target: &Target,
    from: u32,
    within: Duration,
    mut failed: impl FnMut(&serde_json::Value) -> Option<String>,
) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < within {
        std::thread::sleep(Duration::from_millis(5));
        let Ok((pid, info)) = ping(target, Duration::from_secs(1)) else { continue };
        if pid != from {
            return Ok(());
        }
        if let Some(e) = failed(&info) {
            return Err(e);
        }
    }
    Err(format!("process {from} still serves after {} ms", within.as_millis()))
}

/// Warm upgrade of a VMM to `bin`: its successor answers, or it rolled back.
fn vmm(api: &Path, bin: &Path, from: u32, within: Duration) -> Result<(), String> {
    use staunch_vmm::api::{ApiRequest, request_within};
    let target = Target::Vmm(api.to_path_buf());
    let (_, st) = ping(&target, Duration::from_secs(2)).map_err(|e| format!("status: {e}"))?;
    let failures = st["upgrade_failures"].as_u64().unwrap_or(0);
    let r = request_within(api, &ApiRequest::Upgrade { binary: Some(bin.to_path_buf()) }, Duration::from_secs(5))
        .map_err(|e| format!("upgrade request: {e}"))?;
    if !r.ok {
        return Err(format!("upgrade refused: {}", r.error.unwrap_or_default()));
    }
    until_replaced(&target, from, within, |st| {
        (st["upgrade_failures"].as_u64().unwrap_or(0) > failures)
            .then(|| format!("the VMM rolled back: {}", st["last_upgrade_error"]))
    })
}

/// Upgrade of a backend through its spare, to `bin`.
fn backend(ctl: &Path, bin: &Path, from: u32, exe_changes: bool, within: Duration) -> Result<(), String> {
    let mut s = std::os::unix::net::UnixStream::connect(ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(format!("upgrade {}\n", bin.display()).as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("ok") {
        return Err(format!("upgrade refused: {}", line.trim()));
    }
    // With no upgraded spare ready in time the backend execs the new binary
    // in place: the same pid, running `bin`, is a renewal too.
    match until_replaced(&Target::Backend(ctl.to_path_buf()), from, within, |_| None) {
        Err(_) if exe_changes && runs(from, bin) => Ok(()),
        r => r,
    }
}

/// Process `pid` runs the file `bin`.
pub(crate) fn runs(pid: u32, bin: &Path) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    exe.is_some_and(|e| std::fs::canonicalize(bin).is_ok_and(|b| b == e))
}
