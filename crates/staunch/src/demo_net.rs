//! The demo's network part: a second test guest whose `net-ping` keeps 8
//! numbered frames in flight through Staunch's virtio-net, `staunch net`,
//! a tap and a Linux bridge (in a namespace built for the demo) to
//! `staunch net-peer`, while the backend is SIGKILLed twice and upgraded.
//! At the end the host tells the guest to stop and the two sides' counts
//! are compared.

use crate::netlab::Lab;
use crate::netvm::{NetVm, REPORT, TAP, WINDOW};
use anyhow::{bail, Context, Result};
use staunch_testguest::proto;
use std::time::{Duration, Instant};

fn field(l: &str, k: &str) -> u64 {
    proto::field(l, k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Run it; whether everything checked out.
pub fn run(t0: Instant) -> Result<bool> {
    println!("== Network: a test guest on virtio-net served by `staunch net` (vhost-user) on a tap on a Linux bridge");
    let lab = Lab::new("demo", &[TAP]).context("the demo's network namespace (needs ip(8) and root)")?;
    let dir = crate::guestrun::cache_dir().join("demo-net");
    let v = NetVm::start(&lab, &dir, "staunch.work=net-ping staunch.qd=8 staunch.report_ms=500")?;
    let b = v.vm.blk.as_ref().context("no net backend")?;
    println!(
        "   namespace {}, VMM pid {}, net backend pid {} (and a spare), the host's peer on the bridge",
        lab.ns,
        v.vm.child.id(),
        b.serving().unwrap_or(0)
    );
    let mut shown = 0;
    let show = |shown: &mut usize| {
        let lines = v.vm.lines();
        for l in lines.iter().skip(*shown).filter(|l| l.starts_with("STAUNCH net")) {
            println!("   [{:>8.1} ms] {l}", t0.elapsed().as_secs_f64() * 1e3);
        }
        *shown = lines.len();
    };
    let wait = |shown: &mut usize, n: usize| -> Result<()> {
        let from = v.vm.reports(REPORT).len();
        let t = Instant::now();
        while v.vm.reports(REPORT).len() < from + n {
            show(shown);
            if t.elapsed() > Duration::from_secs(30) || !v.vm.alive() {
                bail!("the guest's network stopped");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        show(shown);
        Ok(())
    };
    wait(&mut shown, 2)?;
    for what in ["a SIGKILL of the net backend", "another SIGKILL"] {
        println!("   >> injecting {what}");
        let from = v.vm.reports(REPORT).len();
        let pid = b.serving().context("no serving backend")?;
        // SAFETY: kill(2) of the backend process this demo started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        b.wait_replaced(pid, Duration::from_secs(20))?;
        let ev = b.events().into_iter().find(|e| e["event"] == "backend-takeover" && e["from"] == pid as u64);
        let ev = ev.context("no takeover")?;
        wait(&mut shown, 2)?;
        let rtt = v.vm.reports(REPORT).iter().skip(from).map(|l| field(l, "maxrtt_us")).max().unwrap_or(0);
        println!(
            "   << recovered: the backend's spare kept the VMM's connection ({}) and resumed the rings; \
             the guest's longest round trip {:.2} ms by its own clock; backend-reported {:.2} ms (death to rings running)",
            ev["connection"].as_str().unwrap_or("?"),
            rtt as f64 / 1e3,
            ev["resumed_us"].as_f64().unwrap_or(0.0) / 1e3
        );
    }
    let up = v.vm.lines().iter().any(|l| l.starts_with("STAUNCH net mac=") && l.contains(" status=1 "));
    let (last, host) = match v.finish(2 * WINDOW) {
        Ok(x) => x,
        Err(why) => {
            println!("== FAILED: the guest's and the host's counts disagree: {why}");
            return Ok(false);
        }
    };
    println!("   guest (its own counts)    : {} frames sent, {} replies, {} lost, {} duplicated, {} reordered, {} corrupt; link {}",
        field(&last, "sent"), field(&last, "replies"), field(&last, "lost"), field(&last, "dup"), field(&last, "reordered"), field(&last, "corrupt"),
        if up { "up" } else { "NOT UP" });
    println!(
        "   host (net-peer's counts)  : {} frames from the guest ({} duplicates), {} replies sent: they agree",
        host["unique"], host["dup"], host["replies"]
    );
    Ok(up)
}
