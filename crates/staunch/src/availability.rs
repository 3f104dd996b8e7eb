//! `staunch host availability`: RootHammer's availability model (Kourai &
//! Chiba) with the downtimes measured on this host, side by side with the
//! figures RootHammer published.
//!
//! Over one VMM rejuvenation period `T_vmm`, a VM is down once for the VMM's
//! rejuvenation, `D`, and `N` times for its own OS's rejuvenation, `D_os`
//! (`N = T_vmm / T_os`):
//!
//! - warm-VM reboot (Staunch's warm upgrade): `A = 1 - (D_warm + N*D_os)/T_vmm`
//! - saved-VM reboot (snapshot to a file, restore): `D_saved` in its place
//! - cold reboot: `D_cold` in its place (the OS term is the same: the
//!   issue's model, and the one that keeps RootHammer's ordering).
//!
//! Each D is measured here, in rounds, by the recovery benchmark's own
//! methods: the guest's clock for the warm upgrade and the saved VM (its
//! longest pause), the host's view for a cold boot (a new guest has no clock
//! spanning the outage). Staunch runs one VMM process per VM and rejuvenates
//! them one at a time, so `D` is one VM's downtime whatever the number of
//! VMs; RootHammer's `D(n)` grows with `n` (one Xen for all VMs).

use crate::bench_recovery::{cold_boot, median, on_vm, snapshot_restore, warm_upgrade, Side, VmSpec};
use crate::guestrun::cache_dir;
use crate::idle::Machine;
use anyhow::Result;

/// RootHammer's published availabilities (TDSC), T_vmm = 28 days.
const PUBLISHED: [(&str, f64); 3] = [("warm", 0.99993), ("saved", 0.99977), ("cold", 0.99986)];

pub struct Model {
    pub t_vmm_days: f64,
    pub t_os_days: f64,
    /// The guest OS's reboot, if given (else the test guest's, measured).
    pub os_reboot_s: Option<f64>,
}

struct Variant {
    name: &'static str,
    how: &'static str,
    side: Side,
    /// The guest's clock spans the outage (else the host's view is used).
    guest_clock: bool,
}

impl Variant {
    fn d_ms(&self) -> Option<f64> {
        if self.guest_clock {
            median(&self.side.guest)
        } else {
            median(&self.side.host)
        }
    }
}

pub fn run(rounds: usize, model: &Model, machine: &Machine) -> Result<i32> {
    let rounds = rounds.max(1);
    let dir = cache_dir().join(format!("availability-{}", std::process::id()));
    eprintln!("warm upgrade, 256 MiB, {rounds} rounds ...");
    let spec = VmSpec::new(dir.join("warm"), 256, 1);
    let warm = on_vm(machine, &spec, "warm upgrade", rounds, warm_upgrade);
    eprintln!("saved VM (snapshot to a file + restore), 256 MiB, {rounds} rounds ...");
    let mut saved = Side::default();
    for _ in 0..rounds {
        let r = machine.settle().and_then(|()| snapshot_restore(&dir.join("snap"), 256, 64));
        saved.record("saved VM", r);
    }
    eprintln!("cold boot, {rounds} rounds ...");
    let mut cold = Side::default();
    for _ in 0..rounds {
        let r = machine.settle().and_then(|()| cold_boot());
        cold.record("cold boot", r);
    }
    machine.settle()?;
    let _ = std::fs::remove_dir_all(&dir);
    let os_ms = match model.os_reboot_s {
        Some(s) => Some(s * 1e3),
        None => median(&cold.host),
    };
    let variants = [
        Variant {
            name: "warm",
            how: "warm-VM reboot: warm upgrade (guest memory kept in place)",
            side: warm,
            guest_clock: true,
        },
        Variant {
            name: "saved",
            how: "saved-VM reboot: snapshot to a file, restore in a new VMM",
            side: saved,
            guest_clock: true,
        },
        Variant {
            name: "cold",
            how: "cold reboot: new VMM, guest booted from its kernel",
            side: cold,
            guest_clock: false,
        },
    ];
    print_table(&variants, model, os_ms, machine);
    Ok(0)
}

