//! `staunch campaign vmm|blk|net`: inject random real faults into running
//! VMMs (`vmm`), into the `staunch blk` backend serving their disk (`blk`)
//! or into the `staunch net` backend serving their network (`net`, see
//! [`net`]), and judge each by the guest's own evidence.
//!
//! For `blk`, the faults are the backend's failpoints (armed over its
//! control socket) with every catchable action, fatal signals and SIGKILL
//! sent to the serving process, and hangs (SIGSTOP, then SIGKILL after
//! 300 ms, as a supervisor would): each is recovered by the backend's spare
//! taking over and the inflight region, or inside the backend (a panic in a
//! queue worker; a hang its watchdog catches).
//!
//! Each VM runs the test guest's `blk-verify` (sequence-numbered, checksummed
//! block writes read back and verified) on 2 vCPUs. Faults are injected one
//! at a time: failpoints armed over the control socket (every point with
//! every action), fatal signals sent to a random thread of the VMM, and
//! SIGKILL (which no process can survive; reported apart).
//!
//! The judge is strict and uses only the guest's evidence: after a fault the
//! guest must report progress again within a deadline with `written` rising,
//! no new failed request (`errors`), no new mismatch, and still its first and
//! only boot; a failpoint that never fired is "not fired", not a recovery,
//! and leaves the denominator. At the end of each VM the host checks that
//! every block on the disk holds its last write for the count the guest
//! reported, and that the console stream is intact; a failure is charged as
//! a data mismatch even to a run already counted as lost. The pause is the
//! guest's own (`maxgap_us`), with the VMM's figure beside it.

mod host;
mod net;

use crate::childvm::{ChildVm, Spec};
use anyhow::{Context, Result};
use serde_json::Value;
use staunch_testguest::proto;
use staunch_vmm::api::ApiRequest;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct CampaignArgs {
    /// What to attack: the VMM, the vhost-user block backend or the
    /// vhost-user network backend.
    #[arg(value_parser = ["vmm", "blk", "net", "host"])]
    target: String,
    /// Number of injections.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Injections per VM before starting a fresh one.
    #[arg(long, default_value_t = 10)]
    per_vm: usize,
    /// Switch recovery off (STAUNCH_NO_RECOVERY=1): the baseline.
    #[arg(long)]
    baseline: bool,
    /// Seconds a guest has to show progress after a fault.
    #[arg(long, default_value_t = 10)]
    deadline: u64,
    /// Fail (exit 1) below this fraction of catchable faults recovered.
    /// Any data mismatch fails regardless.
    #[arg(long, default_value_t = 0.99)]
    min_recovered: f64,
}

