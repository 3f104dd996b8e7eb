//! `staunch bench blk`: block I/O through a vhost-user backend in its own
//! process, side by side in one run:
//! (a) Staunch's VMM + `staunch blk`, (b) Staunch's VMM with its in-process
//! virtio-blk, (c) QEMU + `staunch blk`, (d) QEMU + qemu-storage-daemon.
//!
//! Request rates are the test guest's own (`blk-rand`: random 4 KiB reads
//! then writes, N in flight, timed with its TSC). The restart stall is the
//! longest single request the guest saw (`maxio_us` of `blk-verify`, 4 in
//! flight) in the reports around each of three SIGKILLs of the backend's
//! serving process: `staunch blk`'s spare takes over; qemu-storage-daemon, which has
//! none, is started again at once. Every setup runs alone.

use crate::childbackend::{wait_for, ChildBackend};
use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    StaunchVu,
    StaunchLocal,
    QemuVu,
    QemuQsd,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::StaunchVu => "Staunch + staunch blk",
            Setup::StaunchLocal => "Staunch, in-process virtio-blk",
            Setup::QemuVu => "QEMU + staunch blk",
            Setup::QemuQsd => "QEMU + qemu-storage-daemon",
        }
    }
    fn qemu(self) -> bool {
        matches!(self, Setup::QemuVu | Setup::QemuQsd)
    }
}

struct Peers {
    qemu: Option<PathBuf>,
    qsd: Option<PathBuf>,
}

/// A backend for one run: `staunch blk` (with its spare) or
/// qemu-storage-daemon.
enum Backend {
    Staunch(ChildBackend),
    Qsd { child: Child, qsd: PathBuf, disk: PathBuf, sock: PathBuf },
}

fn qsd_command(qsd: &Path, disk: &Path, sock: &Path) -> Command {
    let mut c = crate::bench::qemu_command(qsd);
    c.arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={},cache.direct=off", disk.display()))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={},node-name=disk0,writable=on",
            sock.display()
        ));
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

impl Backend {
    /// Start the backend of `setup` (none for the in-process disk); its
    /// socket is `dir/blk.sock`.
    fn start(setup: Setup, dir: &Path, disk: &Path, peers: &Peers) -> Result<Option<Backend>> {
        Ok(match setup {
            Setup::StaunchLocal => None,
            Setup::StaunchVu | Setup::QemuVu => Some(Backend::Staunch(ChildBackend::start(dir, disk)?)),
            Setup::QemuQsd => {
                let qsd = peers.qsd.clone().context("no qemu-storage-daemon")?;
                let sock = dir.join("blk.sock");
                let child = qsd_command(&qsd, disk, &sock).spawn()?;
                wait_for("qemu-storage-daemon's socket", Duration::from_secs(20), || sock.exists())?;
                Some(Backend::Qsd { child, qsd, disk: disk.to_path_buf(), sock })
            }
        })
    }

