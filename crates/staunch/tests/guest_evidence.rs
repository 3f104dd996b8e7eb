//! The test guest's own evidence, under real KVM: several block requests in
//! flight with every completion checked, every vCPU counting and checked by
//! the boot CPU, the longest pause the guest measured itself (`maxgap_us`),
//! and a console byte stream checked byte for byte by the host.
//!
//! What `maxgap_us` is on an undisturbed guest here is written down in
//! `guest/src/clock.rs` (at least ~290 us, typically 0.4-6 ms, tens of ms
//! on a busy host and on `blk-verify` lines that include a flush): these
//! tests assert no timing, only that an injected 300 ms pause shows.

mod common;
use common::*;
use staunch_testguest::proto::console;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn gaps(lines: &[&str]) -> Vec<u64> {
    lines.iter().map(|l| field(l, "maxgap_us")).collect()
}

fn summary(what: &str, g: &[u64]) {
    let mut s = g.to_vec();
    s.sort_unstable();
    if let (Some(max), Some(med)) = (s.last(), s.get(s.len() / 2)) {
        eprintln!("{what}: maxgap_us median {med}, max {max} over {} lines", s.len());
    }
}

fn blk_run(name: &str, vcpus: u8, writes: u64, blocks: u64, extra: &str) -> (Run, std::path::PathBuf) {
    require_kvm();
    let d = tmpdir(name);
    let g = guest(&d);
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let cmdline = format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={blocks} {extra}");
    let r = run(
        staunch()
            .args(["vmm", "run", "--vcpus", &vcpus.to_string(), "--kernel"])
            .arg(&g)
            .arg("--disk")
            .arg(&disk)
            .args(["--cmdline", &cmdline]),
        None,
        T,
    );
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    (r, disk)
}

#[test]
fn kvm_blk_verify_queue_depth_4_completes_with_no_mismatch() {
    let (writes, blocks, every) = (3000u64, 64u64, 500u64);
    let (r, disk) = blk_run("qd4", 2, writes, blocks, &format!("staunch.qd=4 staunch.report={every}"));
    assert_eq!(r.report_with("blk qd=4 blocks=64").len(), 1, "{}", r.stdout);
    assert!(r.report_with("blk mismatch").is_empty(), "{}", r.stdout);
    let reports = r.report_with("blk written=");
    let last = reports.last().expect("blk report");
    assert!(last.contains("final=1"), "{last}");
    assert_eq!(field(last, "written"), writes);
    assert_eq!(field(last, "verified"), writes);
    assert_eq!(field(last, "mismatches"), 0);
    assert_eq!(field(last, "errors"), 0);
    // The pipeline drains at each report: `written` is exact there, a
    // multiple of the report interval.
    let written: Vec<u64> = reports.iter().map(|l| field(l, "written")).collect();
    assert_eq!(written, (1..=writes / every).map(|i| i * every).collect::<Vec<_>>(), "{}", r.stdout);
    assert_eq!(r.report_with("done code=0").len(), 1);
    check_disk(&disk, writes, blocks);
    summary("blk-verify qd=4, 2 vCPUs", &gaps(&reports));
}

#[test]
fn kvm_blk_verify_queue_depth_is_capped_by_the_blocks() {
    // Three blocks: at most three requests in flight, or two of them would
    // be for one block.
    let (r, disk) = blk_run("qd-cap", 1, 200, 3, "staunch.qd=8 staunch.report=50");
    assert_eq!(r.report_with("blk qd=3 blocks=3").len(), 1, "{}", r.stdout);
    let last = *r.report_with("blk written=").last().unwrap();
    assert!(last.contains("final=1") && field(last, "verified") == 200 && field(last, "mismatches") == 0, "{last}");
    check_disk(&disk, 200, 3);
}

#[test]
fn kvm_aps_count_in_every_workload_unless_idle() {
    // blk-verify: the AP used to halt; now it counts and the boot CPU sees it.
    let (r, _) = blk_run("aps-blk", 2, 2000, 64, "staunch.report=200");
    let reports = r.report_with("blk written=");
    assert!(reports.iter().any(|l| field(l, "cpus") == 2), "the AP never counted: {reports:?}");
    assert!(reports.iter().all(|l| field(l, "cpus") <= 2));
    // staunch.aps=idle: only the boot CPU.
    require_kvm();
    let d = tmpdir("aps-idle");
    let g = guest(&d);
    let r = run(
        staunch()
            .args(["vmm", "run", "--vcpus", "2", "--kernel"])
            .arg(&g)
            .args(["--cmdline", "staunch.work=counter staunch.reports=20 staunch.chunk=1M staunch.aps=idle"]),
        None,
        T,
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    let ticks = r.report_with("counter=");
    assert_eq!(ticks.len(), 20);
    assert!(ticks.iter().all(|l| field(l, "cpus") == 1 && field(l, "mismatches") == 0), "{ticks:?}");
}

/// Stop the whole VMM process from outside for 300 ms: the guest's clock
/// runs on, and the guest reports the pause on a later line, whatever it
/// was doing (computing, or in the middle of printing).
#[test]
fn kvm_guest_measures_a_pause_injected_from_outside() {
    for (name, cmdline, key) in [
        ("pause-counter", "staunch.work=counter staunch.chunk=1M staunch.reports=100000", "counter="),
        ("pause-console", "staunch.work=console", "con seq="),
    ] {
        require_kvm();
        let d = tmpdir(name);
        let vm = Vm::start(&d, 2, None, cmdline);
        let complete = |log: &str| log[..log.rfind('\n').map_or(0, |i| i + 1)].matches(key).count();
        vm.wait_for("lines", |l| complete(l) >= 5);
        let before = complete(&vm.log());
        let pid = vm.child.id() as i32;
        // SAFETY: signals to the VMM we started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let stopped = t.elapsed();
        vm.wait_for("lines after the pause", |l| complete(l) >= before + 5);
        let log = vm.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(key)).collect();
        let g = gaps(&lines[..lines.len() - 1]);
        let after = g[before.saturating_sub(1)..].iter().max().copied().unwrap_or(0);
        eprintln!("{name}: stopped {stopped:?}, guest saw maxgap_us={after}; before: {:?}", &g[..before - 1]);
        assert!(after >= 250_000, "{name}: the guest saw no pause of 300 ms: {:?}", &g[before.saturating_sub(1)..]);
        if key == "con seq=" {
            // A pause loses and doubles nothing.
            let c = console::check(log.as_bytes());
            assert!(c.clean(), "{c:?}");
        }
        drop(vm);
    }
}