#[derive(Debug, Clone)]
enum Fault {
    Failpoint(&'static str, staunch_fault::Action),
    Signal(i32),
    Kill,
    /// Faults of the block backend's serving process.
    BackendFailpoint(&'static str, staunch_fault::Action),
    BackendSignal(i32),
    BackendKill,
    BackendHang,
}

impl Fault {
    fn class(&self) -> String {
        match self {
            Fault::Failpoint(_, a) => format!("failpoint {}", a.name()),
            Fault::Signal(s) => format!("signal {}", sig_name(*s)),
            Fault::Kill => "SIGKILL (uncatchable)".into(),
            Fault::BackendFailpoint(_, a) => format!("backend failpoint {}", a.name()),
            Fault::BackendSignal(s) => format!("backend signal {}", sig_name(*s)),
            Fault::BackendKill => "backend SIGKILL".into(),
            Fault::BackendHang => "backend SIGSTOP, killed after 300 ms".into(),
        }
    }
    fn describe(&self) -> String {
        match self {
            Fault::Failpoint(p, a) | Fault::BackendFailpoint(p, a) => format!("{p}={}", a.name()),
            other => other.class(),
        }
    }
}

fn sig_name(s: i32) -> &'static str {
    match s {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        _ => "?",
    }
}

const SIGNALS: [i32; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

/// Points whose `corrupt` has nothing to corrupt: left out rather than
/// counted as recoveries from a fault that did nothing.
const NO_CORRUPT: [&str; 3] = ["vcpu.loop", "api.request", "api.reply"];

/// A backend's failpoints with every action (none has a field to
/// corrupt), fatal signals, SIGKILL and a hang of its serving process; the
/// network backend's own points for `net`.
fn backend_catalog(net: bool) -> Vec<Fault> {
    use staunch_fault::Action;
    let mut v = Vec::new();
    // vhost.message fires only on a control message, which a running
    // guest's frontend never sends: it is tested at set-up (blk_backend);
    // the net.* points are the net backend's.
    let ours = |n: &str| (n.starts_with("vhost.") && n != "vhost.message") || (net && n.starts_with("net."));
    for p in staunch_fault::BACKEND.iter().filter(|p| ours(p.name)) {
        for a in Action::ALL.into_iter().filter(|a| *a != Action::Corrupt) {
            v.push(Fault::BackendFailpoint(p.name, a));
        }
    }
    v.extend(SIGNALS.into_iter().map(Fault::BackendSignal));
    v.push(Fault::BackendKill);
    v.push(Fault::BackendHang);
    v
}

/// Every VMM failpoint with every catchable action, the fatal signals, and
/// SIGKILL.
fn catalog() -> Vec<Fault> {
    use staunch_fault::Action;
    let mut v = Vec::new();
    for p in staunch_fault::ALL {
        for a in Action::ALL {
            if a == Action::Corrupt && NO_CORRUPT.contains(&p.name) {
                continue;
            }
            v.push(Fault::Failpoint(p.name, a));
        }
    }
    for s in SIGNALS {
        v.push(Fault::Signal(s));
    }
    v.push(Fault::Kill);
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Recovered,
    /// Armed, never hit: no evidence either way.
    NotFired,
    /// The guest runs on but noticed: a failed request, a second boot, no
    /// rising write count.
    Hurt,
    Lost,
    Mismatch,
}

struct Row {
    fault: Fault,
    outcome: Outcome,
    /// The guest's own longest pause around the fault (its clock).
    guest_ms: Option<f64>,
    /// What the VMM's events say about itself.
    vmm_ms: Option<f64>,
    how: String,
    components: Vec<String>,
}

/// xorshift64: reproducible from a seed (the campaign's, a benchmark's).
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const BLOCKS: u64 = 256;
const EVERY: u64 = 200;
/// Writes a stopped guest may have done past its last report: the rest of
/// a report interval and its requests in flight (generously).
const SLACK: u64 = EVERY + 64;
const REPORT: &str = "STAUNCH blk written=";

fn start_vm(dir: &Path, baseline: bool, backend: bool) -> Result<ChildVm> {
    let cmdline =
        format!("staunch.work=blk-verify staunch.writes=0 staunch.blocks={BLOCKS} staunch.report={EVERY} staunch.qd=4");
    let env: &[(&str, &str)] = if baseline { &[("STAUNCH_NO_RECOVERY", "1")] } else { &[] };
    ChildVm::start(dir, &Spec { vcpus: 2, mem_mib: 256, cmdline: &cmdline, disk_mib: 8, env, backend, args: &[] })
}

/// The guest's counters as its reports show them.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    reports: usize,
    boots: usize,
    written: u64,
    mismatches: u64,
    errors: u64,
}

fn num(line: &str, key: &str) -> u64 {
    proto::field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn seen(lines: &[String]) -> Seen {
    let reports: Vec<&String> = lines.iter().filter(|l| l.starts_with(REPORT)).collect();
    let last = reports.last().map(|l| l.as_str()).unwrap_or("");
    Seen {
        reports: reports.len(),
        boots: lines.iter().filter(|l| l.starts_with("STAUNCH ready")).count(),
        written: num(last, "written"),
        mismatches: num(last, "mismatches"),
        errors: num(last, "errors"),
    }
}

/// Judge the guest's reports after a fault: `Some((outcome, why))` if it
/// was hurt.
fn judge(before: &Seen, lines: &[String]) -> Option<(Outcome, String)> {
    let now = seen(lines);
    if now.mismatches > before.mismatches {
        return Some((Outcome::Mismatch, format!("guest saw {} mismatches", now.mismatches - before.mismatches)));
    }
    if now.boots != 1 {
        return Some((Outcome::Hurt, format!("the guest booted {} times", now.boots)));
    }
    if now.errors > before.errors {
        return Some((Outcome::Hurt, format!("{} guest requests failed", now.errors - before.errors)));
    }
    let mut w = before.written;
    for l in lines.iter().filter(|l| l.starts_with(REPORT)).skip(before.reports) {
        let n = num(l, "written");
        if n <= w {
            return Some((Outcome::Hurt, format!("written went from {w} to {n}")));
        }
        w = n;
    }
    None
}

/// The largest `key` (`maxgap_us`: the guest's longest pause; `maxio_us`:
/// its longest request; `maxrtt_us`: its longest round trip) the guest
/// reported on the `report` lines after `from`, in ms.
fn guest_pause(lines: &[String], from: usize, key: &str, report: &str) -> Option<f64> {
    lines
        .iter()
        .filter(|l| l.starts_with(report))
        .skip(from)
        .filter_map(|l| proto::field(l, key)?.parse::<f64>().ok())
        .reduce(f64::max)
        .map(|us| us / 1000.0)
}

/// Stop the guest where it is, then check from the host: the disk holds
/// every block's last write for the count the guest reported, and its
/// console stream is intact. Keeps the VM's files when something is wrong.
fn close(mut vm: ChildVm, keep: bool) -> Result<(), String> {
    if vm.alive() {
        let _ = vm.request(&ApiRequest::Pause {});
    }
    let lines = vm.lines();
    let written = seen(&lines).written;
    vm.kill();
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    let mut problems = Vec::new();
    match std::fs::read(&vm.disk) {
        Err(e) => problems.push(format!("disk unreadable: {e}")),
        Ok(bytes) => {
            if let Err(e) = staunch_testguest::disk::check(&bytes, BLOCKS, written, written + SLACK) {
                problems.push(format!("disk check: {} bad blocks, first: {}", e.len(), e[0]));
            }
        }
    }
    let console = staunch_testguest::console::blk_report_errors(&log, EVERY);
    if !console.is_empty() {
        problems.push(format!("console: {} broken lines, first: {}", console.len(), console[0]));
    }
    if problems.is_empty() && !keep {
        let _ = std::fs::remove_dir_all(&vm.dir);
        return Ok(());
    }
    eprintln!("           (kept {} for inspection)", vm.dir.display());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Close the VM and charge a failed host check to its last injection, as a
/// data mismatch whatever it was counted as before.
fn close_and_judge(vm: ChildVm, rows: &mut [Row], first_row: usize, keep: bool) -> usize {
    match close(vm, keep) {
        Ok(()) => 0,
        Err(why) => {
            if let Some(last) = rows[first_row..].last_mut() {
                last.how = format!("{} (was {:?}: {})", why, last.outcome, last.how);
                last.outcome = Outcome::Mismatch;
            }
            why.matches("console").count()
        }
    }
}

/// What the VMM's events report about itself: its measured pause.
fn vmm_pause(events: &[Value]) -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for e in events {
        let ms = match e["event"].as_str() {
            Some("microreset") => e["recovery_us"].as_f64().map(|u| u / 1000.0),
            Some("hang-detected") => e["stuck_ms"].as_f64(),
            Some("resumed") => e["guest_pause_ms"].as_f64(),
            Some("backend-reconnected") => e["outage_us"].as_f64().map(|u| u / 1000.0),
            // The backend's spare: from the death seen to the rings running.
            Some("backend-takeover") => e["resumed_us"].as_f64().map(|u| u / 1000.0),
            _ => None,
        };
        if let Some(ms) = ms {
            total += ms;
            any = true;
        }
    }
    any.then_some(total)
}

/// The components the VMM's events name for a fault.
fn components(events: &[Value]) -> Vec<String> {
    let mut c: Vec<String> = events
        .iter()
        .filter_map(|e| match e["event"].as_str()? {
            "microreset" | "hang-detected" => e["component"].as_str().map(String::from),
            "resumed" => Some("vmm process".into()),
            "backend-takeover" => Some("backend spare takeover".into()),
            _ => None,
        })
        .collect();
    c.sort();
    c.dedup();
    c
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i])
}

