//! `staunch bench`: the same test guest under Staunch and under QEMU 10
//! (`-accel kvm`, microvm, same ELF, same kind of disk), measured the same
//! way in the same run: wall time between the guest's own report lines, read
//! from each VMM's serial output on a pipe. Every benchmark starts only on
//! a machine where nothing else of the project runs (see [`crate::idle`]),
//! and each run runs alone.

use crate::guestrun::{cache_dir, test_guest};
use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// main: boot, exits and virtio-blk vs QEMU; recovery: microreset,
    /// crash re-exec, warm upgrade, snapshot/restore, cold reboot;
    /// overhead: the main benchmarks with the resilience machinery on and off;
    /// store: the config store vs a single-node etcd; blk: vhost-user block
    /// backends (staunch blk, qemu-storage-daemon) under Staunch and QEMU;
    /// io: the I/O engines a block backend could use, on this host's disk;
    /// net: virtio-net through staunch net vs QEMU's tap netdev; tail:
    /// R-VMM's tail latency under faults (Table VI); host: the host
    /// supervisor's recoveries (hangs, deaths, store failover) by the guest.
    #[arg(default_value = "main", value_parser = ["main", "recovery", "overhead", "store", "blk", "io", "net", "tail", "host"])]
    which: String,
    /// Exits per PIO / MMIO benchmark.
    #[arg(long, default_value_t = 20_000)]
    iters: u64,
    /// Requests per virtio-blk benchmark (each direction).
    #[arg(long, default_value_t = 4_000)]
    ios: u64,
    /// Rounds per VMM; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A few iterations, one round: checks the harness, not the numbers.
    #[arg(long)]
    quick: bool,
    /// qemu-system-x86_64 to compare with (default: the one scripts/qemu.sh fetched).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Also print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Measure even though other processes of the project (VMMs, stores,
    /// QEMU, qemu-storage-daemon, etcd) are running: every table then says
    /// MEASURED ON A BUSY MACHINE. Without it the benchmark refuses to start.
    #[arg(long)]
    allow_busy: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Staunch,
    /// Staunch with every recovery mechanism off (STAUNCH_NO_RECOVERY=1).
    StaunchBare,
    Qemu,
}

