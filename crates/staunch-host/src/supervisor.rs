//! The global feedback loop. One thread decides; it never blocks on a
//! component or on the store (heartbeats and the store connection run on
//! their own threads). Each pass: wait up to a tick for a pidfd to become
//! readable, then for every component judge deaths (pidfds), takeovers by
//! its own spare or successor (the heartbeat answers from a new pid), hangs
//! (heartbeats unanswered past the threshold) and failed starts, act on
//! them in the escalation ladder's order, and reconcile the host toward the
//! definitions.

use crate::component::{Component, Health, Kind, Record, command, id_of};
use crate::config::HostConfig;
use crate::def::{DefError, VmDef};
use crate::probe::Probe;
use crate::proc::{self, Identity};
use crate::storeio::Link;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("another supervisor runs on {0} (its lock is held)")]
    Locked(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
    let what = what.into();
    move |err| HostError::Io { what, err }
}

const TICK: Duration = Duration::from_millis(10);

pub struct Supervisor {
    pub(crate) cfg: HostConfig,
    pub(crate) bin: PathBuf,
    pub(crate) comps: BTreeMap<String, Component>,
    pub(crate) link: Link,
    /// The definitions as last read (read counter, by VM), and what the
    /// supervisor made of them (checked on this host).
    pub(crate) defs_seen: u64,
    pub(crate) plan: Option<BTreeMap<String, Result<VmDef, DefError>>>,
    /// VMs whose guest powered off: kept stopped until the definitions
    /// show the `stopped` we wrote.
    pub(crate) powered_off: BTreeSet<String>,
    pub(crate) store_slot: String,
    pub(crate) events: PathBuf,
    pub(crate) dirty: bool,
    pub(crate) published: BTreeMap<String, String>,
    pub(crate) last_publish: Instant,
    pub(crate) notifier: crate::notify::Notifier,
    pub(crate) ready: bool,
    pub(crate) last_watchdog: Instant,
    /// Rolling upgrade: the generation asked for (its binary is `bin`),
    /// one refused (not a file), one halted at a failure, one done.
    pub(crate) upgrade: Option<crate::storeio::Upgrade>,
    pub(crate) refused: Option<u64>,
    pub(crate) halted: Option<u64>,
    pub(crate) upgraded: Option<u64>,
    pub(crate) renewal: Option<crate::renew::Renewal>,
    pub(crate) preflight: Option<crate::renew::Preflight>,
    /// The binary before the current generation (a halted upgrade goes
    /// back to it).
    pub(crate) prev_bin: Option<PathBuf>,
    pub(crate) last_renewal: Option<Instant>,
    /// Components whose timed renewal failed: not tried again before.
    pub(crate) renew_retry: BTreeMap<String, Instant>,
    /// When a component was last renewed or took its role (a failover).
    pub(crate) renewed_at: BTreeMap<String, Instant>,
    _lock: std::fs::File,
}

fn lock(cfg: &HostConfig) -> Result<std::fs::File, HostError> {
    let p = cfg.run_dir.join("host.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io(p.display().to_string()))?;
    // SAFETY: flock(2) on a file we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(HostError::Locked(cfg.run_dir.display().to_string()));
    }
    Ok(f)
}