/// Inject `fault` into `v`; false if it could not be delivered.
fn inject(v: &ChildVm, fault: &Fault, rng: &mut Rng) -> bool {
    match fault {
        Fault::Failpoint(p, act) => {
            if let Err(e) = v.arm(&format!("{p}={}", act.name())) {
                tracing::debug!("arming: {e}");
            }
            if *p == "record.save" {
                // The record is written by a handover: ask for one.
                let _ = v.request(&ApiRequest::Upgrade { binary: None });
            }
            true
        }
        Fault::Signal(s) => {
            let (pid, tids) = v.thread_ids();
            if tids.is_empty() {
                return false;
            }
            let tid = tids[(rng.next() % tids.len() as u64) as usize];
            // SAFETY: tgkill to a thread of the VMM we started.
            unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid, *s) == 0 }
        }
        Fault::Kill => {
            // SAFETY: kill(2) of the VMM we started (or its successor).
            unsafe { libc::kill(v.vmm_pid() as i32, libc::SIGKILL) == 0 }
        }
        Fault::BackendFailpoint(p, act) => {
            let Some(b) = &v.blk else { return false };
            b.control(&format!("failpoint {p}={}", act.name())).is_ok_and(|r| r == "ok")
        }
        Fault::BackendSignal(_) | Fault::BackendKill | Fault::BackendHang => {
            let Some(pid) = v.blk.as_ref().and_then(|b| b.serving()) else { return false };
            let sig = match fault {
                Fault::BackendSignal(s) => *s,
                Fault::BackendKill => libc::SIGKILL,
                _ => libc::SIGSTOP,
            };
            // SAFETY: kill(2) of the backend process we started (or its spare).
            let sent = unsafe { libc::kill(pid as i32, sig) == 0 };
            if sent && sig == libc::SIGSTOP {
                // What a supervisor does with a hung backend.
                std::thread::sleep(Duration::from_millis(300));
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            sent
        }
    }
}

