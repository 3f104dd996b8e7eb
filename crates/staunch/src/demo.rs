//! `staunch demo`: boot the test guest with a disk served by `staunch blk`
//! (a vhost-user backend in its own process), show it working, then hurt
//! the stack while the guest runs: a panic in a device model (microreset),
//! a SIGSEGV (crash re-exec), a warm upgrade (re-exec on purpose), and a
//! SIGKILL of the block backend (its spare takes over). The guest keeps
//! writing and verifying blocks through all of it; at the end the host
//! checks every block on the disk. Then a second guest's network survives
//! SIGKILLs of its `staunch net` backend ([`crate::demo_net`]).

use crate::childvm::{ChildVm, Spec};
use crate::guestrun::cache_dir;
use anyhow::{bail, Context, Result};
use staunch_testguest::proto;
use staunch_vmm::api::ApiRequest;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Blocks written and verified by the guest.
    #[arg(long, default_value_t = 100_000)]
    writes: u64,
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
}

const REGION_BLOCKS: u64 = 128;
const REPORT_EVERY: u64 = 1000;
const REPORT: &str = "STAUNCH blk written=";

struct Shown(usize);

impl Shown {
    /// Print the serial lines not shown yet.
    fn more(&mut self, vm: &ChildVm, t0: Instant) {
        let lines = vm.lines();
        for l in lines.iter().skip(self.0) {
            println!("   [{:>8.1} ms] {l}", t0.elapsed().as_secs_f64() * 1e3);
        }
        self.0 = lines.len();
    }
}

