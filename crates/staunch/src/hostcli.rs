//! The host's command line: `staunch host` (the supervisor, its status,
//! tearing a host down) and the `staunch vm` verbs that write definitions
//! and desired state to the store and show the supervisor's view.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use staunch_host::def::{Desired, VmDef, STATUS_ROOT, VM_ROOT};
use staunch_host::storeio;
use std::path::PathBuf;

#[derive(Args)]
pub struct HostArgs {
    /// The host's configuration.
    #[arg(long, global = true, default_value = "/etc/staunch/host.toml")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<HostCmd>,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Components with their health, restarts and last event; VMs with
    /// their state.
    Status,
    /// Stop the supervisor and every component it runs (guests too).
    Down,
    /// Roll every component of the host over to BINARY, one at a time in
    /// dependency order (store standby, store, backends, VMMs), without
    /// restarting a guest: warm upgrades, upgrades through spares, a store
    /// failover. Halts at the first component that fails to take it.
    Upgrade {
        #[arg(long)]
        binary: PathBuf,
        /// Wait until every component runs it (or the upgrade halts).
        #[arg(long)]
        wait: bool,
    },
    /// RootHammer's availability model from downtimes measured here (warm
    /// upgrade, saved VM, cold reboot of the test guest), beside
    /// RootHammer's published figures. Needs /dev/kvm and an idle machine;
    /// no supervisor or config.
    Availability {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The VMM rejuvenation period.
        #[arg(long, default_value_t = 28.0)]
        t_vmm_days: f64,
        /// The guest OS rejuvenation period.
        #[arg(long, default_value_t = 7.0)]
        t_os_days: f64,
        /// The guest OS's reboot time (default: the test guest's boot,
        /// measured).
        #[arg(long)]
        os_reboot_s: Option<f64>,
        #[arg(long)]
        allow_busy: bool,
    },
}

pub fn host(a: HostArgs) -> Result<i32> {
    if let Some(HostCmd::Availability { rounds, t_vmm_days, t_os_days, os_reboot_s, allow_busy }) = a.cmd {
        if t_vmm_days <= 0.0 || t_os_days <= 0.0 || t_os_days > t_vmm_days {
            bail!("--t-vmm-days and --t-os-days must be above 0, and T_os at most T_vmm");
        }
        let machine = crate::idle::Machine::check(allow_busy)?;
        let model = crate::availability::Model { t_vmm_days, t_os_days, os_reboot_s };
        return crate::availability::run(rounds, &model, &machine);
    }
    let cfg = staunch_host::HostConfig::from_file(&a.config)?;
    match a.cmd {
        None => {
            staunch_host::Supervisor::new(cfg)?.run()?;
            Ok(0)
        }
        Some(HostCmd::Status) => status(&cfg),
        Some(HostCmd::Down) => down(&cfg),
        Some(HostCmd::Upgrade { binary, wait }) => upgrade(&cfg, &binary, wait),
        Some(HostCmd::Availability { .. }) => unreachable!("handled above"),
    }
}