impl Supervisor {
    pub fn new(cfg: HostConfig) -> Result<Supervisor, HostError> {
        let notifier = crate::notify::Notifier::from_env();
        std::fs::create_dir_all(cfg.run_dir.join("store")).map_err(io(cfg.run_dir.display().to_string()))?;
        let lock = lock(&cfg)?;
        proc::become_subreaper();
        let bin = match &cfg.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().map_err(io("the supervisor's own binary"))?,
        };
        let link = Link::start(cfg.store_socket(), Duration::from_millis(cfg.health.reconcile_ms));
        let mut s = Supervisor {
            events: cfg.events(),
            bin,
            comps: BTreeMap::new(),
            link,
            defs_seen: 0,
            plan: None,
            powered_off: BTreeSet::new(),
            store_slot: "a".into(),
            dirty: true,
            published: BTreeMap::new(),
            last_publish: Instant::now() - Duration::from_secs(10),
            notifier,
            ready: false,
            last_watchdog: Instant::now(),
            upgrade: None,
            refused: None,
            halted: None,
            upgraded: None,
            renewal: None,
            preflight: None,
            prev_bin: None,
            last_renewal: None,
            renew_retry: BTreeMap::new(),
            renewed_at: BTreeMap::new(),
            cfg,
            _lock: lock,
        };
        s.adopt()?;
        Ok(s)
    }

    pub(crate) fn emit(&self, event: &str, fields: serde_json::Value) {
        staunch_events::emit(Some(&self.events), event, fields);
    }

    /// Take over what the previous supervisor started: every recorded
    /// process that is still the same process (pid and start time) is
    /// watched again; a component none of whose processes is left is
    /// judged dead at once, in the normal way.
    fn adopt(&mut self) -> Result<(), HostError> {
        let Some(st) = crate::state::load(&self.cfg.state_file())? else { return Ok(()) };
        self.store_slot = st.store_slot;
        // Where a rolling upgrade stood: its binary, and a halt.
        if let Some(b) = st.binary.filter(|b| b.is_file() && st.generation.is_some()) {
            self.bin = b;
        }
        if let (Some(g), Some(b)) = (st.generation, st.binary_generation) {
            self.upgrade = Some(crate::storeio::Upgrade { binary: b, generation: g });
        }
        self.halted = st.halted;
        self.prev_bin = st.prev_binary;
        for rec in st.components {
            let mut fds = Vec::new();
            for id in std::iter::once(rec.leader).chain(rec.serving) {
                if let Some(fd) = proc::open(id) {
                    fds.push((id, fd));
                }
            }
            let id = id_of(&rec.kind);
            let adopted = !fds.is_empty();
            self.emit(
                if adopted { "component-adopted" } else { "component-not-adopted" },
                json!({"component": id, "pids": fds.iter().map(|(i, _)| i.pid).collect::<Vec<_>>(),
                       "outcome": if adopted { "watched again, not restarted" } else { "none of its processes is left" }}),
            );
            let c = self.component(rec, fds);
            self.comps.insert(id, c);
        }
        Ok(())
    }

    pub(crate) fn component(&self, rec: Record, fds: Vec<(Identity, std::os::fd::OwnedFd)>) -> Component {
        let (_, _, target) = command(&self.cfg, &self.bin, &rec.kind, rec.def.as_ref());
        let h = &self.cfg.health;
        let probe =
            target.map(|t| Probe::start(t, Duration::from_millis(h.heartbeat_ms), Duration::from_millis(h.hang_ms)));
        Component {
            rec,
            fds,
            probe,
            health: Health::Starting,
            since: Instant::now(),
            started_ms: 0,
            died: None,
            hung: None,
            budget: Default::default(),
            backoff: None,
            last_event: String::new(),
            renewing: false,
            looked: None,
            stopped_since: None,
        }
    }

    pub fn run(mut self) -> Result<(), HostError> {
        self.emit(
            "host-started",
            json!({"component": "host", "run_dir": self.cfg.run_dir, "adopted": self.comps.len()}),
        );
        loop {
            self.wait();
            proc::reap();
            let ids: Vec<String> = self.comps.keys().cloned().collect();
            for id in ids {
                self.check(&id);
            }
            self.reconcile();
            self.renew();
            self.publish();
            self.persist();
            self.notify();
        }
    }

    /// Up to a tick, or until a watched process dies.
    fn wait(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .comps
            .values()
            .flat_map(|c| {
                c.fds.iter().map(|(_, fd)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            })
            .collect();
        // SAFETY: poll(2) on pollfds we own, for at most one tick.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK.as_millis() as i32) };
    }

    fn notify(&mut self) {
        let store_ok = self.comps.get("store").is_some_and(|c| c.health == Health::Healthy);
        if !self.ready && store_ok && self.plan.is_some() {
            self.ready = true;
            self.notifier.send("READY=1\nSTATUS=supervising");
            self.emit("host-ready", json!({"component": "host", "components": self.comps.len()}));
        }
        // systemd's watchdog runs once the service is up (READY=1).
        if let Some(every) = self.notifier.watchdog_every
            && self.ready
            && self.last_watchdog.elapsed() >= every
        {
            self.notifier.send("WATCHDOG=1");
            self.last_watchdog = Instant::now();
        }
    }

    pub(crate) fn grace(&self) -> Duration {
        Duration::from_millis(self.cfg.health.grace_ms)
    }

    /// Judge one component: deaths, takeovers, hangs, starts, backoff.
    fn check(&mut self, id: &str) {
        let hang = Duration::from_millis(self.cfg.health.hang_ms);
        let start_timeout = Duration::from_millis(self.cfg.health.start_timeout_ms);
        // A silent process that is stopped is hung at the threshold; one
        // that runs may only be slow on a loaded host, and gets longer.
        let confirm = Duration::from_millis(self.cfg.health.hang_confirm_ms.max(self.cfg.health.hang_ms));
        let stall = Duration::from_millis(self.cfg.health.stall_ms);
        let grace = self.grace();
        let Some(c) = self.comps.get_mut(id) else { return };
        if c.health == Health::Backoff {
            if c.backoff.is_some_and(|(until, _)| Instant::now() >= until) {
                self.restart(id, "backoff over");
            }
            return;
        }
        if id == "store" && self.standby_serves() {
            self.promote_standby();
            return;
        }
        let Some(c) = self.comps.get_mut(id) else { return };
        let before = c.fds.len();
        c.fds.retain(|(_, fd)| proc::alive(fd));
        // Every watched process is gone (a spare may already answer: the
        // death is still a death, and its takeover a recovery).
        let all_lost = before > c.fds.len() && c.fds.is_empty();
        // A spare or successor that took over answers with its own pid.
        if let Some(p) = &c.probe {
            let pid = p.pid.load(std::sync::atomic::Ordering::Relaxed);
            let fresh = p.silent_for().is_none() && p.answered();
            if pid != 0
                && fresh
                && !c.fds.iter().any(|(i, _)| i.pid == pid)
                && let Some(ident) = proc::identity(pid)
                && let Some(fd) = proc::open(ident)
            {
                c.fds.push((ident, fd));
                c.rec.serving = Some(ident);
                self.dirty = true;
            }
        }
        let c = self.comps.get_mut(id).expect("still there");
        if all_lost && c.died.is_none() {
            c.died = Some(Instant::now());
            c.health = Health::Recovering;
            let leader = c.rec.leader.pid;
            // A planned renewal's old process leaves: no death.
            if !c.renewing {
                self.emit("component-died", json!({"component": id, "fault": "process exited", "process": leader}));
            }
        }
        let c = self.comps.get_mut(id).expect("still there");
        if let Some(d) = c.died {
            if !c.fds.is_empty() {
                c.died = None;
                c.health = Health::Healthy;
                if c.renewing {
                    return;
                }
                let by = c.serving_pid();
                let ms = d.elapsed().as_secs_f64() * 1e3;
                self.note(
                    id,
                    "component-recovered",
                    json!({"component": id, "rung": 2, "by": by,
                    "recover_ms": ms, "outcome": "taken over by the component's own spare or successor"}),
                );
            } else if !proc::group_alive(c.rec.leader.pid) || d.elapsed() > grace {
                self.dead(id);
            }
            return;
        }
        let silent = c.probe.as_ref().and_then(|p| p.silent_for());
        // A backend that answers but whose current request has run this
        // long without completing makes no progress: hung as well.
        let stuck = c.probe.as_ref().and_then(|p| p.stuck()).filter(|s| *s >= stall);
        let answered = match &c.rec.kind {
            // A standby is ready once it follows the primary (it has no
            // socket of its own to answer on).
            Kind::Store { standby: true, .. } => {
                let pid = c.rec.leader.pid;
                c.health != Health::Starting || standby_follows(&self.cfg.run_dir.join("store-events.jsonl"), pid)
            }
            _ => c.probe.as_ref().is_some_and(|p| p.answered()),
        };
        let c = self.comps.get_mut(id).expect("still there");
        match c.health {
            Health::Starting if answered && silent.is_none() => {
                c.health = Health::Healthy;
                let ms = c.since.elapsed().as_secs_f64() * 1e3;
                self.note(id, "component-ready", json!({"component": id, "ready_ms": ms}));
            }
            Health::Starting if c.since.elapsed() > start_timeout => {
                proc::kill_group(c.rec.leader);
                self.note(
                    id,
                    "component-start-failed",
                    json!({"component": id, "fault": "no heartbeat answer after start",
                    "after_ms": start_timeout.as_millis() as u64}),
                );
            }
            Health::Healthy
                if silent.is_some_and(|s| s >= hang && (s >= confirm || proc::stopped(c.serving_pid()))) =>
            {
                self.hung(id, silent.unwrap_or_default(), "hang")
            }
            Health::Healthy if stuck.is_some() => {
                self.hung(id, stuck.unwrap_or_default(), "no progress: a request in flight, none completed")
            }
            Health::Healthy if matches!(c.rec.kind, Kind::Store { .. }) => self.check_store(id),
            Health::Hung => {
                let since = c.hung.unwrap_or_else(Instant::now);
                // (A standby answers nothing: only its death ends its hang.)
                if c.probe.is_some() && silent.is_none() && stuck.is_none() {
                    c.health = Health::Healthy;
                    c.hung = None;
                    let ms = since.elapsed().as_secs_f64() * 1e3;
                    self.note(
                        id,
                        "component-recovered",
                        json!({"component": id, "fault": "hang", "rung": 2,
                        "recover_ms": ms, "by": self.comps[id].serving_pid(), "outcome": "answering again"}),
                    );
                } else if since.elapsed() > grace {
                    c.kill();
                }
            }
            _ => {}
        }
    }

    pub(crate) fn note(&mut self, id: &str, event: &str, fields: serde_json::Value) {
        self.emit(event, fields);
        if let Some(c) = self.comps.get_mut(id) {
            c.last_event = event.to_string();
        }
        self.dirty = true;
    }

    /// What the store says of itself (looked at every 100 ms). The primary
    /// is as good as hung when its scrub found damage no copy could repair
    /// (`store-unsound`: it refuses to serve; its standby's copy is whole).
    /// The standby has no socket to ask: it is hung when it is stopped for
    /// `hang_ms`, or when the primary dropped it (`store-standby-lost`: it
    /// stopped acknowledging records).
    fn check_store(&mut self, id: &str) {
        let hang = Duration::from_millis(self.cfg.health.hang_ms);
        let events = self.cfg.run_dir.join("store-events.jsonl");
        let c = self.comps.get_mut(id).expect("judged");
        if c.looked.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        c.looked = Some(Instant::now());
        let pid = c.serving_pid();
        // Events of this process: its pid, and not before it was started
        // (a recycled pid must not inherit an old process's events).
        let since = c.started_ms;
        let of = move |e: &serde_json::Value, event: &str, key: &str| {
            e["event"] == event && e[key] == pid && e["time_ms"].as_u64().unwrap_or(0) >= since
        };
        if !matches!(c.rec.kind, Kind::Store { standby: true, .. }) {
            let unsound = staunch_events::read(&events).iter().any(|e| of(e, "store-unsound", "pid"));
            if unsound {
                self.hung(id, Duration::ZERO, "unsound: its scrub found damage no copy of its own could repair");
            }
            return;
        }
        if proc::stopped(pid) {
            let since = *c.stopped_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= hang {
                return self.hung(id, since.elapsed(), "hang: stopped");
            }
        } else {
            c.stopped_since = None;
        }
        let lost = staunch_events::read(&events).iter().any(|e| of(e, "store-standby-lost", "standby_pid"));
        if lost {
            self.hung(id, Duration::ZERO, "the primary dropped it: it stopped acknowledging records");
        }
    }

    /// A heartbeat unanswered past the threshold while the process lives.
    fn hung(&mut self, id: &str, silent: Duration, fault: &str) {
        let c = self.comps.get_mut(id).expect("judged");
        c.health = Health::Hung;
        c.hung = Some(Instant::now());
        let pid = c.serving_pid();
        let action = match &c.rec.kind {
            // Its crash path hands the guest to its spare (rung 2); a
            // stopped VMM takes the signal when it continues.
            Kind::Vmm { .. } => {
                proc::signal(pid, libc::SIGABRT);
                proc::signal(pid, libc::SIGCONT);
                "SIGABRT: the VMM's crash path hands the guest to its spare"
            }
            Kind::Blk { .. } | Kind::Net { .. } => {
                proc::signal(pid, libc::SIGKILL);
                "SIGKILL of the serving process: its spare takes over"
            }
            Kind::Store { standby: true, .. } => {
                proc::signal(pid, libc::SIGKILL);
                "SIGKILL: a fresh standby follows the primary"
            }
            Kind::Store { .. } => {
                proc::signal(pid, libc::SIGKILL);
                "SIGKILL of the primary: its standby takes over"
            }
        };
        let ms = silent.as_secs_f64() * 1e3;
        self.note(
            id,
            "component-hung",
            json!({"component": id, "fault": fault, "process": pid,
            "detect_ms": ms, "action": action}),
        );
    }

    /// Every process of the component is gone, and no spare took over.
    fn dead(&mut self, id: &str) {
        let c = &self.comps[id];
        match c.rec.kind.clone() {
            Kind::Store { standby: false, slot } => self.store_primary_dead(id, &slot),
            Kind::Store { standby: true, slot } => {
                // A fresh standby copies the primary from scratch; within
                // the restart budget like any component (one that dies at
                // every start backs off).
                let _ = std::fs::remove_dir_all(self.cfg.run_dir.join("store").join(&slot));
                self.restart(id, "a fresh standby follows the primary");
            }
            Kind::Blk { .. } | Kind::Net { .. } => self.restart(id, "restart + replay: its frontend reconnects"),
            Kind::Vmm { vm } => self.vmm_dead(id, &vm),
        }
    }

    /// The store's socket is answered by the standby's process: it took
    /// over from a primary that died or was killed as hung.
    fn standby_serves(&self) -> bool {
        let (Some(p), Some(s)) =
            (self.comps.get("store").and_then(|c| c.probe.as_ref()), self.comps.get("store-standby"))
        else {
            return false;
        };
        p.answered() && p.silent_for().is_none() && p.pid.load(std::sync::atomic::Ordering::Relaxed) == s.rec.leader.pid
    }

    fn promote_standby(&mut self) {
        let id = "store";
        let mut s = self.comps.remove("store-standby").expect("present");
        let old = self.comps.remove(id).expect("present");
        proc::kill_group(old.rec.leader);
        let Kind::Store { slot, .. } = s.rec.kind.clone() else { unreachable!("a store") };
        s.rec.kind = Kind::Store { standby: false, slot: slot.clone() };
        s.probe = old.probe;
        s.health = Health::Healthy;
        s.budget = old.budget;
        s.rec.restarts = old.rec.restarts + 1;
        self.store_slot = slot;
        self.renewed_at.insert(id.to_string(), Instant::now());
        let by = s.rec.leader.pid;
        self.comps.insert(id.to_string(), s);
        let ms = old.died.or(old.hung).map(|d| d.elapsed().as_secs_f64() * 1e3);
        let gap =
            last_event(&self.cfg.run_dir.join("store-events.jsonl"), "store-failover").map(|e| e["gap_ms"].clone());
        self.note(
            id,
            "store-failover",
            json!({"component": id, "rung": 2, "by": by, "recover_ms": ms, "planned": old.renewing,
            "gap_ms_by_the_store": gap, "outcome": "the standby serves; a new standby is started"}),
        );
    }

    fn store_primary_dead(&mut self, id: &str, slot: &str) {
        let died = self.comps[id].died.unwrap_or_else(Instant::now);
        let standby = self.comps.get("store-standby").map(|s| (s.rec.leader.pid, s.fds.is_empty()));
        match standby {
            Some((_, false)) if died.elapsed() <= self.grace() => {}
            Some(_) => {
                // The standby did not take over: start the primary again from
                // its own log (it holds every acknowledged write).
                if let Some(s) = self.comps.remove("store-standby") {
                    proc::kill_group(s.rec.leader);
                }
                let _ = slot;
                self.restart(id, "restart from its log: the standby did not take over");
            }
            None => self.restart(id, "restart from its log (no standby)"),
        }
    }

    fn vmm_dead(&mut self, id: &str, vm: &str) {
        let c = &self.comps[id];
        let exit = last_event(&crate::component::VmPaths::new(&self.cfg, vm).vmm_events(), "vm-exit")
            .filter(|e| e["time_ms"].as_u64().unwrap_or(0) >= c.started_ms);
        let reason = exit.as_ref().and_then(|e| e["reason"].as_str().map(String::from));
        let on_poweroff = c.rec.def.as_ref().map(|d| d.on_poweroff).unwrap_or_default();
        match reason.as_deref() {
            Some("poweroff" | "requested")
                if !(reason.as_deref() == Some("poweroff") && on_poweroff == crate::def::OnPoweroff::Restart) =>
            {
                let why = reason.unwrap_or_default();
                self.stop_vm(vm, &format!("guest {why}"));
                self.powered_off.insert(vm.to_string());
                self.link.write(format!("{}/{vm}/state", crate::def::VM_ROOT), Some("stopped".into()));
            }
            Some("poweroff" | "reset") => self.restart(id, "the guest asked for it (not a failure)"),
            _ => {
                let fault = match &reason {
                    Some(r) => format!("the VMM stopped: {r}"),
                    None => "the VMM died without a word (SIGKILL, OOM): the guest's CPU state is gone".into(),
                };
                self.note(id, "guest-lost", json!({"component": id, "fault": fault, "rung": 4}));
                self.restart(id, "cold restart of the guest from its disks (rung 4: a guest restart, not a recovery)");
            }
        }
    }

    /// Replace the component's processes, within its restart budget.
    pub(crate) fn restart(&mut self, id: &str, why: &str) {
        let r = self.cfg.restart.clone();
        let Some(c) = self.comps.get_mut(id) else { return };
        let now = Instant::now();
        let window = Duration::from_secs(r.interval_s);
        while c.budget.front().is_some_and(|t| now.duration_since(*t) > window) {
            c.budget.pop_front();
        }
        let in_backoff = c.health == Health::Backoff;
        if !in_backoff && c.budget.len() >= r.burst as usize {
            let delay = c.backoff.map_or(Duration::from_millis(r.backoff_ms), |(_, d)| {
                (d * 2).min(Duration::from_millis(r.backoff_max_ms))
            });
            c.backoff = Some((now + delay, delay));
            c.health = Health::Backoff;
            c.fds.clear();
            proc::kill_group(c.rec.leader);
            let n = c.budget.len();
            self.note(
                id,
                "restart-budget-exhausted",
                json!({"component": id, "restarts": n, "within_s": r.interval_s,
                "next_try_ms": delay.as_millis() as u64, "outcome": "backoff"}),
            );
            return;
        }
        if in_backoff {
            c.budget.clear();
        }
        c.budget.push_back(now);
        c.rec.restarts += 1;
        let rung = if matches!(c.rec.kind, Kind::Vmm { .. }) { 4 } else { 2 };
        let event = if rung == 4 { "guest-restarted" } else { "component-restarted" };
        let died = c.died.map(|d| d.elapsed().as_secs_f64() * 1e3);
        match self.launch(id) {
            Ok(()) => self.note(id, event, json!({"component": id, "rung": rung, "why": why, "dead_for_ms": died})),
            Err(e) => {
                let c = self.comps.get_mut(id).expect("present");
                c.died = Some(Instant::now());
                c.health = Health::Recovering;
                self.note(id, "component-start-failed", json!({"component": id, "fault": e.to_string()}));
            }
        }
    }

    /// Start (or start again) the component's process.
    pub(crate) fn launch(&mut self, id: &str) -> Result<(), HostError> {
        let c = self.comps.get_mut(id).expect("present");
        c.kill();
        if let Some(p) = c.probe.take() {
            p.stop();
        }
        if matches!(c.rec.kind, Kind::Vmm { .. })
            && c.rec.boots > 0
            && let Some(d) = c.rec.def.as_mut()
        {
            // A restored guest that is lost boots cold from its disks: its
            // snapshot is older than they are.
            d.restore = None;
        }
        let (cmd, log, _) = command(&self.cfg, &self.bin, &c.rec.kind, c.rec.def.as_ref());
        if let Kind::Vmm { vm } = &c.rec.kind {
            let p = crate::component::VmPaths::new(&self.cfg, vm);
            std::fs::create_dir_all(&p.dir).map_err(io(p.dir.display().to_string()))?;
            if c.rec.boots > 0 && p.serial().exists() {
                let _ = std::fs::rename(p.serial(), p.dir.join(format!("serial.{}.log", c.rec.boots)));
            }
            c.rec.boots += 1;
        }
        if let Kind::Blk { vm, .. } | Kind::Net { vm, .. } = &c.rec.kind {
            let d = self.cfg.vm_dir(vm);
            std::fs::create_dir_all(&d).map_err(io(d.display().to_string()))?;
        }
        c.started_ms = wall_ms();
        let ident = proc::spawn(cmd, &log).map_err(io(format!("starting {id}")))?;
        let fd = proc::open(ident).ok_or_else(|| HostError::Io {
            what: format!("starting {id}"),
            err: std::io::Error::other("exited at once"),
        });
        // The generation a process belongs to is the upgrade's only if it
        // runs the upgrade's binary (after a halt, new ones run the old).
        let generation = match &self.upgrade {
            Some(u) if u.binary == self.bin => u.generation,
            _ => c.rec.generation,
        };
        let rec = Record { leader: ident, serving: None, binary: Some(self.bin.clone()), generation, ..c.rec.clone() };
        let mut n = self.component(rec, fd.map(|fd| vec![(ident, fd)]).unwrap_or_default());
        let old = self.comps.remove(id).expect("present");
        n.started_ms = old.started_ms;
        n.budget = old.budget;
        n.backoff = old.backoff;
        n.last_event = old.last_event;
        if n.fds.is_empty() {
            n.died = Some(Instant::now());
            n.health = Health::Recovering;
        }
        self.comps.insert(id.to_string(), n);
        self.dirty = true;
        Ok(())
    }
}

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn standby_follows(events: &std::path::Path, pid: u32) -> bool {
    staunch_events::read(events).iter().any(|e| e["event"] == "store-standby-following" && e["pid"] == pid)
}

/// The last event named `name` in an events file.
pub(crate) fn last_event(path: &std::path::Path, name: &str) -> Option<serde_json::Value> {
    staunch_events::read(path).into_iter().rev().find(|e| e["event"] == name)
}