    /// SIGKILL the serving process; `staunch blk`'s spare takes over,
    /// qemu-storage-daemon is started again at once.
    fn kill(&mut self) -> Result<()> {
        match self {
            Backend::Staunch(b) => {
                let pid = b.serving().context("no serving backend")?;
                // SAFETY: kill(2) of a process this benchmark started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                b.wait_replaced(pid, Duration::from_secs(20))
            }
            Backend::Qsd { child, qsd, disk, sock } => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&*sock);
                *child = qsd_command(qsd, disk, sock).spawn()?;
                wait_for("qemu-storage-daemon's socket", Duration::from_secs(20), || sock.exists())
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Qsd { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The VMM of `setup` running the test guest with `cmdline`, serial to `log`.
fn vmm(
    setup: Setup,
    peers: &Peers,
    kernel: &Path,
    cmdline: &str,
    disk: &Path,
    sock: &Path,
    log: &Path,
) -> Result<Child> {
    let mut c = if setup.qemu() {
        let q = peers.qemu.as_ref().context("no QEMU")?;
        let mut c = crate::bench::qemu_microvm(q, kernel, cmdline)?;
        c.arg("-serial").arg(format!("file:{}", log.display()));
        c.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"]);
        c.arg("-chardev").arg(format!("socket,id=c0,path={},reconnect-ms=10", sock.display()));
        c.args(["-device", "vhost-user-blk,chardev=c0"]);
        c
    } else {
        let mut c = Command::new(std::env::current_exe()?);
        c.args(["vmm", "run", "--mem", "256", "--kernel"]).arg(kernel).arg("--cmdline").arg(cmdline);
        c.arg("--serial").arg(format!("file:{}", log.display())).arg("--disk");
        match setup {
            Setup::StaunchLocal => c.arg(disk),
            _ => c.arg(format!("vhost-user={}", sock.display())),
        };
        c
    };
    Ok(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

fn finish(mut child: Child, log: &Path, within: Duration) -> Result<Vec<String>> {
    let t = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t.elapsed() > within {
            staunch_vmm::handover::kill_family(child.id());
            let _ = child.wait();
            bail!("the guest did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> =
        text.lines().filter_map(|l| l.find("STAUNCH ").map(|i| l[i..].trim_end().to_string())).collect();
    if !lines.iter().any(|l| l.starts_with("STAUNCH done code=0")) {
        bail!("the guest did not finish cleanly: {:?}", lines.iter().rev().take(3).collect::<Vec<_>>());
    }
    Ok(lines)
}

fn field(line: &str, key: &str) -> Option<u64> {
    staunch_testguest::proto::field(line, key).and_then(|v| v.parse().ok())
}

/// Requests per second of a `blk-rand` phase, by the guest's clock.
fn rate(lines: &[String], phase: &str) -> Result<f64> {
    let khz =
        lines.iter().find(|l| l.starts_with("STAUNCH ready")).and_then(|l| field(l, "tsc_khz")).context("tsc_khz")?;
    let end = lines.iter().find(|l| l.starts_with(&format!("STAUNCH blkrand {phase}-end"))).context("phase end")?;
    if field(end, "errors") != Some(0) {
        bail!("I/O errors in the guest: {end}");
    }
    let (n, cycles) = (field(end, "n").context("n")?, field(end, "cycles").context("cycles")?);
    Ok(n as f64 / (cycles as f64 / (khz as f64 * 1e3)))
}

struct Row {
    setup: Setup,
    /// randread qd1, randwrite qd1, randread qd16, randwrite qd16 (req/s),
    /// restart stall (ms) and the undisturbed maxio median (ms).
    values: [Vec<f64>; 6],
    failed: usize,
}

fn one_round(setup: Setup, peers: &Peers, kernel: &Path, dir: &Path, quick: bool, row: &mut Row) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 20])?;
    let iters = if quick { 2_000 } else { 20_000 };
    let mut backend = Backend::start(setup, dir, &disk, peers)?;
    let sock = dir.join("blk.sock");
    let log = dir.join("serial.log");
    for (i, qd) in [1u64, 16].into_iter().enumerate() {
        let cmdline = format!("staunch.work=blk-rand staunch.blocks=16384 staunch.iters={iters} staunch.qd={qd}");
        let lines = finish(
            vmm(setup, peers, kernel, &cmdline, &disk, &sock, &log)?,
            &log,
            Duration::from_secs(if quick { 90 } else { 300 }),
        )?;
        row.values[2 * i].push(rate(&lines, "read")?);
        row.values[2 * i + 1].push(rate(&lines, "write")?);
    }
    if let Some(b) = backend.as_mut() {
        let writes = if quick { 6_000 } else { 40_000 };
        let cmdline = format!(
            "staunch.work=blk-verify staunch.writes={writes} staunch.blocks=256 staunch.qd=4 staunch.report=500"
        );
        let _ = std::fs::remove_file(&log);
        let child = vmm(setup, peers, kernel, &cmdline, &disk, &sock, &log)?;
        wait_for("the guest's first report", Duration::from_secs(60), || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("blk written=")
        })?;
        // Which report each kill fell in: the stall is read from the
        // windows around the kills, not from noise elsewhere in the run.
        let mut at = Vec::new();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(if quick { 100 } else { 400 }));
            at.push(std::fs::read_to_string(&log).unwrap_or_default().matches("blk written=").count());
            b.kill()?;
        }
        let lines = finish(child, &log, Duration::from_secs(if quick { 90 } else { 300 }))?;
        let last = lines.iter().rfind(|l| l.contains("final=1")).context("final report")?;
        if field(last, "errors") != Some(0) || field(last, "mismatches") != Some(0) {
            bail!("the guest saw errors or mismatches: {last}");
        }
        let io: Vec<f64> = lines
            .iter()
            .filter(|l| l.contains("blk written="))
            .map(|l| field(l, "maxio_us").map(|v| v as f64 / 1e3))
            .collect::<Option<_>>()
            .context("maxio")?;
        // The report being written when the kill came, and the next one (a
        // kill right at a report's end shows in the next).
        let around = |n: usize| io.iter().skip(n).take(2).copied().reduce(f64::max);
        let stall = at.iter().filter_map(|&n| around(n)).reduce(f64::max).context("reports after the kills")?;
        let mut rest: Vec<f64> = io.clone();
        rest.sort_by(f64::total_cmp);
        row.values[4].push(stall);
        row.values[5].push(rest[rest.len() / 2]);
    }
    drop(backend);
    Ok(())
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

pub fn run(quick: bool, rounds: usize, qemu: Option<PathBuf>, machine: &Machine) -> Result<i32> {
    let kernel = crate::guestrun::test_guest()?;
    let qsd = qemu.as_ref().and_then(|q| q.parent().map(|d| d.join("qemu-storage-daemon"))).filter(|p| p.exists());
    let peers = Peers { qemu, qsd };
    let mut setups = vec![Setup::StaunchVu, Setup::StaunchLocal];
    match &peers.qemu {
        Some(_) => setups.push(Setup::QemuVu),
        None => eprintln!("peer: QEMU not found (run scripts/qemu.sh): rows (c) and (d) left out"),
    }
    match &peers.qsd {
        Some(_) if peers.qemu.is_some() => setups.push(Setup::QemuQsd),
        _ => eprintln!("peer: qemu-storage-daemon not found (run scripts/qemu.sh): row (d) left out"),
    }
    let dir = std::env::temp_dir().join(format!("staunch-bench-blk-{}", std::process::id()));
    let mut rows: Vec<Row> = setups.iter().map(|s| Row { setup: *s, values: Default::default(), failed: 0 }).collect();
    let rounds = if quick { 1 } else { rounds };
    for round in 0..rounds {
        for row in rows.iter_mut() {
            eprintln!("round {}/{rounds}: {} ...", round + 1, row.setup.name());
            machine.settle()?;
            if let Err(e) = one_round(row.setup, &peers, &kernel, &dir, quick, row) {
                eprintln!("  {} failed: {e:#}", row.setup.name());
                row.failed += 1;
            }
            machine.settle()?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    machine.banner();
    let base = |i: usize| rows.iter().find(|r| r.setup == Setup::StaunchLocal).and_then(|r| median(&r.values[i]));
    let qsd = |i: usize| rows.iter().find(|r| r.setup == Setup::QemuQsd).and_then(|r| median(&r.values[i]));
    println!(
        "| {} | randread qd1 | randwrite qd1 | randread qd16 | randwrite qd16 | restart stall (ms) | undisturbed maxio p50 (ms) | rounds ok / failed |",
        machine.head("setup (4 KiB requests/s, median)")
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let cell = |i: usize| match median(&r.values[i]) {
            Some(v) if i < 4 => {
                let vs = |b: Option<f64>, tag: &str| b.map(|b| format!(" {:.2}x {tag}", v / b)).unwrap_or_default();
                format!("{v:.0}{}{}", vs(base(i), "in-proc"), vs(qsd(i), "qsd"))
            }
            Some(v) => format!("{v:.1}"),
            None => "-".into(),
        };
        let ok = r.values[0].len();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {ok} / {} |",
            r.setup.name(),
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4),
            cell(5),
            r.failed
        );
    }
    println!();
    println!(
        "guest: Staunch test guest, 1 vCPU, 256 MiB, 64 MiB raw disk; rates by the guest's TSC over {} requests per phase; the stall is the longest request the guest saw in the reports (500 writes each) around 3 SIGKILLs of the serving backend process in a blk-verify run (4 in flight) (staunch blk: its spare takes over; qemu-storage-daemon: started again at once, QEMU reconnect-ms=10)",
        if quick { 2_000 } else { 20_000 }
    );
    machine.footer();
    Ok(0)
}