fn status(cfg: &staunch_host::HostConfig) -> Result<i32> {
    let p = cfg.status_file();
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("{} (has `staunch host` run here?)", p.display()))?;
    let st: serde_json::Value = serde_json::from_str(&text)?;
    let pid = st["supervisor"].as_u64().unwrap_or(0) as u32;
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    let age = staunch_host::status::age_ms(&st);
    println!("supervisor pid {pid}: {}, status written {age} ms ago", if alive { "running" } else { "NOT RUNNING" });
    println!(
        "{:<24} {:<14} {:<11} {:>8} {:>8} {:>5} {:>4}  LAST EVENT",
        "COMPONENT", "KIND", "HEALTH", "PID", "RESTARTS", "BOOTS", "GEN"
    );
    for c in st["components"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<14} {:<11} {:>8} {:>8} {:>5} {:>4}  {}",
            c["id"].as_str().unwrap_or("?"),
            c["kind"].as_str().unwrap_or("?"),
            c["health"].as_str().unwrap_or("?"),
            c["pid"].to_string(),
            c["restarts"].to_string(),
            c["boots"].to_string(),
            c["generation"].to_string(),
            c["last_event"].as_str().unwrap_or("")
        );
    }
    println!("{:<24} {:<20} ERROR", "VM", "STATE");
    for v in st["vms"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<20} {}",
            v["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["error"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

fn upgrade(cfg: &staunch_host::HostConfig, binary: &std::path::Path, wait: bool) -> Result<i32> {
    let bin = std::fs::canonicalize(binary).with_context(|| binary.display().to_string())?;
    if !bin.is_file() {
        bail!("{} is not a file", bin.display());
    }
    let mut c = storeio::connect(&cfg.store_socket()).context("is `staunch host` running?")?;
    let generation = storeio::request_upgrade(&mut c, &bin)?;
    println!("asked for generation {generation}: every component to run {}", bin.display());
    if !wait {
        return Ok(0);
    }
    let t = std::time::Instant::now();
    let mut shown = usize::MAX;
    loop {
        let evs = staunch_events::read(&cfg.events());
        let ours = |e: &&serde_json::Value| e["generation"] == generation;
        if let Some(e) = evs.iter().filter(ours).find(|e| e["event"] == "host-upgrade-done") {
            println!(
                "done in {:.1} s: {} components on generation {generation}",
                t.elapsed().as_secs_f64(),
                e["components"]
            );
            return Ok(0);
        }
        if let Some(e) = evs
            .iter()
            .filter(ours)
            .find(|e| e["event"] == "host-upgrade-halted" || e["event"] == "host-upgrade-refused")
        {
            println!("{}: {}", e["event"].as_str().unwrap_or("?"), e);
            return Ok(1);
        }
        let n = evs.iter().filter(ours).filter(|e| e["event"] == "component-rejuvenated").count();
        if n != shown {
            eprintln!("{n} components upgraded ({:.1} s)", t.elapsed().as_secs_f64());
            shown = n;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

fn down(cfg: &staunch_host::HostConfig) -> Result<i32> {
    let Some(st) = staunch_host::state::load(&cfg.state_file())? else {
        println!("nothing recorded in {}", cfg.state_file().display());
        return Ok(0);
    };
    // The supervisor first, or it would restart what we stop.
    if let Some(s) = st.supervisor.filter(|s| staunch_host::proc::open(*s).is_some()) {
        staunch_host::proc::signal(s.pid, libc::SIGKILL);
    }
    for r in &st.components {
        r.kill();
    }
    std::fs::remove_file(cfg.state_file())?;
    println!("stopped the supervisor and {} components", st.components.len());
    Ok(0)
}

/// The `staunch vm` verbs served by the store (the others go to a VMM's
/// control socket).
#[derive(Subcommand, Clone)]
pub enum StoreVerb {
    /// Define (or redefine) a VM from a TOML file: kernel, cmdline, memory,
    /// vcpus, [[disk]] path/readonly, [[nic]] tap/mac/netns, on_poweroff,
    /// state.
    Define { name: String, file: PathBuf },
    /// Desired state: running.
    Start { name: String },
    /// Desired state: stopped.
    Stop { name: String },
    /// Remove the definition (the supervisor stops the VM).
    Undefine { name: String },
    /// Every defined VM with its desired and actual state.
    List,
    /// A VM's definition and the supervisor's view of it.
    Show { name: String },
}

pub fn vm_store(store: &std::path::Path, verb: StoreVerb) -> Result<i32> {
    let mut c = storeio::connect(store).context("is `staunch host` running? (--store names its socket)")?;
    match verb {
        StoreVerb::Define { name, file } => {
            let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
            let def = VmDef::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            def.validate().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            storeio::define(&mut c, &name, &def)?;
            println!("defined {name} (desired state: {:?})", def.state);
        }
        StoreVerb::Start { name } => storeio::set_desired(&mut c, &name, Desired::Running)?,
        StoreVerb::Stop { name } => storeio::set_desired(&mut c, &name, Desired::Stopped)?,
        StoreVerb::Undefine { name } => storeio::undefine(&mut c, &name)?,
        StoreVerb::List => {
            println!("{:<24} {:<10} {:<20} ERROR", "VM", "DESIRED", "STATE");
            for (name, def) in storeio::definitions(&mut c)? {
                let st = storeio::status(&mut c, &name)?;
                let desired = match &def {
                    Ok(d) => format!("{:?}", d.state).to_lowercase(),
                    Err(_) => "?".into(),
                };
                let mut err = st.get("error").cloned().unwrap_or_default();
                if let (Err(e), true) = (&def, err.is_empty()) {
                    err = e.to_string();
                }
                println!(
                    "{name:<24} {desired:<10} {:<20} {err}",
                    st.get("state").map_or("(not seen yet)", String::as_str)
                );
            }
        }
        StoreVerb::Show { name } => {
            let keys = storeio::subtree(&mut c, &format!("{VM_ROOT}/{name}"))?;
            if keys.is_empty() {
                bail!("no VM named '{name}' is defined");
            }
            println!("definition ({VM_ROOT}/{name}):");
            for (k, v) in &keys {
                if !v.is_empty() {
                    println!("  {k} = {v}");
                }
            }
            println!("status ({STATUS_ROOT}/{name}):");
            for (k, v) in storeio::status(&mut c, &name)? {
                if k == "components" {
                    let comps: serde_json::Value = serde_json::from_str(&v).unwrap_or_default();
                    for comp in comps.as_array().into_iter().flatten() {
                        println!(
                            "  component {} health={} pid={} restarts={} boots={}",
                            comp["id"].as_str().unwrap_or("?"),
                            comp["health"].as_str().unwrap_or("?"),
                            comp["pid"],
                            comp["restarts"],
                            comp["boots"]
                        );
                    }
                } else {
                    println!("  {k} = {v}");
                }
            }
        }
    }
    Ok(0)
}
