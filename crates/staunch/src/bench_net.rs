//! `staunch bench net` and `staunch bench tail`: the test guest's network
//! under Staunch's VMM with `staunch net`, and under QEMU 10 (microvm,
//! virtio-mmio, the same guest) with its in-process tap netdev and with
//! `staunch net`, all on a Linux bridge in a namespace built for the run.
//!
//! With Debian's DPDK fetched (`scripts/dpdk.sh`), Staunch's VMM is also
//! measured over `dpdk-testpmd` as the vhost-user backend (its vhost PMD
//! forwarding to a tap PMD on the bridge).
//!
//! Round trips are timed by the host's load generator (`net-peer --ping`
//! against the guest's `net-echo`), restart gaps by the guest (`net-ping`'s
//! longest round trip in the report interval around each SIGKILL).

use crate::childbackend::ChildBackend;
use crate::childvm::{ChildVm, Spec};
use crate::idle::Machine;
use crate::netlab::Lab;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const MAC: &str = "52:54:00:00:00:42";
/// The guest's echo, reporting only at the end: printing a line stalls it
/// for tens of ms (an exit per byte), which is not the network's latency.
pub const ECHO: &str = "staunch.work=net-echo staunch.report_ms=3600000";
const STAUNCH_TAP: &str = "stap0";
const QEMU_TAP: &str = "qtap0";

#[derive(Clone, Copy, PartialEq)]
pub enum Setup {
    Staunch,
    QemuTap,
    QemuVu,
    /// Staunch's VMM over dpdk-testpmd (vhost PMD to a tap PMD).
    Dpdk,
}

/// dpdk-testpmd, where scripts/dpdk.sh unpacked it.
fn testpmd() -> Option<PathBuf> {
    let p = crate::guestrun::cache_dir().join("dpdk/root/usr/bin/dpdk-testpmd");
    p.exists().then_some(p)
}

/// dpdk-testpmd serving vhost-user on `sock` (server mode: Staunch's VMM
/// connects), forwarding to a tap PMD put on the lab's bridge. One
/// polling core besides the main one (this host has two).
fn start_testpmd(lab: &Lab, dir: &Path, sock: &Path) -> Result<Child> {
    let bin = testpmd().context("no dpdk-testpmd (run scripts/dpdk.sh)")?;
    let root = bin.parent().and_then(|p| p.parent()).and_then(|p| p.parent()).context("DPDK path")?;
    let libs = root.join("usr/lib/x86_64-linux-gnu");
    let mut c = lab.command(&bin);
    c.env("LD_LIBRARY_PATH", format!("{}:{}", libs.display(), root.join("lib/x86_64-linux-gnu").display()));
    c.args(["-l", "0-1", "--no-huge", "-m", "1024", "--no-pci", "--file-prefix"]);
    c.arg(format!("staunch-{}", std::process::id())).arg("-d").arg(libs.join("dpdk/pmds-23.0"));
    c.arg("--vdev").arg(format!("net_vhost0,iface={},queues=1", sock.display()));
    c.args(["--vdev", "net_tap0,iface=dtap0", "--", "--forward-mode=io", "--auto-start"]);
    c.args(["--stats-period=3600", "--total-num-mbufs=16384"]);
    let out = std::fs::File::create(dir.join("testpmd.log"))?;
    let child = c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn()?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("dpdk-testpmd did not listen (see {})", dir.join("testpmd.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.exec(&["ip", "link", "set", "dtap0", "master", crate::netlab::BRIDGE])?;
    lab.exec(&["ip", "link", "set", "dtap0", "up"])?;
    Ok(child)
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Staunch => "Staunch + staunch net",
            Setup::QemuTap => "QEMU, in-process tap netdev",
            Setup::QemuVu => "QEMU + staunch net",
            Setup::Dpdk => "Staunch + dpdk-testpmd (vhost PMD)",
        }
    }
}

