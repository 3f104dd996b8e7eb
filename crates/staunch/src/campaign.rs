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

use anyhow::{Context, Result};
use serde_json::Value;
use staunch_testguest::proto;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

struct Vm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    events: PathBuf,
    disk: PathBuf,
}

const WRITES: u64 = 5_000_000;
const BLOCKS: u64 = 256;

impl Vm {
    fn start(dir: &Path, baseline: bool) -> Result<Vm> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let kernel = crate::guestrun::test_guest()?;
        let (sock, log, events, disk) =
            (dir.join("api.sock"), dir.join("serial.log"), dir.join("events.jsonl"), dir.join("disk.img"));
        std::fs::write(&disk, vec![0u8; 8 << 20])?;
        let mut c = Command::new("/proc/self/exe");
        c.args(["vmm", "run", "--vcpus", "2", "--kernel"]).arg(&kernel);
        c.arg("--disk").arg(&disk).arg("--api-socket").arg(&sock).arg("--events").arg(&events);
        c.arg("--serial").arg(format!("file:{}", log.display()));
        c.arg("--cmdline")
            .arg(format!("staunch.work=blk-verify staunch.writes={WRITES} staunch.blocks={BLOCKS} staunch.report=200"));
        if baseline {
            c.env("STAUNCH_NO_RECOVERY", "1");
        }
        c.env_remove("STAUNCH_FAILPOINTS");
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let vm = Vm { child, dir: dir.to_path_buf(), sock, log, events, disk };
        if !vm.progress(0, 1, Duration::from_secs(30)) {
            anyhow::bail!("VM did not start reporting");
        }
        Ok(vm)
    }

    /// Complete report lines so far (the last may be partial).
    fn reports(&self) -> Vec<String> {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = &t[..t.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter(|l| l.contains("STAUNCH blk written=")).map(str::to_string).collect()
    }

    fn progress(&self, from: usize, more: usize, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.reports().len() >= from + more {
                return true;
            }
            if !self.alive() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn alive(&self) -> bool {
        // SAFETY: kill with signal 0 only checks the process exists.
        let exists = unsafe { libc::kill(self.child.id() as i32, 0) } == 0;
        exists
            && std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn mismatches(&self) -> u64 {
        self.reports().last().and_then(|l| proto::field(l, "mismatches").and_then(|v| v.parse().ok())).unwrap_or(0)
    }

    fn arm(&self, spec: &str) -> Result<()> {
        let r = staunch_vmm::api::request(&self.sock, &staunch_vmm::api::ApiRequest::Failpoint { spec: spec.into() })?;
        anyhow::ensure!(r.ok, "arming {spec}: {:?}", r.error);
        // api.request fires on the next request; others ignore this one.
        let _ = staunch_vmm::api::request(&self.sock, &staunch_vmm::api::ApiRequest::Status {});
        Ok(())
    }

    /// The VMM's long-lived threads (a control connection's thread may be
    /// gone before a signal reaches it).
    fn thread_ids(&self) -> Vec<i32> {
        let pid = self.child.id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|tid: &i32| {
                        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                            .map(|c| c.trim() != "api-conn")
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stop the guest and check its disk from the host.
    fn close(mut self) -> bool {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(bytes) = std::fs::read(&self.disk) else { return false };
        let ok = (0..BLOCKS).all(|lba| {
            let off = lba as usize * proto::BLOCK_SIZE;
            let b: &[u8; proto::BLOCK_SIZE] = bytes[off..off + proto::BLOCK_SIZE].try_into().expect("block");
            // A block never reached yet is blank; any written block is intact.
            matches!(proto::check_block(b, lba), Ok(_) | Err(proto::BlockError::Blank))
        });
        let _ = std::fs::remove_dir_all(&self.dir);
        ok
    }
}

/// A failed host check of the disk is charged to the VM's last injection.
fn close_and_judge(vm: Vm, rows: &mut [Row]) {
    if !vm.close() {
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
    let mut vm: Option<Vm> = None;
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
            vm = Some(Vm::start(&base.join(format!("vm{i}")), a.baseline).context("starting a campaign VM")?);
            in_vm = 0;
        }
        let v = vm.as_ref().expect("vm");
        let fault = cat[(rng.next() % cat.len() as u64) as usize].clone();
        let seen = v.events().len();
        let before = v.reports().len();
        let mism = v.mismatches();
        match &fault {
            Fault::Failpoint(p, act) => {
                if let Err(e) = v.arm(&format!("{p}={}", act.name())) {
                    // The control socket itself may be what just failed.
                    tracing::debug!("arming: {e}");
                }
            }
            Fault::Signal(s) => {
                let tids = v.thread_ids();
                let tid = tids[(rng.next() % tids.len().max(1) as u64) as usize % tids.len().max(1)];
                // SAFETY: tgkill to a thread of our own child VMM.
                unsafe { libc::syscall(libc::SYS_tgkill, v.child.id() as i32, tid, *s) };
            }
            Fault::Kill => {
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(v.child.id() as i32, libc::SIGKILL) };
            }
        }
        let ok = v.progress(before, 2, Duration::from_secs(a.deadline));
        let events: Vec<Value> = v.events().into_iter().skip(seen).collect();
        let (outcome, how) = if !ok {
            (Outcome::Lost, if v.alive() { "guest stopped making progress".into() } else { "VMM died".into() })
        } else if v.mismatches() != mism {
            (Outcome::Mismatch, format!("guest saw {} mismatches", v.mismatches() - mism))
        } else {
            let how = events.iter().filter_map(|e| e["event"].as_str()).collect::<Vec<_>>().join("+");
            (Outcome::Recovered, if how.is_empty() { "no visible effect".into() } else { how })
        };
        eprintln!("[{:>4}/{}] {:<28} {:<10} {}", i + 1, a.runs, fault.describe(), format!("{outcome:?}"), how);
        rows.push(Row { pause_ms: pause_after(&events), fault, outcome, how });
        in_vm += 1;
        if outcome != Outcome::Recovered {
            if let Some(old) = vm.take() {
                old.close();
            }
        }
    }
    if let Some(old) = vm.take() {
        close_and_judge(old, &mut rows);
    }
    let _ = std::fs::remove_dir_all(&base);

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
    Ok(if !a.baseline && (mismatches || rec < catchable.len()) { 1 } else { 0 })
}