pub fn run(a: DemoArgs) -> Result<i32> {
    let t0 = Instant::now();
    println!(
        "== Staunch demo: the test guest on KVM, {} vCPUs, a 16 MiB virtio-blk disk served by `staunch blk` (vhost-user)",
        a.vcpus
    );
    let dir = cache_dir().join("demo");
    let cmdline = format!(
        "staunch.work=blk-verify staunch.writes={} staunch.blocks={REGION_BLOCKS} staunch.report={REPORT_EVERY} staunch.qd=4",
        a.writes
    );
    let mut vm = ChildVm::start(
        &dir,
        &Spec { vcpus: a.vcpus, mem_mib: 256, cmdline: &cmdline, disk_mib: 16, env: &[], backend: true, args: &[] },
    )?;
    let boot_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "   VMM pid {}, block backend pid {} (and a spare), guest log {}",
        vm.child.id(),
        vm.blk.as_ref().and_then(|b| b.serving()).unwrap_or(0),
        vm.log.display()
    );
    let mut shown = Shown(0);
    let wait_reports = |vm: &ChildVm, shown: &mut Shown, n: usize| -> Result<()> {
        let from = vm.reports(REPORT).len();
        let t = Instant::now();
        while vm.reports(REPORT).len() < from + n && !vm.lines().iter().any(|l| l.contains("final=1")) {
            shown.more(vm, t0);
            if t.elapsed() > Duration::from_secs(60) || !vm.alive() {
                bail!("the guest stopped making progress");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        shown.more(vm, t0);
        Ok(())
    };
    wait_reports(&vm, &mut shown, 2)?;
    // A spare successor is prepared shortly after boot; let it be ready.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let spare = vm.request(&ApiRequest::Status {}).ok().and_then(|r| r.data["spare"].as_u64());
        if let Some(pid) = spare {
            println!("   spare successor ready (pid {pid}): its VM is built around the guest's memory, waiting");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // The guest's own longest pause per report interval before any fault:
    // what the host's noise (flushes, scheduling) costs it anyway.
    let mut quiet: Vec<f64> = vm
        .reports(REPORT)
        .iter()
        .filter_map(|l| proto::field(l, "maxgap_us")?.parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    quiet.sort_by(f64::total_cmp);
    let quiet = quiet.get(quiet.len() / 2).copied();
    let mut pauses = Vec::new();
    let faults: [(&str, &str, &str); 4] = [
        ("a panic in the UART model", "serial.write=panic", "microreset"),
        ("a SIGSEGV in the VMM", "pio.write=segv", "resumed"),
        ("a warm upgrade", "", "resumed"),
        ("a SIGKILL of the block backend", "", "backend-takeover"),
    ];
    for (what, spec, kind) in faults {
        let seen = vm.events().len();
        let from = vm.reports(REPORT).len();
        println!(
            "   >> injecting {what}{}",
            if spec.is_empty() { String::new() } else { format!(" (failpoint {spec})") }
        );
        let mut killed = 0;
        if kind == "backend-takeover" {
            let pid = vm.blk.as_ref().and_then(|b| b.serving()).unwrap_or(0);
            killed = pid;
            // SAFETY: kill(2) of the backend process this demo started.
            if pid == 0 || unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
                bail!("no block backend to kill");
            }
        } else if spec.is_empty() {
            vm.request(&ApiRequest::Upgrade { binary: None })?;
        } else {
            vm.arm(spec)?;
        }
        let ev = if kind == "backend-takeover" {
            let b = vm.blk.as_ref().context("no block backend")?;
            crate::childbackend::wait_for("the spare's takeover", Duration::from_secs(30), || {
                b.events().iter().any(|e| e["event"] == kind && e["from"] == killed)
            })?;
            b.events().into_iter().find(|e| e["event"] == kind && e["from"] == killed).context("takeover")?
        } else {
            vm.wait_event(kind, seen, Duration::from_secs(30)).with_context(|| format!("no recovery after {what}"))?
        };
        let (vmm_ms, how) = match kind {
            "microreset" => (ev["recovery_us"].as_f64().unwrap_or(0.0) / 1e3, "microreset of the device, same process"),
            "backend-takeover" => (
                ev["resumed_us"].as_f64().unwrap_or(0.0) / 1e3,
                if ev["connection"] == "kept" {
                    "the backend's spare kept the connection and resumed the rings from the inflight region; the VMM saw nothing"
                } else {
                    "the backend's spare took the socket over; the VMM reconnected and handed it the inflight region"
                },
            ),
            _ => (
                ev["guest_pause_ms"].as_f64().unwrap_or(0.0),
                match (spec.is_empty(), ev["mode"] == "standby") {
                    (true, _) => "a standby successor built its VM first, then took the state over",
                    (false, true) => "crash: state saved, the ready spare took the VM over",
                    (false, false) => "crash re-exec, state saved next to guest memory",
                },
            ),
        };
        wait_reports(&vm, &mut shown, 2)?;
        // The guest's own clock: its longest gap between two iterations on
        // the lines since the fault.
        // For the backend, what the guest sees is a slow request, not a pause.
        let key = if kind == "backend-takeover" { "maxio_us" } else { "maxgap_us" };
        let guest_ms = vm
            .reports(REPORT)
            .iter()
            .skip(from)
            .filter_map(|l| proto::field(l, key)?.parse::<f64>().ok())
            .reduce(f64::max)
            .map(|us| us / 1e3);
        let seen_as = if key == "maxio_us" { "its longest I/O took" } else { "guest paused" };
        let by = if kind == "backend-takeover" { "backend-reported (death to rings running)" } else { "VMM-reported" };
        println!(
            "   << recovered: {how}; {seen_as} {} by its own clock; {by} {vmm_ms:.2} ms",
            guest_ms.map(|m| format!("{m:.2} ms")).unwrap_or("? (not reported)".into()),
        );
        pauses.push((what, guest_ms, vmm_ms));
    }

    let deadline = Instant::now() + Duration::from_secs(300);
    let code = loop {
        shown.more(&vm, t0);
        if let Some(c) = vm.wait_exit(Duration::from_millis(50)) {
            break c;
        }
        if Instant::now() > deadline {
            vm.kill();
            bail!("the guest did not finish");
        }
    };
    shown.more(&vm, t0);
    let last = vm.reports(REPORT).last().cloned().unwrap_or_default();
    let bytes = std::fs::read(&vm.disk)?;
    let region = REGION_BLOCKS.min(a.writes);
    // Every block holds its last write (the guest finished all of them).
    let disk = staunch_testguest::disk::check(&bytes, REGION_BLOCKS, a.writes, a.writes);
    let bad_blocks = disk.as_ref().err().map_or(0, |e| e.len());
    let console = staunch_testguest::console::blk_report_errors(&std::fs::read_to_string(&vm.log)?, REPORT_EVERY);
    let field = |k| proto::field(&last, k).unwrap_or("?").to_string();
    println!("== Summary");
    println!("   boot to first guest line  : {boot_ms:.1} ms");
    if let Some(q) = quiet {
        println!("   guest pause, undisturbed       : {q:.2} ms (guest clock, median longest gap per report before any fault)");
    }
    for (what, g, v) in &pauses {
        let g = g.map(|m| format!("{m:.2} ms")).unwrap_or("?".into());
        let (label, by) =
            if what.contains("backend") { ("longest guest I/O", "backend") } else { ("guest pause", "VMM") };
        println!("   {label}, {what:<30}: {g} (guest clock); {by}-reported {v:.2} ms");
    }
    println!(
        "   guest work                : {} blocks written, {} verified, {} mismatches, {} errors",
        field("written"),
        field("verified"),
        field("mismatches"),
        field("errors")
    );
    println!("   host check of the disk    : {}/{region} blocks hold their last write", region - bad_blocks as u64);
    println!("   console                   : {} lines with a byte lost or doubled", console.len());
    println!("   VMM exit status           : {code} (the guest powered off)");
    let net_ok = crate::demo_net::run(t0)?;
    println!("   total demo time           : {:.2} s", t0.elapsed().as_secs_f64());
    let ok = net_ok
        && code == 0
        && disk.is_ok()
        && console.is_empty()
        && field("mismatches") == "0"
        && field("errors") == "0"
        && field("verified") == a.writes.to_string();
    println!(
        "== {}",
        if ok {
            "OK: the guest survived a device panic, a VMM crash, an upgrade and a block backend kill with its data intact, and the other guest's network two kills of its backend with every frame accounted for"
        } else {
            "FAILED"
        }
    );
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("   (kept {} for inspection)", dir.display());
    }
    Ok(if ok { 0 } else { 1 })
}