/// The VMM's events and its backend's since the counts given.
fn events_since(v: &ChildVm, vmm: usize, backend: usize) -> Vec<Value> {
    let mut events: Vec<Value> = v.events().into_iter().skip(vmm).collect();
    if let Some(b) = &v.blk {
        events.extend(b.events().into_iter().skip(backend));
    }
    events
}

/// A fault's outcome: lost (no progress within the deadline), hurt (what
/// the target's judge found), not fired (a failpoint never hit), or
/// recovered, with how (the events that followed it).
fn outcome(
    v: &mut ChildVm,
    progressed: bool,
    hurt: Option<(Outcome, String)>,
    fault: &Fault,
    delivered: bool,
    events: &[Value],
) -> (Outcome, String) {
    let fired = match fault {
        Fault::Failpoint(p, _) | Fault::BackendFailpoint(p, _) => {
            events.iter().any(|e| e["event"] == "failpoint-fired" && e["point"] == *p)
        }
        _ => delivered,
    };
    if !progressed {
        let how = if v.alive() { "guest stopped making progress".to_string() } else { death(v) };
        return (Outcome::Lost, how);
    }
    if let Some(hurt) = hurt {
        return hurt;
    }
    if !fired {
        return (Outcome::NotFired, "never hit while the guest ran".into());
    }
    let how: Vec<&str> =
        events.iter().filter_map(|e| e["event"].as_str()).filter(|e| *e != "failpoint-fired").collect();
    (Outcome::Recovered, if how.is_empty() { "no visible effect".into() } else { how.join("+") })
}