struct Ctx {
    kernel: PathBuf,
    qemu: Option<PathBuf>,
    dir: PathBuf,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// QEMU unpacked by scripts/qemu.sh finds its libraries beside it.
pub(crate) fn qemu_command(q: &Path) -> Command {
    let mut c = Command::new(q);
    if let Some(usr) = q.parent().and_then(|p| p.parent()) {
        let root = usr.parent().unwrap_or(usr);
        let libs = [usr.join("lib/x86_64-linux-gnu"), root.join("lib/x86_64-linux-gnu")];
        if let Ok(p) = std::env::join_paths(libs) {
            c.env("LD_LIBRARY_PATH", p);
        }
    }
    c
}

/// QEMU's microvm with the test guest, as comparable to Staunch's VM as it
/// gets (1 vCPU, 256 MiB, virtio-mmio, the guest's exit port); no serial yet.
pub(crate) fn qemu_microvm(q: &Path, kernel: &Path, cmdline: &str) -> Result<Command> {
    let root = q.parent().and_then(|p| p.parent()).context("QEMU path")?;
    let mut c = qemu_command(q);
    c.arg("-L").arg(root.join("share/qemu")).arg("-L").arg(root.join("share/seabios"));
    c.args(["-bios", "qboot.rom", "-M", "microvm,rtc=off,pic=off,isa-serial=on,acpi=off"]);
    c.args(["-accel", "kvm", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"]);
    c.args(["-nographic", "-display", "none"]);
    c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-global", "virtio-mmio.force-legacy=false"]);
    c.arg("-kernel").arg(kernel).arg("-append").arg(cmdline);
    Ok(c)
}

fn default_qemu() -> Option<PathBuf> {
    let p = cache_dir().join("qemu/root/usr/bin/qemu-system-x86_64");
    p.exists().then_some(p)
}

impl Ctx {
    fn command(&self, vmm: Vmm, cmdline: &str, disk: Option<&Path>) -> Result<Command> {
        Ok(match vmm {
            Vmm::Staunch | Vmm::StaunchBare => {
                let mut c = Command::new(std::env::current_exe()?);
                if vmm == Vmm::StaunchBare {
                    c.env("STAUNCH_NO_RECOVERY", "1");
                }
                c.args(["vmm", "run", "--mem", "256", "--serial", "stdio", "--kernel"]);
                c.arg(&self.kernel).arg("--cmdline").arg(cmdline);
                if let Some(d) = disk {
                    c.arg("--disk").arg(d);
                }
                c
            }
            Vmm::Qemu => {
                let q = self.qemu.as_ref().context("no QEMU")?;
                let mut c = qemu_microvm(q, &self.kernel, cmdline)?;
                c.args(["-serial", "stdio"]);
                if let Some(d) = disk {
                    c.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none,cache=writeback", d.display()));
                    c.args(["-device", "virtio-blk-device,drive=d0"]);
                }
                c
            }
        })
    }

    /// Run to completion; every serial line with its time since spawn.
    fn lines(&self, vmm: Vmm, cmdline: &str, disk: bool) -> Result<Vec<(Duration, String)>> {
        let d = self.dir.join(match vmm {
            Vmm::Staunch | Vmm::StaunchBare => "staunch.img",
            Vmm::Qemu => "qemu.img",
        });
        if disk {
            std::fs::write(&d, vec![0u8; 16 << 20])?;
        }
        let mut cmd = self.command(vmm, cmdline, disk.then_some(d.as_path()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let t0 = Instant::now();
        let mut child = cmd.spawn().context("starting the VMM")?;
        let out = child.stdout.take().context("stdout")?;
        let pid = child.id();
        // Ends an overrunning run; told to stand down (before the child is
        // reaped, so its pid is still the child's) once the output ends.
        let (done, overrun) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = overrun.recv_timeout(Duration::from_secs(600)) {
                staunch_vmm::handover::kill_family(pid);
            }
        });
        let mut lines = Vec::new();
        for l in BufReader::new(out).lines() {
            let l = l.unwrap_or_default();
            let t = t0.elapsed();
            if let Some(i) = l.find("STAUNCH ") {
                lines.push((t, l[i..].trim_end().to_string()));
            }
        }
        drop(done);
        let _ = watchdog.join();
        let _ = child.wait();
        if !lines.iter().any(|(_, l)| l.starts_with("STAUNCH done code=0")) {
            bail!("{} run of {cmdline:?} did not finish cleanly: {lines:?}", name(vmm));
        }
        Ok(lines)
    }
}

fn name(v: Vmm) -> &'static str {
    match v {
        Vmm::Staunch => "Staunch",
        Vmm::StaunchBare => "Staunch (recovery off)",
        Vmm::Qemu => "QEMU",
    }
}

fn at(lines: &[(Duration, String)], prefix: &str) -> Result<Duration> {
    lines.iter().find(|(_, l)| l.starts_with(prefix)).map(|(t, _)| *t).with_context(|| format!("no '{prefix}' line"))
}

fn span(lines: &[(Duration, String)], begin: &str, end: &str) -> Result<f64> {
    Ok((at(lines, end)? - at(lines, begin)?).as_secs_f64())
}

struct Metric {
    name: &'static str,
    unit: &'static str,
    lower_is_better: bool,
    values: [Vec<f64>; 2],
    /// Failed runs, per VMM (counted, never dropped).
    failed: [usize; 2],
}

impl Metric {
    fn new(name: &'static str, unit: &'static str, lower_is_better: bool) -> Metric {
        Metric { name, unit, lower_is_better, values: Default::default(), failed: [0; 2] }
    }

    /// "ok / failed" for VMM `i`.
    fn rounds(&self, i: usize) -> String {
        format!("{} / {}", self.values[i].len(), self.failed[i])
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (!v.is_empty()).then(|| v[v.len() / 2])
}

/// Every round runs each VMM in turn, one run at a time with nothing of
/// ours left from the run before; a failed run is counted against the
/// metrics it was to measure.
fn measure(ctx: &Ctx, vmms: &[Vmm], a: &BenchArgs, machine: &Machine) -> Result<[Metric; 5]> {
    let mut m = [
        Metric::new("boot to first guest line", "ms", true),
        Metric::new("PIO exit round trip", "us", true),
        Metric::new("MMIO exit round trip", "us", true),
        Metric::new("virtio-blk 4 KiB reads", "req/s", false),
        Metric::new("virtio-blk 4 KiB writes", "req/s", false),
    ];
    let exits = format!("staunch.work=exits staunch.ring=0 staunch.iters={}", a.iters);
    let blk = format!("staunch.work=blk-bench staunch.blocks=1024 staunch.iters={}", a.ios);
    let per = |s: f64| s * 1e6 / a.iters as f64;
    for round in 0..a.rounds {
        for (vi, v) in vmms.iter().enumerate() {
            eprintln!("round {}/{}: {} ...", round + 1, a.rounds, name(*v));
            machine.settle()?;
            let r = ctx.lines(*v, &exits, true).and_then(|l| {
                Ok([
                    at(&l, "STAUNCH ready")?.as_secs_f64() * 1e3,
                    per(span(&l, "STAUNCH exits pio-begin", "STAUNCH exits pio-end")?),
                    per(span(&l, "STAUNCH exits mmio-begin", "STAUNCH exits mmio-end")?),
                ])
            });
            record(&mut m[0..3], vi, r, name(*v));
            machine.settle()?;
            let r = ctx.lines(*v, &blk, true).and_then(|l| {
                Ok([
                    a.ios as f64 / span(&l, "STAUNCH blkbench read-begin", "STAUNCH blkbench read-end")?,
                    a.ios as f64 / span(&l, "STAUNCH blkbench write-begin", "STAUNCH blkbench write-end")?,
                ])
            });
            record(&mut m[3..5], vi, r, name(*v));
        }
    }
    machine.settle()?;
    Ok(m)
}

/// One run's values into `m` (in order), or its failure against each.
fn record<const N: usize>(m: &mut [Metric], vi: usize, r: Result<[f64; N]>, who: &str) {
    match r {
        Ok(v) => m.iter_mut().zip(v).for_each(|(m, v)| m.values[vi].push(v)),
        Err(e) => {
            eprintln!("  FAILED run ({who}): {e:#}");
            m.iter_mut().for_each(|m| m.failed[vi] += 1);
        }
    }
}

/// Apply `--quick` and set up the guest image, the scratch directory and,
/// if wanted, the QEMU peer.
fn prepare(mut a: BenchArgs, with_qemu: bool) -> Result<(BenchArgs, Ctx)> {
    if a.quick {
        a.iters = a.iters.min(500);
        a.ios = a.ios.min(200);
        a.rounds = 1;
    }
    // Per run: two benchmarks at once (--allow-busy) must not share disks.
    let dir = cache_dir().join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let qemu = if with_qemu { a.qemu.clone().or_else(default_qemu) } else { None };
    let ctx = Ctx { kernel: test_guest()?, qemu, dir };
    Ok((a, ctx))
}

/// The main benchmarks with the resilience machinery (failpoint checks,
/// contained regions, watchdog, rescuer) on and off, same binary.
fn overhead(a: BenchArgs, machine: &Machine) -> Result<i32> {
    let (a, ctx) = prepare(a, false)?;
    let (on_ns, off_ns) = dispatch_cost();
    let m = measure(&ctx, &[Vmm::Staunch, Vmm::StaunchBare], &a, machine)?;
    println!();
    machine.banner();
    println!(
        "| {} | unit | recovery on | recovery off | overhead | rounds ok / failed (on; off) |",
        machine.head("benchmark (median over the rounds that succeeded)")
    );
    println!("|---|---|---:|---:|---:|---:|");
    for x in &m[1..] {
        let (on, off) = (median(&x.values[0]), median(&x.values[1]));
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("-".into());
        let over = match (on, off) {
            (Some(on), Some(off)) if off > 0.0 => {
                let r = if x.lower_is_better { on / off - 1.0 } else { off / on - 1.0 };
                format!("{:+.1} %", r * 100.0)
            }
            _ => "-".into(),
        };
        println!("| {} | {} | {} | {} | {} | {}; {} |", x.name, x.unit, f(on), f(off), over, x.rounds(0), x.rounds(1));
    }
    let exit_ns = median(&m[1].values[1]).unwrap_or(0.0) * 1e3;
    println!();
    println!(
        "| {} | recovery on | recovery off | added | share of one PIO exit | rounds |",
        machine.head("per-exit cost of the machinery, measured in-process")
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| device access (contained region, failpoint check) + vCPU loop (contained failpoint, busy flag) | {on_ns:.1} ns | {off_ns:.1} ns | {:.1} ns | {:.3} % | best of {DISPATCH_PASSES} passes of {DISPATCH_ITERS} |",
        on_ns - off_ns,
        if exit_ns > 0.0 { (on_ns - off_ns) / exit_ns * 100.0 } else { 0.0 }
    );
    println!();
    machine.footer();
    Ok(0)
}

const DISPATCH_ITERS: u32 = 5_000_000;
const DISPATCH_PASSES: usize = 5;

/// What the resilience machinery adds to one exit, measured directly: the
/// same device access through the contained path and the plain one, plus the
/// vCPU loop's contained failpoint check and busy-flag stores. Timed over
/// millions of iterations in this process, so the machine's exit-time noise
/// does not drown it.
fn dispatch_cost() -> (f64, f64) {
    use std::hint::black_box;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    struct Reg(u8);
    impl staunch_devices::BusDevice for Reg {
        fn read(&mut self, _: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _: u64, d: &[u8]) -> staunch_devices::DeviceAction {
            self.0 = d[0];
            staunch_devices::DeviceAction::Continue
        }
    }
    let dev = Mutex::new(Reg(0));
    let busy = AtomicBool::new(false);
    const N: u32 = DISPATCH_ITERS;
    let run = |on: bool| {
        let t = std::time::Instant::now();
        for i in 0..N {
            busy.store(true, Ordering::Relaxed);
            if on {
                let region = staunch_fault::ContainedRegion::enter();
                let _ = std::panic::catch_unwind(|| staunch_fault::hit(&staunch_fault::VCPU_LOOP));
                drop(region);
            } else {
                let _ = staunch_fault::hit(&staunch_fault::VCPU_LOOP);
            }
            busy.store(false, Ordering::Relaxed);
            let r = staunch_devices::contained_with(on, "bench", &dev, None, Some(&staunch_fault::PIO_WRITE), |d| {
                staunch_devices::BusDevice::write(d, 0, &[black_box(i as u8)])
            });
            black_box(r);
        }
        t.elapsed().as_secs_f64() * 1e9 / N as f64
    };
    // Interleave and keep the best of several passes of each.
    let (mut on, mut off) = (f64::MAX, f64::MAX);
    for _ in 0..DISPATCH_PASSES {
        on = on.min(run(true));
        off = off.min(run(false));
    }
    (on, off)
}

pub fn run(a: BenchArgs) -> Result<i32> {
    let machine = Machine::check(a.allow_busy)?;
    match a.which.as_str() {
        "recovery" => {
            return crate::bench_recovery::run(a.quick, a.rounds, a.qemu.clone().or_else(default_qemu), &machine)
        }
        "overhead" => return overhead(a, &machine),
        "store" => return crate::bench_store::run(a.quick, &machine),
        "blk" => return crate::bench_blk::run(a.quick, a.rounds, a.qemu.clone().or_else(default_qemu), &machine),
        "io" => return crate::bench_io::run(a.quick, a.rounds, &machine),
        "net" => return crate::bench_net::run(a.quick, a.rounds, a.qemu.clone().or_else(default_qemu), &machine),
        "tail" => return crate::bench_tail::run(a.quick, a.rounds, a.qemu.clone().or_else(default_qemu), &machine),
        "host" => return crate::bench_host::run(a.quick, a.rounds, &machine),
        _ => {}
    }
    let (a, ctx) = prepare(a, true)?;
    let mut vmms = vec![Vmm::Staunch];
    match &ctx.qemu {
        Some(q) => {
            let v = qemu_command(q)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown version".into());
            eprintln!("peer: {v} ({})", q.display());
            vmms.push(Vmm::Qemu);
        }
        None => eprintln!("peer: QEMU not found (run scripts/qemu.sh); Staunch column only"),
    }
    let m = measure(&ctx, &vmms, &a, &machine)?;
    println!();
    machine.banner();
    println!(
        "| {} | unit | Staunch | QEMU | Staunch/QEMU | rounds ok / failed (Staunch; QEMU) |",
        machine.head("benchmark (median over the rounds that succeeded)")
    );
    println!("|---|---|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for x in &m {
        let s = median(&x.values[0]);
        let q = median(&x.values[1]);
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("-".into());
        let ratio = match (s, q) {
            (Some(s), Some(q)) if q > 0.0 => {
                format!("{:.2} ({})", s / q, if x.lower_is_better { "lower is better" } else { "higher is better" })
            }
            _ => "-".into(),
        };
        let qr = if vmms.len() > 1 { x.rounds(1) } else { "-".into() };
        println!("| {} | {} | {} | {} | {} | {}; {qr} |", x.name, x.unit, f(s), f(q), ratio, x.rounds(0));
        json.push(serde_json::json!({
            "metric": x.name, "unit": x.unit, "staunch": s, "qemu": q,
            "staunch_rounds_ok": x.values[0].len(), "staunch_rounds_failed": x.failed[0],
            "qemu_rounds_ok": x.values[1].len(), "qemu_rounds_failed": x.failed[1],
            "busy_machine": machine.is_busy(),
        }));
    }
    println!();
    println!(
        "guest: Staunch test guest, 1 vCPU, 256 MiB; exits from ring 0, blk from ring 3; {} exits, {} requests",
        a.iters, a.ios
    );
    println!("each run ran alone (nothing of ours left from the run before); a failed run is reported on stderr and counted under rounds, never dropped");
    machine.footer();
    if a.json {
        println!("{}", serde_json::Value::Array(json));
    }
    Ok(0)
}
