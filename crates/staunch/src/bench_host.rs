//! `staunch bench host`: what the host supervisor's recoveries cost, against
//! the targets the host issue sets. A real `staunch host` runs the store,
//! its standby and one VM (`staunch blk` under the test guest's
//! `blk-verify`, qd 4); each round injects one fault and reads the guest's
//! own figure from its reports (its longest request, `maxio_us`, or its
//! longest pause, `maxgap_us`), the supervisor's detection time from its
//! event (labelled as its own), and, for the store, a client's: a writer
//! acknowledges a write every few hundred microseconds across the
//! primary's SIGKILL, and its longest interval between two acknowledged
//! writes is the gap; every acknowledged write is read back at the end.
//!
//! There is no peer in this run: no other VMM has a host supervisor that
//! recovers components in place. The nearest comparisons are measured by
//! `staunch bench blk` (QEMU over qemu-storage-daemon restarted at once,
//! as systemd's Restart=always would) and `staunch bench store` (etcd).

use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Host {
    dir: PathBuf,
    run: PathBuf,
    config: PathBuf,
    sup: Child,
}

impl Host {
    fn start(dir: &Path) -> Result<Host> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let run = dir.join("run");
        let config = dir.join("host.toml");
        std::fs::write(&config, format!("run_dir = \"{}\"\n", run.display()))?;
        let log = std::fs::File::create(dir.join("host.log"))?;
        let sup = Command::new("/proc/self/exe")
            .args(["host", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let h = Host { dir: dir.to_path_buf(), run, config, sup };
        h.wait("the supervisor's host-ready", Duration::from_secs(60), |h| h.count("host-ready", "host") > 0)?;
        Ok(h)
    }

    fn events(&self) -> Vec<Value> {
        staunch_events::read(&self.run.join("events.jsonl"))
    }
    fn count(&self, event: &str, comp: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event && e["component"] == comp).count()
    }
    fn last(&self, event: &str, comp: &str) -> Option<Value> {
        self.events().into_iter().rev().find(|e| e["event"] == event && e["component"] == comp)
    }
    fn component(&self, id: &str) -> Value {
        staunch_host::status::component(&staunch_host::status::read(&self.run.join("host-status.json")), id)
    }
    fn pid(&self, id: &str) -> Result<i32> {
        self.component(id)["pid"].as_u64().map(|p| p as i32).with_context(|| format!("no pid for {id}"))
    }
    fn healthy(&self, ids: &[&str]) -> bool {
        ids.iter().all(|i| self.component(i)["health"] == "healthy")
    }
    fn serial(&self) -> String {
        std::fs::read_to_string(self.run.join("vm/b/serial.log")).unwrap_or_default()
    }
    fn wait(&self, what: &str, within: Duration, f: impl Fn(&Host) -> bool) -> Result<()> {
        let t = Instant::now();
        while !f(self) {
            if t.elapsed() > within {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.sup.kill();
        let _ = self.sup.wait();
        let _ = Command::new("/proc/self/exe").args(["host", "down", "--config"]).arg(&self.config).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn reports(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("STAUNCH blk written=")).collect()
}

/// The guest's worst figure (`key`, ms) in its reports from the `from`th
/// on, once two more have been printed after `seen` reports.
fn guest_worst(h: &Host, from: usize, key: &str) -> Result<f64> {
    let seen = reports(&h.serial()).len();
    h.wait("two more guest reports", Duration::from_secs(30), |h| reports(&h.serial()).len() >= seen + 2)?;
    let log = h.serial();
    let v = reports(&log)
        .iter()
        .skip(from)
        .filter_map(|l| staunch_testguest::proto::field(l, key)?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    Ok(v / 1e3)
}

fn signal(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) of a component of the benchmark's own host.
        unsafe { libc::kill(pid, sig) };
    }
}

#[derive(Default)]
struct Row {
    guest: Vec<f64>,
    own: Vec<f64>,
    failed: usize,
}

/// One fault to the VM's backend or VMM: (guest's worst ms, the
/// supervisor's own detection ms if it detected).
fn vm_fault(h: &Host, id: &str, sig: i32, key: &str) -> Result<(f64, Option<f64>)> {
    let all = ["store", "store-standby", "vm/b/blk0", "vm/b/vmm"];
    h.wait("a healthy host", Duration::from_secs(60), |h| h.healthy(&all))?;
    let from = reports(&h.serial()).len();
    let hung = h.count("component-hung", id);
    let back = h.count("component-recovered", id);
    signal(h.pid(id)?, sig);
    h.wait("the recovery", Duration::from_secs(30), |h| h.count("component-recovered", id) > back)?;
    let own = (h.count("component-hung", id) > hung)
        .then(|| h.last("component-hung", id).and_then(|e| e["detect_ms"].as_f64()))
        .flatten();
    Ok((guest_worst(h, from, key)?, own))
}

/// What a writer saw of one window of 600 ms.
struct Window {
    /// The longest interval between two acknowledged writes (ms).
    longest: f64,
    /// From the SIGKILL to the first acknowledged write after it (ms).
    first: Option<f64>,
    /// The store's own gap (`gap_ms_by_the_store`).
    own: Option<f64>,
    acked: usize,
    lost: usize,
}

/// A writer acknowledging writes for 600 ms, with the store primary
/// SIGKILLed in the middle if `kill` (else a control window: the same
/// writer on this machine with nothing injected); every acknowledged write
/// is read back after.
fn store_window(h: &Host, round: usize, kill: bool) -> Result<Window> {
    h.wait("a healthy store", Duration::from_secs(60), |h| h.healthy(&["store", "store-standby"]))?;
    let sock = h.run.join("store.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let (s2, a2, sock2) = (stop.clone(), acked.clone(), sock.clone());
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut c = staunch_host::storeio::connect(&sock2)?;
        let mut i = 0u64;
        while !s2.load(Ordering::Relaxed) {
            let key = format!("/bench/{kill}/r{round}/k{i}");
            if let Ok(Ok(_)) = c.write_value(0, &key, i.to_string().as_bytes()) {
                a2.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), key));
            }
            i += 1;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let failovers = h.count("store-failover", "store");
    let killed = Instant::now();
    if kill {
        signal(h.pid("store")?, libc::SIGKILL);
        h.wait("the failover", Duration::from_secs(30), |h| h.count("store-failover", "store") > failovers)?;
    }
    std::thread::sleep(Duration::from_millis(300).saturating_sub(killed.elapsed()));
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|p| p.into_inner()));
    let longest = acked.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3).fold(0.0, f64::max);
    let first = acked.iter().find(|(t, _)| *t > killed).map(|(t, _)| (*t - killed).as_secs_f64() * 1e3);
    let own = h.last("store-failover", "store").and_then(|e| e["gap_ms_by_the_store"].as_f64());
    let mut c = staunch_host::storeio::connect(&sock)?;
    let mut lost = 0;
    for (_, k) in &acked {
        if staunch_host::storeio::read(&mut c, k)?.is_none() {
            lost += 1;
        }
    }
    if acked.len() < 100 {
        bail!("only {} writes were acknowledged", acked.len());
    }
    let (first, own) = if kill { (first, own) } else { (None, None) };
    Ok(Window { longest, first, own, acked: acked.len(), lost })
}