/// Downtime over T_vmm (ms) → availability.
fn avail(down_ms: f64, t_vmm_ms: f64) -> f64 {
    1.0 - down_ms / t_vmm_ms
}

fn print_table(variants: &[Variant], model: &Model, os_ms: Option<f64>, machine: &Machine) {
    let t_vmm_ms = model.t_vmm_days * 86_400_000.0;
    let n = model.t_vmm_days / model.t_os_days;
    println!();
    machine.banner();
    println!(
        "| {} | D per VMM rejuvenation, p50 (this host) | rounds ok / failed | A, VMM rejuvenation only: 1 - D/T_vmm | A with the guest's OS rejuvenations (this host) | downtime per {} days (this host) | RootHammer published A | RootHammer downtime per {} days |",
        machine.head("availability (RootHammer's model)"),
        model.t_vmm_days,
        model.t_vmm_days
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for v in variants {
        let published = PUBLISHED.iter().find(|(k, _)| *k == v.name).map(|(_, a)| *a).unwrap_or(f64::NAN);
        let pub_down = (1.0 - published) * model.t_vmm_days * 86_400.0;
        // A cold reboot boots the guest's OS: with a given OS reboot time,
        // that is its downtime (the test guest's own boot is measured in it).
        let given = v.name == "cold" && model.os_reboot_s.is_some();
        let d = if given { os_ms } else { v.d_ms() };
        let (d, only, full, down) = match (d, os_ms) {
            (Some(d), Some(os)) => {
                let total = d + n * os;
                let how = match (given, v.guest_clock) {
                    (true, _) => " (the OS reboot given)",
                    (false, true) => " (guest clock)",
                    (false, false) => " (host view)",
                };
                (
                    format!("{d:.2} ms{how}"),
                    format!("{:.9}", avail(d, t_vmm_ms)),
                    format!("{:.9}", avail(total, t_vmm_ms)),
                    format!("{:.3} s", total / 1e3),
                )
            }
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {d} | {} / {} | {only} | {full} | {down} | {published} | {pub_down:.0} s |",
            v.how, v.side.ok, v.side.failed
        );
    }
    println!();
    let os = os_ms.map_or("-".into(), |o| format!("{:.3} s", o / 1e3));
    let os_src = if model.os_reboot_s.is_some() {
        "given with --os-reboot-s"
    } else {
        "the test guest's boot, measured (a general-purpose OS takes seconds: pass --os-reboot-s for yours)"
    };
    println!("model: A = 1 - (D + N*D_os)/T_vmm, D per variant; T_vmm = {} days, T_os = {} days, N = {n:.2}, D_os = {os} ({os_src}).", model.t_vmm_days, model.t_os_days);
    println!("D: warm upgrade and saved VM: the guest's own longest pause (maxgap_us on its report lines); cold reboot: process start to the new guest's first line (no guest clock spans it). One VM, 256 MiB, 1 vCPU; each VMM is its own process and rejuvenated one at a time, so D does not grow with the number of VMs (RootHammer's D(n) does: one Xen for all, 11 VMs in its figures).");
    println!("RootHammer's figures are its published availabilities (Xen, T_vmm = 28 days); its downtime column is (1 - A) x T_vmm.");
    machine.footer();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_reproduces_its_own_arithmetic() {
        // 1 s of downtime in 28 days.
        let a = avail(1000.0, 28.0 * 86_400_000.0);
        assert!((a - (1.0 - 1.0 / 2_419_200.0)).abs() < 1e-12, "{a}");
        // RootHammer's warm figure is 169 s of downtime per 28 days.
        let down = (1.0 - PUBLISHED[0].1) * 28.0 * 86_400.0;
        assert!((down - 169.344).abs() < 0.01, "{down}");
    }
}