/// Why the VMM is gone, from its exit status.
fn death(vm: &mut ChildVm) -> String {
    use std::os::unix::process::ExitStatusExt;
    match vm.child.try_wait().ok().flatten() {
        Some(st) => match (st.code(), st.signal()) {
            (Some(c), _) => format!("VMM exited with status {c}"),
            (_, Some(sig)) => format!("VMM killed by signal {sig}"),
            _ => "VMM died".into(),
        },
        None => "VMM died".into(),
    }
}

pub fn run(a: CampaignArgs) -> Result<i32> {
    let mut rng = Rng(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let backend = a.target == "blk";
    let cat = if a.target == "vmm" { catalog() } else { backend_catalog(a.target == "net") };
    let base = crate::guestrun::cache_dir().join(format!("campaign-{}", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();
    let mut vm: Option<ChildVm> = None;
    let (mut in_vm, mut first_row, mut console_bad) = (0, 0, 0);
    let started = Instant::now();
    eprintln!(
        "campaign: {} injections, seed {}, {} faults in the catalog{}",
        a.runs,
        a.seed,
        cat.len(),
        if a.baseline { ", RECOVERY OFF (baseline)" } else { "" }
    );
    if a.target == "host" {
        return host::run(&a, &mut rng);
    }
    if a.target == "net" {
        let rows = net::run(&a, &cat, &mut rng)?;
        return Ok(report(&a, &rows, 0, started));
    }
    for i in 0..a.runs {
        if vm.is_none() || in_vm >= a.per_vm {
            if let Some(old) = vm.take() {
                console_bad += close_and_judge(old, &mut rows, first_row, false);
            }
            vm = Some(start_vm(&base.join(format!("vm{i}")), a.baseline, backend).context("starting a campaign VM")?);
            (in_vm, first_row) = (0, rows.len());
        }
        let v = vm.as_mut().expect("vm");
        let fault = cat[(rng.next() % cat.len() as u64) as usize].clone();
        let seen_events = v.events().len();
        let seen_blk = v.blk.as_ref().map_or(0, |b| b.events().len());
        let lines = v.lines();
        let before = seen(&lines);
        let delivered = inject(v, &fault, &mut rng);
        let ok = v.progress(REPORT, before.reports, 2, Duration::from_secs(a.deadline));
        if let Fault::Failpoint(p, _) = &fault {
            // Disarm before judging: one that fires later is not this run's.
            if ok {
                let _ = v.request(&ApiRequest::Failpoint { spec: format!("{p}=off") });
            }
        }
        if let (Fault::BackendFailpoint(p, _), Some(b)) = (&fault, &v.blk) {
            // The serving process may be a spare that never had it armed.
            let _ = b.control(&format!("failpoint {p}=off"));
        }
        let events = events_since(v, seen_events, seen_blk);
        let lines = v.lines();
        let hurt = judge(&before, &lines);
        let (outcome, how) = outcome(v, ok, hurt, &fault, delivered, &events);
        let row = Row {
            guest_ms: guest_pause(&lines, before.reports, if backend { "maxio_us" } else { "maxgap_us" }, REPORT),
            vmm_ms: vmm_pause(&events),
            components: components(&events),
            fault: fault.clone(),
            outcome,
            how,
        };
        eprintln!(
            "[{:>4}/{}] {:<28} {:<10} guest {:>7} ms  {}",
            i + 1,
            a.runs,
            fault.describe(),
            format!("{outcome:?}"),
            row.guest_ms.map(|m| format!("{m:.2}")).unwrap_or("-".into()),
            row.how
        );
        rows.push(row);
        in_vm += 1;
        if !matches!(outcome, Outcome::Recovered | Outcome::NotFired) {
            if let Some(old) = vm.take() {
                console_bad += close_and_judge(old, &mut rows, first_row, !matches!(fault, Fault::Kill));
            }
        }
    }
    if let Some(old) = vm.take() {
        console_bad += close_and_judge(old, &mut rows, first_row, false);
    }
    Ok(report(&a, &rows, console_bad, started))
}

fn report(a: &CampaignArgs, rows: &[Row], console_bad: usize, started: Instant) -> i32 {
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or("-".into());
    let count = |rs: &[&Row], o| rs.iter().filter(|r| r.outcome == o).count();
    let mut classes: Vec<String> = rows.iter().map(|r| r.fault.class()).collect();
    classes.sort();
    classes.dedup();
    println!();
    println!(
        "| fault{} | injections | not fired | recovered | hurt | guest lost | data mismatch | {} p50 ms | p99 | max | VMM-reported p50 ms |",
        if a.baseline { " (recovery off)" } else { "" },
        match a.target.as_str() {
            "blk" => "guest's longest I/O",
            "net" => "guest's longest round trip",
            _ => "guest pause",
        }
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let line = |name: &str, rs: Vec<&Row>| {
        let rec: Vec<&&Row> = rs.iter().filter(|r| r.outcome == Outcome::Recovered).collect();
        let mut g: Vec<f64> = rec.iter().filter_map(|r| r.guest_ms).collect();
        let mut m: Vec<f64> = rec.iter().filter_map(|r| r.vmm_ms).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            count(&rs, Outcome::NotFired),
            count(&rs, Outcome::Recovered),
            count(&rs, Outcome::Hurt),
            count(&rs, Outcome::Lost),
            count(&rs, Outcome::Mismatch),
            fmt(pct(&mut g, 0.5)),
            fmt(pct(&mut g, 0.99)),
            fmt(pct(&mut g, 1.0)),
            fmt(pct(&mut m, 0.5)),
        );
    };
    for c in &classes {
        line(c, rows.iter().filter(|r| &r.fault.class() == c).collect());
    }
    let catchable: Vec<&Row> = rows.iter().filter(|r| !matches!(r.fault, Fault::Kill)).collect();
    // SIGKILL of a VMM is not catchable; of a backend it is (its spare).
    line(if a.target != "vmm" { "**all**" } else { "**all but SIGKILL**" }, catchable.clone());

    // Where each failpoint hit, as the VMM's events name it.
    println!();
    println!("| failpoint | component(s) hit | injections | fired | recovered |");
    println!("|---|---|---:|---:|---:|");
    for p in staunch_fault::ALL.iter().chain(staunch_fault::BACKEND) {
        let rs: Vec<&Row> = rows
            .iter()
            .filter(|r| matches!(r.fault, Fault::Failpoint(n, _) | Fault::BackendFailpoint(n, _) if n == p.name))
            .collect();
        if rs.is_empty() {
            continue;
        }
        let mut comps: Vec<&str> = rs.iter().flat_map(|r| r.components.iter().map(String::as_str)).collect();
        comps.sort();
        comps.dedup();
        println!(
            "| {} | {} | {} | {} | {} |",
            p.name,
            if comps.is_empty() { "-".into() } else { comps.join(", ") },
            rs.len(),
            rs.len() - count(&rs, Outcome::NotFired),
            count(&rs, Outcome::Recovered)
        );
    }
    let fired: Vec<&Row> = catchable.iter().copied().filter(|r| r.outcome != Outcome::NotFired).collect();
    let rec = count(&fired, Outcome::Recovered);
    let mismatches = count(&rows.iter().collect::<Vec<_>>(), Outcome::Mismatch);
    println!();
    let kills = if a.target != "vmm" {
        String::new()
    } else {
        format!(
            "SIGKILL injections: {} (the crash path cannot run; the guest is lost until a host supervisor exists); ",
            rows.len() - catchable.len()
        )
    };
    println!(
        "recovered {rec}/{} ({:.1} %) of fired catchable faults; not fired: {}; data mismatches: {mismatches}; \
         VMs with console bytes lost or doubled: {console_bad}; {kills}{:.0} s",
        fired.len(),
        100.0 * rec as f64 / fired.len().max(1) as f64,
        catchable.len() - fired.len(),
        started.elapsed().as_secs_f64()
    );
    if a.target == "net" {
        println!("round trips: the guest's own clock (maxrtt_us: its longest round trip of a frame through the backend, the bridge and the host's peer, around the fault); at the end of each VM the guest's counts were checked against the host's; the VMM-reported column is what the components report about themselves");
    } else if a.target == "blk" {
        println!("I/O stalls: the guest's own clock (maxio_us: its longest block request, submit to completion, around the fault); the VMM-reported column is what the components report about themselves (the backend spare's death-to-rings-running, a reconnect's outage, a microreset, the watchdog's stuck time)");
    } else {
        println!("pauses: the guest's own clock (maxgap_us: its longest gap between two loop iterations); the VMM-reported column is the VMM's figure about itself");
    }
    let unrecovered: Vec<String> = rows
        .iter()
        .filter(|r| !matches!(r.outcome, Outcome::Recovered | Outcome::NotFired) && !matches!(r.fault, Fault::Kill))
        .map(|r| format!("{} ({:?}: {})", r.fault.describe(), r.outcome, r.how))
        .collect();
    if !unrecovered.is_empty() {
        println!("not recovered: {}", unrecovered.join("; "));
    }
    let rate = rec as f64 / fired.len().max(1) as f64;
    if !a.baseline && (mismatches > 0 || console_bad > 0 || rate < a.min_recovered) {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    const BOOT: &str = "STAUNCH ready ring=3\nSTAUNCH blk written=200 verified=200 mismatches=0 errors=0\n";

    /// The shapes of hurt that the old judge (two new lines, mismatches
    /// unchanged) called recovered.
    #[test]
    fn the_judge_sees_a_hurt_guest() {
        let before = seen(&lines(BOOT));
        let ok = format!("{BOOT}STAUNCH blk written=400 verified=400 mismatches=0 errors=0\nSTAUNCH blk written=600 verified=600 mismatches=0 errors=0\n");
        assert!(judge(&before, &lines(&ok)).is_none());
        // Every write after the fault failed.
        let failing = format!("{BOOT}STAUNCH blk written=200 verified=200 mismatches=0 errors=200\nSTAUNCH blk written=200 verified=200 mismatches=0 errors=400\n");
        assert_eq!(judge(&before, &lines(&failing)).unwrap().0, Outcome::Hurt);
        // Cold-booted and replayed from the start.
        let rebooted = format!("{BOOT}STAUNCH ready ring=3\nSTAUNCH blk written=200 verified=200 mismatches=0 errors=0\nSTAUNCH blk written=400 verified=400 mismatches=0 errors=0\n");
        assert_eq!(judge(&before, &lines(&rebooted)).unwrap().0, Outcome::Hurt);
        // The guest saw a stale block.
        let stale = format!("{BOOT}STAUNCH blk written=400 verified=399 mismatches=1 errors=0\nSTAUNCH blk written=600 verified=599 mismatches=1 errors=0\n");
        assert_eq!(judge(&before, &lines(&stale)).unwrap().0, Outcome::Mismatch);
    }

    #[test]
    fn the_guest_pause_is_the_guest_clock_or_nothing() {
        let l = lines(&format!("{BOOT}STAUNCH blk written=400 verified=400 mismatches=0 errors=0 maxgap_us=2500\nSTAUNCH blk written=600 verified=600 mismatches=0 errors=0 maxgap_us=40\n"));
        assert_eq!(guest_pause(&l, 1, "maxgap_us", REPORT), Some(2.5));
        assert_eq!(guest_pause(&lines(BOOT), 0, "maxgap_us", REPORT), None);
    }

    #[test]
    fn the_catalog_has_every_failpoint_and_no_empty_corruption() {
        let cat = catalog();
        for p in staunch_fault::ALL {
            assert!(cat.iter().any(|f| matches!(f, Fault::Failpoint(n, _) if *n == p.name)), "{} missing", p.name);
        }
        assert!(!cat
            .iter()
            .any(|f| matches!(f, Fault::Failpoint(n, staunch_fault::Action::Corrupt) if NO_CORRUPT.contains(n))));
    }
}