pub fn run(quick: bool, rounds: usize, machine: &Machine) -> Result<i32> {
    let rounds = if quick { 1 } else { rounds.max(5) };
    let dir = crate::guestrun::cache_dir().join(format!("bench-host-{}", std::process::id()));
    machine.settle()?;
    let h = Host::start(&dir)?;
    let kernel = crate::guestrun::test_guest()?;
    let disk = dir.join("b.img");
    std::fs::write(&disk, vec![0u8; 16 << 20])?;
    let def = format!(
        "kernel = \"{}\"\nmemory = 64\nvcpus = 1\ncmdline = \"staunch.work=blk-verify staunch.writes=100000000 staunch.blocks=128 staunch.qd=4 staunch.report=500\"\n[[disk]]\npath = \"{}\"\n",
        kernel.display(),
        disk.display()
    );
    let def = staunch_host::def::VmDef::from_toml(&def).map_err(|e| anyhow::anyhow!("{e}"))?;
    staunch_host::storeio::define(&mut staunch_host::storeio::connect(&h.run.join("store.sock"))?, "b", &def)?;
    h.wait("the VM's first reports", Duration::from_secs(60), |h| reports(&h.serial()).len() >= 4)?;
    let cases: [(&str, &str, i32, &str, &str); 3] = [
        (
            "a backend hangs (SIGSTOP): detected, killed, its spare serves",
            "vm/b/blk0",
            libc::SIGSTOP,
            "maxio_us",
            "200 ms (detection)",
        ),
        (
            "a backend's serving process dies (SIGKILL): its spare serves",
            "vm/b/blk0",
            libc::SIGKILL,
            "maxio_us",
            "10 ms (guest stall)",
        ),
        (
            "the VMM hangs (SIGSTOP): detected, SIGABRT, its spare resumes the guest",
            "vm/b/vmm",
            libc::SIGSTOP,
            "maxgap_us",
            "200 ms (detection)",
        ),
    ];
    let mut rows: Vec<(&str, &str, Row)> = Vec::new();
    for (what, id, sig, key, target) in cases {
        eprintln!("{what} ...");
        let mut row = Row::default();
        for _ in 0..rounds {
            match vm_fault(&h, id, sig, key) {
                Ok((g, own)) => {
                    row.guest.push(g);
                    row.own.extend(own);
                }
                Err(e) => {
                    eprintln!("  FAILED round: {e:#}");
                    row.failed += 1;
                }
            }
        }
        rows.push((what, target, row));
    }
    eprintln!("store primary SIGKILL under a writer, and control windows ...");
    let mut windows: Vec<(bool, Window)> = Vec::new();
    let mut failed = 0;
    for r in 0..rounds {
        for kill in [false, true] {
            match store_window(&h, r, kill) {
                Ok(w) => windows.push((kill, w)),
                Err(e) => {
                    eprintln!("  FAILED round: {e:#}");
                    failed += 1;
                }
            }
        }
    }
    drop(h);
    machine.settle()?;
    let p50 = |v: &[f64]| crate::bench_recovery::median(v).map_or("-".into(), |m| format!("{m:.2}"));
    let max = |v: &[f64]| v.iter().copied().reduce(f64::max).map_or("-".into(), |m| format!("{m:.2}"));
    println!();
    machine.banner();
    println!(
        "| {} | rounds ok / failed | guest's worst p50 ms | max ms | supervisor's own detection p50 ms | target |",
        machine.head("host recovery")
    );
    println!("|---|---:|---:|---:|---:|---|");
    for (what, target, r) in &rows {
        println!(
            "| {what} | {} / {} | {} | {} | {} | {target} |",
            r.guest.len(),
            r.failed,
            p50(&r.guest),
            max(&r.guest),
            p50(&r.own)
        );
    }
    let of = |kill: bool, f: fn(&Window) -> Option<f64>| -> Vec<f64> {
        windows.iter().filter(|(k, _)| *k == kill).filter_map(|(_, w)| f(w)).collect()
    };
    let (first, longest, own) = (of(true, |w| w.first), of(true, |w| Some(w.longest)), of(true, |w| w.own));
    let control = of(false, |w| Some(w.longest));
    let lost: usize = windows.iter().map(|(_, w)| w.lost).sum();
    let acked: usize = windows.iter().map(|(_, w)| w.acked).sum();
    println!(
        "| the store primary dies (SIGKILL) under a writer: its standby serves | {} / {failed} | {} (kill to the first acknowledged write) | {} | {} (the store's own gap) | gap under 10 ms, no acknowledged write lost |",
        first.len(),
        p50(&first),
        max(&first),
        p50(&own)
    );
    println!();
    println!("store: a writer acknowledging writes one after the other over one connection. Its longest interval between two acknowledged writes in a 600 ms window: p50 {} ms, max {} ms with the SIGKILL in it (a fresh standby joins meanwhile), p50 {} ms, max {} ms in control windows with nothing injected (this machine's noise: the guest and its backend busy beside). Acknowledged writes read back: {acked}, not found: {lost}.", p50(&longest), max(&longest), p50(&control), max(&control));
    println!("guest's worst: the longest request (maxio_us, backend rows) or pause (maxgap_us, VMM row) in the guest's reports from the fault until two reports after the recovery, by the guest's own clock; it includes the detection. The supervisor's detection is its own figure (component-hung detect_ms). One VM, 64 MiB, qd 4; the store, its standby and the supervisor on the same 2 cores.");
    println!("no peer in this run: no other VMM recovers these components in place; see staunch bench blk (QEMU over qemu-storage-daemon restarted at once) and staunch bench store (etcd).");
    machine.footer();
    Ok(0)
}
