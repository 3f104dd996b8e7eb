//! `staunch campaign net`: faults of the `staunch net` backend under a
//! guest whose `net-ping` keeps 8 numbered frames in flight through the
//! backend, a tap and a Linux bridge (in a namespace built for the
//! campaign) to `staunch net-peer`, which answers and counts them.
//!
//! The faults are the backend's (its failpoints with every catchable
//! action, fatal signals, SIGKILL, SIGSTOP hangs), injected one at a time
//! as for `campaign blk`. After each, the guest must report progress again
//! (replies rising) with nothing corrupted, reordered or misdelivered and
//! at most one window of frames lost, still on its first boot. At the end
//! of each VM the host tells the guest to stop (a stop frame), the guest
//! drains and reports its final counts, and they must agree with the
//! host's: every frame the guest sent arrived, every reply the guest did
//! not get it counted lost.

use super::{inject, Fault, Outcome, Rng, Row};
use crate::netlab::Lab;
use anyhow::{Context, Result};
use staunch_testguest::proto;
use std::path::Path;
use std::time::Duration;

use crate::netvm::WINDOW;

pub use crate::netvm::{NetVm, REPORT};

pub fn lab() -> Result<Lab> {
    Lab::new("camp", &[crate::netvm::TAP])
}

pub fn start(lab: &Lab, dir: &Path) -> Result<NetVm> {
    // A frame delayed by a hung backend (the watchdog ends it after 3 s)
    // is late, not lost: the guest waits longer than that.
    NetVm::start(lab, dir, "staunch.work=net-ping staunch.qd=8 staunch.report_ms=200 staunch.timeout_ms=5000")
}

/// The guest's counts as its reports show them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub reports: usize,
    boots: usize,
    sent: u64,
    replies: u64,
    lost: u64,
    broken: u64,
}

fn num(line: &str, key: &str) -> u64 {
    proto::field(line, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn seen(lines: &[String]) -> Seen {
    let reports: Vec<&String> = lines.iter().filter(|l| l.starts_with(REPORT)).collect();
    let last = reports.last().map(|l| l.as_str()).unwrap_or("");
    Seen {
        reports: reports.len(),
        boots: lines.iter().filter(|l| l.starts_with("STAUNCH ready")).count(),
        sent: num(last, "sent"),
        replies: num(last, "replies"),
        lost: num(last, "lost"),
        // Nothing of these may ever happen.
        broken: num(last, "corrupt") + num(last, "reordered") + num(last, "bad_used"),
    }
}

/// Judge the guest's reports after a fault: `Some((outcome, why))` if it
/// was hurt.
pub fn judge(before: &Seen, lines: &[String]) -> Option<(Outcome, String)> {
    let now = seen(lines);
    if now.broken > before.broken {
        return Some((Outcome::Mismatch, format!("{} frames corrupted, reordered or misdelivered", now.broken)));
    }
    if now.boots != 1 {
        return Some((Outcome::Hurt, format!("the guest booted {} times", now.boots)));
    }
    if now.sent <= before.sent {
        return Some((Outcome::Hurt, format!("the guest sent nothing more ({})", now.sent)));
    }
    if now.lost > before.lost + WINDOW {
        return Some((Outcome::Hurt, format!("{} frames lost", now.lost - before.lost)));
    }
    let mut r = before.replies;
    for l in lines.iter().filter(|l| l.starts_with(REPORT)).skip(before.reports) {
        let n = num(l, "replies");
        if n <= r {
            return Some((Outcome::Hurt, format!("replies went from {r} to {n}")));
        }
        r = n;
    }
    None
}

/// Stop the guest and check its final counts against the host's.
pub fn close(v: NetVm, faults: u64) -> Result<(), String> {
    v.finish(faults * crate::netvm::WINDOW).map(|_| ())
}

/// One fault against a running net VM: its row.
pub fn one(v: &mut NetVm, fault: &Fault, rng: &mut Rng, deadline: Duration) -> Row {
    let vm = &mut v.vm;
    let (seen_events, seen_be) = (vm.events().len(), vm.blk.as_ref().map_or(0, |b| b.events().len()));
    let before = seen(&vm.lines());
    let delivered = inject(vm, fault, rng);
    let ok = vm.progress(REPORT, before.reports, 2, deadline);
    if let (Fault::BackendFailpoint(p, _), Some(b)) = (fault, &vm.blk) {
        let _ = b.control(&format!("failpoint {p}=off"));
    }
    let events = super::events_since(vm, seen_events, seen_be);
    let lines = vm.lines();
    let hurt = judge(&before, &lines);
    let (outcome, how) = super::outcome(vm, ok, hurt, fault, delivered, &events);
    Row {
        guest_ms: super::guest_pause(&lines, before.reports, "maxrtt_us", REPORT),
        vmm_ms: super::vmm_pause(&events),
        components: super::components(&events),
        fault: fault.clone(),
        outcome,
        how,
    }
}

/// Run the campaign's loop for `net`: fresh VMs of `per_vm` faults each.
pub fn run(a: &super::CampaignArgs, cat: &[Fault], rng: &mut Rng) -> Result<Vec<Row>> {
    let lab = lab().context("the campaign's network namespace")?;
    let base = crate::guestrun::cache_dir().join(format!("campaign-net-{}", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();
    let mut vm: Option<NetVm> = None;
    let (mut in_vm, mut first_row) = (0, 0);
    let finish = |v: NetVm, rows: &mut Vec<Row>, first_row: usize| {
        let faults = rows[first_row..].iter().filter(|r| r.outcome != Outcome::NotFired).count() as u64;
        if let Err(why) = close(v, faults.max(1)) {
            eprintln!("           the counts disagree: {why}");
            if let Some(last) = rows[first_row..].last_mut() {
                last.how = format!("{why} (was {:?}: {})", last.outcome, last.how);
                last.outcome = Outcome::Mismatch;
            }
        }
    };
    for i in 0..a.runs {
        if vm.is_none() || in_vm >= a.per_vm {
            if let Some(old) = vm.take() {
                finish(old, &mut rows, first_row);
            }
            vm = Some(start(&lab, &base.join(format!("vm{i}"))).context("starting a campaign VM")?);
            (in_vm, first_row) = (0, rows.len());
        }
        let v = vm.as_mut().expect("vm");
        let fault = cat[(rng.next() % cat.len() as u64) as usize].clone();
        let row = one(v, &fault, rng, Duration::from_secs(a.deadline));
        eprintln!(
            "[{:>4}/{}] {:<28} {:<10} guest {:>7} ms  {}",
            i + 1,
            a.runs,
            fault.describe(),
            format!("{:?}", row.outcome),
            row.guest_ms.map(|m| format!("{m:.2}")).unwrap_or("-".into()),
            row.how
        );
        let outcome = row.outcome;
        rows.push(row);
        in_vm += 1;
        if !matches!(outcome, Outcome::Recovered | Outcome::NotFired) {
            if let Some(old) = vm.take() {
                finish(old, &mut rows, first_row);
            }
        }
    }
    if let Some(old) = vm.take() {
        finish(old, &mut rows, first_row);
    }
    Ok(rows)
}
