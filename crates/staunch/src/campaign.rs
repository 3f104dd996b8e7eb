//! `staunch campaign vmm`: inject random real faults into running VMMs and
//! judge each by the guest's own evidence.
//!
//! Each VM runs the test guest's `blk-verify` (sequence-numbered, checksummed
//! block writes read back and verified) on 2 vCPUs. Faults are injected one
//! at a time: failpoints armed over the control socket (every point with
//! every action), fatal signals sent to a random thread of the VMM, and
//! SIGKILL (which no process can survive; reported apart). After each fault
//! the guest must report progress again within a deadline and its mismatch
//! count must not move; at the end the host checks every block on the disk.

use crate::childvm::{ChildVm, Spec};
use anyhow::{Context, Result};
use serde_json::Value;
use staunch_testguest::proto;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct CampaignArgs {
    /// What to attack (only `vmm` so far).
    #[arg(value_parser = ["vmm"])]
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
}

impl Fault {
    fn class(&self) -> String {
        match self {
            Fault::Failpoint(_, a) => format!("failpoint {}", a.name()),
            Fault::Signal(s) => format!("signal {}", sig_name(*s)),
            Fault::Kill => "SIGKILL (uncatchable)".into(),
        }
    }
    fn describe(&self) -> String {
        match self {
            Fault::Failpoint(p, a) => format!("{p}={}", a.name()),
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

/// Points that are hit while the guest runs (MMIO registers are only touched
/// at driver set-up: queue notifications go through an ioeventfd).
const POINTS: [&str; 6] = ["pio.write", "pio.read", "serial.write", "virtq.process", "vcpu.loop", "api.request"];
const SIGNALS: [i32; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

fn catalog() -> Vec<Fault> {
    let mut v = Vec::new();
    for p in POINTS {
        for a in staunch_fault::Action::ALL {
            v.push(Fault::Failpoint(p, a));
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
    Lost,
    Mismatch,
}

struct Row {
    fault: Fault,
    outcome: Outcome,
    pause_ms: Option<f64>,
    how: String,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WRITES: u64 = 5_000_000;
const BLOCKS: u64 = 256;
const REPORT: &str = "STAUNCH blk written=";

fn start_vm(dir: &Path, baseline: bool) -> Result<ChildVm> {
    let cmdline = format!("staunch.work=blk-verify staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.report=200");
    let env: &[(&str, &str)] = if baseline { &[("STAUNCH_NO_RECOVERY", "1")] } else { &[] };
    ChildVm::start(dir, &Spec { vcpus: 2, mem_mib: 256, cmdline: &cmdline, disk_mib: 8, env })
}

fn mismatches(vm: &ChildVm) -> u64 {
    vm.reports(REPORT).last().and_then(|l| proto::field(l, "mismatches").and_then(|v| v.parse().ok())).unwrap_or(0)
}

/// Stop the guest and check its disk from the host: every block it wrote
/// must be intact (a block never reached is blank).
fn close(mut vm: ChildVm) -> bool {
    close_keep(&mut vm, false)
}

fn close_keep(vm: &mut ChildVm, keep: bool) -> bool {
    vm.kill();
    let Ok(bytes) = std::fs::read(&vm.disk) else { return false };
    let ok = (0..BLOCKS).all(|lba| {
        let off = lba as usize * proto::BLOCK_SIZE;
        let b: &[u8; proto::BLOCK_SIZE] = bytes[off..off + proto::BLOCK_SIZE].try_into().expect("block");
        matches!(proto::check_block(b, lba), Ok(_) | Err(proto::BlockError::Blank))
    });
    if ok && !keep {
        let _ = std::fs::remove_dir_all(&vm.dir);
    } else {
        eprintln!("           (kept {} for inspection)", vm.dir.display());
    }
    ok
}

/// A failed host check of the disk is charged to the VM's last injection.
fn close_and_judge(vm: ChildVm, rows: &mut [Row]) {
    if !close(vm) {
        if let Some(last) = rows.last_mut() {
            last.outcome = Outcome::Mismatch;
            last.how = "host disk check failed".into();
        }
    }
}

fn pause_after(events: &[Value]) -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for e in events {
        match e["event"].as_str() {
            Some("microreset") => {
                total += e["recovery_us"].as_f64().unwrap_or(0.0) / 1000.0;
                any = true;
            }
            Some("hang-detected") => {
                total += e["stuck_ms"].as_f64().unwrap_or(0.0);
                any = true;
            }
            Some("resumed") => {
                total += e["guest_pause_ms"].as_f64().unwrap_or(0.0);
                any = true;
            }
            _ => {}
        }
    }
    any.then_some(total)
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i])
}

pub fn run(a: CampaignArgs) -> Result<i32> {
    let mut rng = Rng(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cat = catalog();
    let base = crate::guestrun::cache_dir().join(format!("campaign-{}", std::process::id()));
    let mut rows: Vec<Row> = Vec::new();
    let mut vm: Option<ChildVm> = None;
    let mut in_vm = 0;
    let started = Instant::now();
    eprintln!(
        "campaign: {} injections, seed {}, {} faults in the catalog{}",
        a.runs,
        a.seed,
        cat.len(),
        if a.baseline { ", RECOVERY OFF (baseline)" } else { "" }
    );
    for i in 0..a.runs {
        if vm.is_none() || in_vm >= a.per_vm {
            if let Some(old) = vm.take() {
                close_and_judge(old, &mut rows);
            }
            vm = Some(start_vm(&base.join(format!("vm{i}")), a.baseline).context("starting a campaign VM")?);
            in_vm = 0;
        }
        let v = vm.as_ref().expect("vm");
        let fault = cat[(rng.next() % cat.len() as u64) as usize].clone();
        let seen = v.events().len();
        let before = v.reports(REPORT).len();
        let mism = mismatches(v);
        match &fault {
            Fault::Failpoint(p, act) => {
                if let Err(e) = v.arm(&format!("{p}={}", act.name())) {
                    // The control socket itself may be what just failed.
                    tracing::debug!("arming: {e}");
                }
            }
            Fault::Signal(s) => {
                let (pid, tids) = v.thread_ids();
                let tid = tids[(rng.next() % tids.len().max(1) as u64) as usize % tids.len().max(1)];
                // SAFETY: tgkill to a thread of the VMM we started.
                unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid, *s) };
            }
            Fault::Kill => {
                // SAFETY: kill(2) of the VMM we started (or its successor).
                unsafe { libc::kill(v.vmm_pid() as i32, libc::SIGKILL) };
            }
        }
        let ok = v.progress(REPORT, before, 2, Duration::from_secs(a.deadline));
        let events: Vec<Value> = v.events().into_iter().skip(seen).collect();
        let (outcome, how) = if !ok {
            let how = if v.alive() {
                "guest stopped making progress".to_string()
            } else {
                use std::os::unix::process::ExitStatusExt;
                match vm.as_mut().and_then(|v| v.child.try_wait().ok().flatten()) {
                    Some(st) => match (st.code(), st.signal()) {
                        (Some(c), _) => format!("VMM exited with status {c}"),
                        (_, Some(sig)) => format!("VMM killed by signal {sig}"),
                        _ => "VMM died".into(),
                    },
                    None => "VMM died".into(),
                }
            };
            (Outcome::Lost, how)
        } else if mismatches(v) != mism {
            (Outcome::Mismatch, format!("guest saw {} mismatches", mismatches(v) - mism))
        } else {
            let how = events.iter().filter_map(|e| e["event"].as_str()).collect::<Vec<_>>().join("+");
            (Outcome::Recovered, if how.is_empty() { "no visible effect".into() } else { how })
        };
        eprintln!("[{:>4}/{}] {:<28} {:<10} {}", i + 1, a.runs, fault.describe(), format!("{outcome:?}"), how);
        rows.push(Row { pause_ms: pause_after(&events), fault: fault.clone(), outcome, how });
        in_vm += 1;
        if outcome != Outcome::Recovered {
            if let Some(mut old) = vm.take() {
                close_keep(&mut old, !matches!(fault, Fault::Kill));
            }
        }
    }
    if let Some(old) = vm.take() {
        close_and_judge(old, &mut rows);
    }
    let mut classes: Vec<String> = rows.iter().map(|r| r.fault.class()).collect();
    classes.sort();
    classes.dedup();
    println!();
    println!(
        "| fault{} | injections | recovered | guest lost | data mismatch | p50 pause ms | p99 pause ms | max pause ms |",
        if a.baseline { " (recovery off)" } else { "" }
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or("-".into());
    let line = |name: &str, rs: Vec<&Row>| {
        let n = |o| rs.iter().filter(|r| r.outcome == o).count();
        let mut p: Vec<f64> =
            rs.iter().filter(|r| r.outcome == Outcome::Recovered).filter_map(|r| r.pause_ms).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            rs.len(),
            n(Outcome::Recovered),
            n(Outcome::Lost),
            n(Outcome::Mismatch),
            fmt(pct(&mut p, 0.5)),
            fmt(pct(&mut p, 0.99)),
            fmt(pct(&mut p, 1.0))
        );
    };
    for c in &classes {
        line(c, rows.iter().filter(|r| &r.fault.class() == c).collect());
    }
    let catchable: Vec<&Row> = rows.iter().filter(|r| !matches!(r.fault, Fault::Kill)).collect();
    let rec = catchable.iter().filter(|r| r.outcome == Outcome::Recovered).count();
    line("**all but SIGKILL**", catchable.clone());
    println!();
    println!(
        "recovered {rec}/{} ({:.1} %) of catchable faults; data mismatches: {}; SIGKILL injections: {} (the crash path cannot run; the guest is lost until a host supervisor exists); {:.0} s",
        catchable.len(),
        100.0 * rec as f64 / catchable.len().max(1) as f64,
        rows.iter().filter(|r| r.outcome == Outcome::Mismatch).count(),
        rows.len() - catchable.len(),
        started.elapsed().as_secs_f64()
    );
    let unrecovered: Vec<String> = rows
        .iter()
        .filter(|r| r.outcome != Outcome::Recovered && !matches!(r.fault, Fault::Kill))
        .map(|r| format!("{} ({:?}: {})", r.fault.describe(), r.outcome, r.how))
        .collect();
    if !unrecovered.is_empty() {
        println!("not recovered: {}", unrecovered.join("; "));
    }
    let mismatches = rows.iter().any(|r| r.outcome == Outcome::Mismatch);
    let rate = rec as f64 / catchable.len().max(1) as f64;
    Ok(if !a.baseline && (mismatches || rate < a.min_recovered) { 1 } else { 0 })
}
