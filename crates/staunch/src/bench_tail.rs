//! `staunch bench tail`: R-VMM's evaluation of tail latency under faults
//! (DSN 2020, Table VI), on Staunch. A latency-critical request/response
//! service runs in the guest (the test guest's `net-echo` over virtio-net);
//! the host drives it open loop at a fixed rate (`net-peer --ping --rate`,
//! latency from each request's scheduled time) and reports mean, p95 and
//! p99 for: (a) recovery machinery off, (b) on without faults, (c) a
//! SIGKILL of the net backend every 5 s, (d) a SIGSEGV in the VMM every
//! 5 s, (e) a Xoar-style refresh of the net backend every second (a fresh
//! process, whether it failed or not: no spare, the VMM reconnects), and
//! (f) QEMU 10 with its in-process tap netdev, no faults.

use crate::bench_net::{self, Opts, Running, Setup, ECHO, MAC};
use crate::childbackend::ChildBackend;
use crate::idle::Machine;
use crate::netlab::Lab;
use crate::netload::Results;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Row {
    Off,
    On,
    KillBackend,
    SegvVmm,
    Refresh,
    Qemu,
}

impl Row {
    const ALL: [Row; 6] = [Row::Off, Row::On, Row::KillBackend, Row::SegvVmm, Row::Refresh, Row::Qemu];
    fn name(self) -> &'static str {
        match self {
            Row::Off => "(a) Staunch, recovery machinery off",
            Row::On => "(b) Staunch, recovery on, no faults",
            Row::KillBackend => "(c) SIGKILL of the net backend, periodic",
            Row::SegvVmm => "(d) SIGSEGV in the VMM, periodic",
            Row::Refresh => "(e) Xoar-style refresh of the net backend, periodic",
            Row::Qemu => "(f) QEMU 10, in-process tap netdev, no faults",
        }
    }
}