/// A guest running under one setup, and its backend.
pub struct Running {
    vm: Option<ChildVm>,
    /// QEMU, or dpdk-testpmd (the backend of [`Setup::Dpdk`]).
    qemu: Option<Child>,
    log: PathBuf,
    pub backend: Option<ChildBackend>,
}

/// How to start: recovery machinery on or off, a spare for the backend.
#[derive(Clone, Copy)]
pub struct Opts {
    pub recovery: bool,
    pub spare: bool,
}

impl Running {
    pub fn lines(&self) -> Vec<String> {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = &t[..t.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter_map(|l| l.find("STAUNCH ").map(|i| l[i..].trim_end().to_string())).collect()
    }

    pub fn vm(&self) -> Option<&ChildVm> {
        self.vm.as_ref()
    }

    fn wait_line(&self, what: &str, within: Duration, f: impl Fn(&str) -> bool) -> Result<()> {
        let t = Instant::now();
        while !self.lines().iter().any(|l| f(l)) {
            if t.elapsed() > within {
                bail!("timed out waiting for {what}: {:?}", self.lines().iter().rev().take(3).collect::<Vec<_>>());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stop the guest (it may run for ever).
    pub fn stop(mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        drop(self.vm.take());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
    }
}

/// The taps a lab for these setups needs.
pub fn lab(tag: &str) -> Result<Lab> {
    Lab::new(tag, &[STAUNCH_TAP, QEMU_TAP])
}

/// Start `setup` with the test guest on `cmdline`, in a fresh `dir`.
pub fn boot(setup: Setup, lab: &Lab, dir: &Path, qemu: Option<&Path>, cmdline: &str, o: Opts) -> Result<Running> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let backend = match setup {
        Setup::QemuTap | Setup::Dpdk => None,
        _ => Some(ChildBackend::start_net(dir, &lab.ns, STAUNCH_TAP, o.spare)?),
    };
    let mut testpmd = None;
    let sock = match setup {
        Setup::Dpdk => {
            let s = dir.join("dpdk.sock");
            testpmd = Some(start_testpmd(lab, dir, &s)?);
            Some(s)
        }
        _ => backend.as_ref().map(|b| b.sock.clone()),
    };
    let r = match setup {
        Setup::Staunch | Setup::Dpdk => {
            let args = vec![
                "--net".to_string(),
                format!("vhost-user={},mac={MAC}", sock.clone().unwrap_or_default().display()),
            ];
            let env: &[(&str, &str)] = if o.recovery { &[] } else { &[("STAUNCH_NO_RECOVERY", "1")] };
            let mut extra = args;
            if !o.spare {
                extra.push("--no-spare".into());
            }
            let spec = Spec { vcpus: 1, mem_mib: 256, cmdline, disk_mib: 0, env, backend: false, args: &extra };
            let vm = ChildVm::start(&dir.join("vm"), &spec)?;
            let log = vm.log.clone();
            Running { vm: Some(vm), qemu: testpmd, log, backend }
        }
        _ => {
            let q = qemu.context("no QEMU (run scripts/qemu.sh)")?;
            let kernel = crate::guestrun::test_guest()?;
            let inner = crate::bench::qemu_microvm(q, &kernel, cmdline)?;
            // Inside the namespace: its tap is there.
            let mut c = lab.command(Path::new(inner.get_program()));
            c.args(inner.get_args());
            for (k, v) in inner.get_envs() {
                if let Some(v) = v {
                    c.env(k, v);
                }
            }
            let log = dir.join("serial.log");
            c.arg("-serial").arg(format!("file:{}", log.display()));
            match &sock {
                None => {
                    let tap = format!("tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off");
                    c.args(["-netdev", &tap]);
                }
                Some(s) => {
                    c.args([
                        "-object",
                        "memory-backend-memfd,id=mem,size=256M,share=on",
                        "-machine",
                        "memory-backend=mem",
                    ]);
                    c.arg("-chardev").arg(format!("socket,id=c0,path={},reconnect-ms=10", s.display()));
                    c.args(["-netdev", "vhost-user,id=n0,chardev=c0"]);
                }
            }
            c.args(["-device", &format!("virtio-net-device,netdev=n0,mac={MAC}")]);
            let stderr = std::fs::File::create(dir.join("qemu.stderr"))?;
            let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn()?;
            Running { vm: None, qemu: Some(child), log, backend }
        }
    };
    r.wait_line("the guest's network", Duration::from_secs(60), |l| l.starts_with("STAUNCH net mac="))?;
    Ok(r)
}

/// Wait until the guest's echo answers: its driver is up before the
/// frontend has handed the rings to the backend (QEMU's vhost-user-net
/// starts them a moment later), and frames sent before are lost.
pub fn warm_up(lab: &Lab) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if lab.ping(MAC, &["--window", "1", "--secs", "0.2"])?.replies > 0 {
            return Ok(());
        }
    }
    bail!("the guest's echo does not answer")
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn field(line: &str, key: &str) -> Option<u64> {
    staunch_testguest::proto::field(line, key).and_then(|v| v.parse().ok())
}

/// The restart gap: the guest's longest round trip in the reports around
/// each of 3 SIGKILLs of the serving backend, and in the reports without a
/// kill (both medians, ms).
fn restart_gap(setup: Setup, lab: &Lab, dir: &Path, qemu: Option<&Path>) -> Result<(f64, f64)> {
    let peer_out = dir.with_extension("peer.jsonl");
    let peer = lab.echo_peer(&peer_out)?;
    let cmd = "staunch.work=net-ping staunch.secs=6 staunch.qd=8 staunch.report_ms=100";
    let r = boot(setup, lab, dir, qemu, cmd, Opts { recovery: true, spare: true })?;
    let reports =
        |r: &Running| r.lines().into_iter().filter(|l| l.starts_with("STAUNCH net sent=")).collect::<Vec<_>>();
    let wait_more = |r: &Running, n: usize| -> Result<()> {
        let t = Instant::now();
        while reports(r).len() < n {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("the guest stopped reporting");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    wait_more(&r, 5)?;
    let mut around = Vec::new();
    let b = r.backend.as_ref().context("no backend")?;
    for _ in 0..3 {
        let before = reports(&r).len();
        let pid = b.serving().context("no serving backend")?;
        // SAFETY: kill(2) of the backend process we started (or its spare).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        b.wait_replaced(pid, Duration::from_secs(10))?;
        wait_more(&r, before + 3)?;
        around.push(before);
        std::thread::sleep(Duration::from_millis(400));
    }
    let all = reports(&r);
    let gap: Vec<f64> = around
        .iter()
        .map(|&i| all[i..i + 2].iter().filter_map(|l| field(l, "maxrtt_us")).max().unwrap_or(0) as f64 / 1e3)
        .collect();
    let calm: Vec<f64> =
        all[1..around[0]].iter().filter_map(|l| field(l, "maxrtt_us")).map(|v| v as f64 / 1e3).collect();
    r.stop();
    let host = crate::netlab::finish_peer(peer, &peer_out)?;
    if host["corrupt"] != 0 {
        bail!("the host saw corrupt frames: {host}");
    }
    Ok((median(&gap).unwrap_or(0.0), median(&calm).unwrap_or(0.0)))
}

struct Row {
    setup: Setup,
    /// frames/s (window 8), p50 and p99 round trip (window 1, us),
    /// restart gap and undisturbed worst round trip (ms).
    values: [Vec<f64>; 5],
    failed: usize,
}

fn one_round(row: &mut Row, lab: &Lab, dir: &Path, qemu: Option<&Path>, secs: f64) -> Result<()> {
    let r = boot(row.setup, lab, dir, qemu, ECHO, Opts { recovery: true, spare: true })?;
    warm_up(lab)?;
    let s = format!("{secs}");
    let thr = lab.ping(MAC, &["--window", "8", "--secs", &s])?;
    let lat = lab.ping(MAC, &["--window", "1", "--secs", &s])?;
    r.stop();
    if thr.corrupt + lat.corrupt > 0 {
        bail!("corrupt replies");
    }
    row.values[0].push(thr.per_s * 2.0);
    row.values[1].push(lat.p50_us);
    row.values[2].push(lat.p99_us);
    if matches!(row.setup, Setup::Staunch | Setup::QemuVu) {
        let (gap, calm) = restart_gap(row.setup, lab, &dir.with_extension("gap"), qemu)?;
        row.values[3].push(gap);
        row.values[4].push(calm);
    }
    Ok(())
}

pub fn peers(qemu: Option<PathBuf>) -> (Vec<Setup>, Option<PathBuf>) {
    let mut setups = vec![Setup::Staunch];
    match &qemu {
        Some(_) => setups.extend([Setup::QemuTap, Setup::QemuVu]),
        None => eprintln!("peer: QEMU not found (run scripts/qemu.sh): the QEMU rows are left out"),
    }
    (setups, qemu)
}

/// The setups of `bench net`: those of [`peers`], and DPDK's if fetched.
fn net_setups(qemu: Option<PathBuf>) -> (Vec<Setup>, Option<PathBuf>) {
    let (mut setups, qemu) = peers(qemu);
    match testpmd() {
        Some(_) => setups.push(Setup::Dpdk),
        None => eprintln!("peer: dpdk-testpmd not found (run scripts/dpdk.sh): its row is left out"),
    }
    (setups, qemu)
}

pub fn run(quick: bool, rounds: usize, qemu: Option<PathBuf>, machine: &Machine) -> Result<i32> {
    let (setups, qemu) = net_setups(qemu);
    let lab = lab("bnet")?;
    let dir = std::env::temp_dir().join(format!("staunch-bench-net-{}", std::process::id()));
    let (rounds, secs) = if quick { (1, 0.5) } else { (rounds, 5.0) };
    let mut rows: Vec<Row> = setups.iter().map(|s| Row { setup: *s, values: Default::default(), failed: 0 }).collect();
    for round in 0..rounds {
        for row in rows.iter_mut() {
            eprintln!("round {}/{rounds}: {} ...", round + 1, row.setup.name());
            machine.settle()?;
            if let Err(e) = one_round(row, &lab, &dir, qemu.as_deref(), secs) {
                eprintln!("  {} failed: {e:#}", row.setup.name());
                row.failed += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    machine.banner();
    let tap = |i: usize| rows.iter().find(|r| r.setup == Setup::QemuTap).and_then(|r| median(&r.values[i]));
    println!(
        "| {} | frames/s (window 8) | round trip p50 (us, window 1) | p99 (us) | restart gap (ms, guest-measured) | undisturbed worst round trip (ms) | rounds ok / failed |",
        machine.head("setup (median)")
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let cell = |i: usize, digits: usize| match median(&r.values[i]) {
            Some(v) => {
                let vs = match tap(i) {
                    Some(b) if b > 0.0 && r.setup != Setup::QemuTap && i < 3 => format!(" ({:.2}x QEMU tap)", v / b),
                    _ => String::new(),
                };
                format!("{v:.digits$}{vs}")
            }
            None => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            r.setup.name(),
            cell(0, 0),
            cell(1, 0),
            cell(2, 0),
            cell(3, 1),
            cell(4, 1),
            r.values[0].len(),
            r.failed
        );
    }
    println!();
    println!(
        "guest: Staunch test guest, 1 vCPU, 256 MiB, virtio-net (virtio-mmio) on a tap on a Linux bridge in a network namespace; {MAC}; \
         frames/s = 2 x round trips/s of `net-peer --ping --window 8` against the guest's net-echo for {secs} s (host-timed); \
         round trips of `--window 1`; the restart gap is the guest's own longest round trip (net-ping, 8 in flight, 100 ms reports) \
         in the two reports after each of 3 SIGKILLs of the serving backend (its spare takes over), against the reports before"
    );
    machine.footer();
    Ok(0)
}
