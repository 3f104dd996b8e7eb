//! `staunch demo`: boot the test guest with a disk, show it working, pause
//! and resume it, shut it down, check its disk from the host, summarize.

use crate::guestrun::{cache_dir, guest_config, test_guest, GuestRun};
use anyhow::{bail, Result};
use staunch_kvm::StopReason;
use staunch_testguest::proto::{self, BLOCK_SIZE};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Blocks written and verified by the guest.
    #[arg(long, default_value_t = 1024)]
    writes: u64,
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
}

const REGION_BLOCKS: u64 = 128;

pub fn run(a: DemoArgs) -> Result<i32> {
    let t0 = Instant::now();
    println!("== Staunch demo: the test guest on KVM with a virtio-blk disk");
    let kernel = test_guest()?;
    let disk = cache_dir().join("demo-disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20])?;
    println!("   guest image {}  disk {} (16 MiB)", kernel.display(), disk.display());
    let cmdline = format!(
        "staunch.work=blk-verify staunch.writes={} staunch.blocks={REGION_BLOCKS} staunch.report=128",
        a.writes
    );
    let cfg = guest_config(&kernel, &cmdline, a.vcpus, std::slice::from_ref(&disk));
    let run = GuestRun::start(&cfg)?;
    let started = run.started;
    let mut first: Option<Duration> = None;
    let mut paused_once = false;
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let Some((t, line)) = run.next_line(deadline)? else { bail!("the guest stopped reporting") };
        first.get_or_insert(t - started);
        println!("   [{:>7.1} ms] {line}", (t - started).as_secs_f64() * 1e3);
        if line.starts_with("STAUNCH blk written=") {
            last = line.clone();
            if !paused_once {
                paused_once = true;
                let p = Instant::now();
                run.vm.pause();
                println!("   -- paused all vCPUs in {:.2} ms; holding 300 ms", p.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(300));
                run.vm.resume();
                println!("   -- resumed");
            }
        }
        if line.starts_with("STAUNCH done") {
            break;
        }
    }
    let exit = run.vm.wait(Some(Duration::from_secs(10)));

    // Check the guest's work from the host: every block in the region must
    // hold an intact, correctly placed write.
    let bytes = std::fs::read(&disk)?;
    let mut intact = 0;
    for lba in 0..REGION_BLOCKS.min(a.writes) {
        let off = lba as usize * BLOCK_SIZE;
        let block: &[u8; BLOCK_SIZE] = bytes[off..off + BLOCK_SIZE].try_into()?;
        if proto::check_block(block, lba).is_ok() {
            intact += 1;
        }
    }
    let field = |k| proto::field(&last, k).unwrap_or("?").to_string();
    println!("== Summary");
    println!(
        "   boot to first serial line : {}",
        first.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3)).unwrap_or("-".into())
    );
    println!(
        "   guest work                : {} blocks written, {} verified, {} mismatches",
        field("written"),
        field("verified"),
        field("mismatches")
    );
    println!("   host check of the disk    : {intact}/{} blocks intact", REGION_BLOCKS.min(a.writes));
    println!("   vCPUs, exits              : {}, {}", a.vcpus, exit.exits);
    println!("   guest exit                : {:?}", exit.reason);
    println!("   total demo time           : {:.2} s", t0.elapsed().as_secs_f64());
    let ok =
        exit.reason == StopReason::PowerOff(0) && intact == REGION_BLOCKS.min(a.writes) && field("mismatches") == "0";
    println!("== {}", if ok { "OK: the guest ran, paused, resumed and shut down cleanly" } else { "FAILED" });
    Ok(if ok { 0 } else { 1 })
}