/// Inject `row`'s fault every `every` until `stop`; the count injected.
fn inject(row: Row, r: &mut Running, lab: &Lab, dir: &Path, every: Duration, stop: &AtomicBool) -> Result<u64> {
    let n = AtomicU64::new(0);
    let sleep = |d: Duration| {
        let t = std::time::Instant::now();
        while t.elapsed() < d && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        !stop.load(Ordering::SeqCst)
    };
    match row {
        Row::KillBackend => {
            while sleep(every) {
                let b = r.backend.as_ref().context("no backend")?;
                let pid = b.serving().context("no serving backend")?;
                // SAFETY: kill(2) of the backend process we started (or its spare).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                n.fetch_add(1, Ordering::Relaxed);
                b.wait_replaced(pid, Duration::from_secs(10))?;
            }
        }
        Row::SegvVmm => {
            while sleep(every) {
                let vm = r.vm().context("no VMM")?;
                let seen = vm.events().iter().filter(|e| e["event"] == "resumed").count();
                // SAFETY: kill(2) of the VMM we started (or its successor).
                unsafe { libc::kill(vm.vmm_pid() as i32, libc::SIGSEGV) };
                n.fetch_add(1, Ordering::Relaxed);
                vm.wait_event("resumed", seen, Duration::from_secs(10)).context("no crash recovery")?;
            }
        }
        Row::Refresh => {
            let ns = lab.ns.clone();
            while sleep(every) {
                // The whole backend goes, a fresh one comes up on the same
                // socket: nothing carries over but the tap.
                drop(r.backend.take());
                r.backend = Some(ChildBackend::start_net(dir, &ns, "stap0", false)?);
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {}
    }
    Ok(n.into_inner())
}

fn one(
    row: Row,
    lab: &Lab,
    dir: &Path,
    qemu: Option<&Path>,
    load: &[String],
    every: Duration,
) -> Result<(Results, u64)> {
    let setup = if row == Row::Qemu { Setup::QemuTap } else { Setup::Staunch };
    let opts = Opts { recovery: row != Row::Off, spare: !matches!(row, Row::Off | Row::Refresh) };
    let mut r = bench_net::boot(setup, lab, dir, qemu, ECHO, opts)?;
    bench_net::warm_up(lab)?;
    let stop = AtomicBool::new(false);
    let args: Vec<&str> = load.iter().map(String::as_str).collect();
    let (res, faults) = std::thread::scope(|s| {
        let injector = s.spawn(|| inject(row, &mut r, lab, dir, every, &stop));
        let res = lab.ping(MAC, &args);
        stop.store(true, Ordering::SeqCst);
        let faults = injector.join().map_err(|_| anyhow::anyhow!("the injector panicked"))?;
        anyhow::Ok((res, faults))
    })?;
    r.stop();
    Ok((res?, faults?))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Each measure's median over the rounds that succeeded (lost and faults
/// summed).
fn combine(runs: &[(Results, u64)]) -> Option<(Results, u64)> {
    if runs.is_empty() {
        return None;
    }
    let m = |f: fn(&Results) -> f64| median(&mut runs.iter().map(|(r, _)| f(r)).collect::<Vec<_>>());
    let r = Results {
        sent: runs.iter().map(|(r, _)| r.sent).sum(),
        lost: runs.iter().map(|(r, _)| r.lost).sum(),
        mean_us: m(|r| r.mean_us),
        p95_us: m(|r| r.p95_us),
        p99_us: m(|r| r.p99_us),
        ..Results::default()
    };
    Some((r, runs.iter().map(|(_, f)| f).sum()))
}

pub fn run(quick: bool, rounds: usize, qemu: Option<PathBuf>, machine: &Machine) -> Result<i32> {
    let (setups, qemu) = bench_net::peers(qemu);
    let lab = bench_net::lab("btail")?;
    let dir = std::env::temp_dir().join(format!("staunch-bench-tail-{}", std::process::id()));
    let (rate, secs, every, refresh) = if quick { (500, 3.0, 1.0, 0.5) } else { (2000, 30.0, 5.0, 1.0) };
    let load: Vec<String> = ["--rate", &rate.to_string(), "--secs", &secs.to_string()].map(String::from).to_vec();
    let rows: Vec<Row> = Row::ALL.into_iter().filter(|r| *r != Row::Qemu || setups.contains(&Setup::QemuTap)).collect();
    let rounds = if quick { 1 } else { rounds.max(1) };
    let mut runs: Vec<Vec<(Results, u64)>> = rows.iter().map(|_| Vec::new()).collect();
    // Rounds of the whole table, so a slow spell of the host lands on
    // every row rather than on one.
    for round in 0..rounds {
        for (i, row) in rows.iter().enumerate() {
            eprintln!("round {}/{rounds}: {} ...", round + 1, row.name());
            machine.settle()?;
            let d = Duration::from_secs_f64(if *row == Row::Refresh { refresh } else { every });
            match one(*row, &lab, &dir, qemu.as_deref(), &load, d) {
                Ok(x) => runs[i].push(x),
                Err(e) => eprintln!("  failed: {e:#}"),
            }
        }
    }
    let out: Vec<(Row, Option<(Results, u64)>)> = rows.iter().zip(&runs).map(|(r, x)| (*r, combine(x))).collect();
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    machine.banner();
    println!(
        "| {} | mean (us) | p95 (us) | p99 (us) | mean vs (a) | p95 vs (a) | p99 vs (a) | lost | faults injected | rounds ok |",
        machine.head("configuration (medians over the rounds)")
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base = out.iter().find(|(r, _)| *r == Row::Off).and_then(|(_, x)| x.as_ref()).map(|(x, _)| x);
    for (i, (row, x)) in out.iter().enumerate() {
        let ok = format!("{} / {rounds}", runs[i].len());
        let Some((x, faults)) = x else {
            println!("| {} | failed | | | | | | | | {ok} |", row.name());
            continue;
        };
        let vs = |v: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:+.1} %", (v / b - 1.0) * 100.0),
            _ => "-".into(),
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} of {} | {} | {ok} |",
            row.name(),
            x.mean_us,
            x.p95_us,
            x.p99_us,
            vs(x.mean_us, base.map(|b| b.mean_us)),
            vs(x.p95_us, base.map(|b| b.p95_us)),
            vs(x.p99_us, base.map(|b| b.p99_us)),
            x.lost,
            x.sent,
            faults
        );
    }
    println!();
    println!(
        "load: {rate} requests/s open loop for {secs} s (`net-peer --ping --rate`), latency from each request's scheduled send time \
         to its reply (a lost request counts as the 1 s deadline), host-timed through the bridge and the guest's net-echo; faults every {every} s ((c), (d)) and {refresh} s ((e)). \
         R-VMM (DSN 2020) Table VI, p95 increase over no faults: fine-grained FT +12.7 %, Xoar-style refresh +12,999 %."
    );
    machine.footer();
    Ok(0)
}