#[test]
fn kvm_console_stream_is_exactly_once_undisturbed() {
    require_kvm();
    let d = tmpdir("console");
    let n = 400;
    // Serial to a file: the stream is larger than a pipe holds, and `run`
    // reads its pipe only at the end.
    let vm = Vm::start(&d, 1, None, &format!("staunch.work=console staunch.reports={n}"));
    let (log_path, events_path) = (vm.log.clone(), vm.events.clone());
    let r = vm.finish();
    assert_eq!(r.status, 0, "{}", r.stderr);
    // A busy host can trip the hang detector; a recovery must not cost a
    // byte either (tests/console.rs injects them on purpose).
    let _ = events_path;
    let log = std::fs::read(&log_path).unwrap();
    let c = console::check(&log);
    assert!(c.clean(), "{c:?}");
    assert_eq!((c.lines, c.ended, c.lost, c.doubled, c.extra), (n, true, 0, 0, 0), "{c:?}");
    let end = r.report_with("con end");
    assert_eq!(end.len(), 1);
    assert_eq!(field(end[0], "lines"), n);
    assert_eq!(field(end[0], "mismatches"), 0);
    assert_eq!(r.report_with("done code=0").len(), 1);
    summary("console, 1 vCPU", &gaps(&r.report_with("con seq=")));
    // The checker does see damage in this very log.
    let mut bad = log.clone();
    let at = c.start + 5000 + bad[c.start + 5000..].windows(5).position(|w| w == b"data=").unwrap() + 8;
    bad.remove(at);
    let c = console::check(&bad);
    assert_eq!((c.lost, c.doubled, c.extra), (1, 0, 0), "{c:?}");
    // (Where a run of equal bytes lost one, the stream differs at its end.)
    assert!(c.first_bad.is_some_and(|b| b >= at && b - at < 80), "{c:?}");
}

#[test]
fn kvm_ready_line_has_the_tsc_rate() {
    require_kvm();
    let d = tmpdir("tsc");
    let g = guest(&d);
    let mut khz = Vec::new();
    for tsc in ["auto", "pit"] {
        let r = run(
            staunch().args(["vmm", "run", "--kernel"]).arg(&g).args([
                "--cmdline",
                &format!("staunch.work=counter staunch.reports=2 staunch.chunk=1K staunch.tsc={tsc}"),
            ]),
            None,
            T,
        );
        assert_eq!(r.status, 0, "{}", r.stderr);
        let ready = r.report_with("ready");
        assert_eq!(ready.len(), 1, "{}", r.stdout);
        let src = staunch_testguest::proto::field(ready[0], "tsc_src").unwrap().to_string();
        if tsc == "pit" {
            assert_eq!(src, "pit", "{}", ready[0]);
        }
        khz.push((src, field(ready[0], "tsc_khz")));
    }
    eprintln!("{khz:?}");
    // Both figures are a plausible TSC rate and agree within 1% (here they
    // agree within 0.01%: kvmclock 2445406 kHz, the PIT 2445385-2445432).
    let (a, b) = (khz[0].1 as f64, khz[1].1 as f64);
    assert!(a > 100_000.0 && b > 100_000.0, "{khz:?}");
    assert!((a - b).abs() / a < 0.01, "{khz:?}");
}

/// Ring-0 code runs under KVM-PVM's instruction emulator, which lacks most
/// SSE forms (`xorps` among them: the compiler zeroes arrays with it): the
/// workloads benchmarks run in ring 0 must keep running there.
#[test]
fn kvm_ring0_workloads_still_run() {
    require_kvm();
    let d = tmpdir("ring0");
    let g = guest(&d);
    for work in [
        "counter staunch.chunk=500 staunch.reports=3",
        "console staunch.reports=3",
        "exits staunch.iters=100",
        "spin staunch.iters=1000",
    ] {
        let r = run(
            staunch()
                .args(["vmm", "run", "--vcpus", "2", "--kernel"])
                .arg(&g)
                .args(["--cmdline", &format!("staunch.work={work} staunch.ring=0")]),
            None,
            T,
        );
        assert_eq!(r.status, 0, "{work}: {}", r.stderr);
        assert_eq!(r.report_with("done code=0").len(), 1, "{work}: {}\n{}", r.stdout, r.stderr);
    }
}
