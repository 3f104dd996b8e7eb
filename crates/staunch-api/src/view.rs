//! What the API shows: a VM (its definition, desired and actual state,
//! components, the operation holding it), the host's components, and the
//! Prometheus metrics. Read from the store and the supervisor's status
//! file; the API keeps no state of its own.

use crate::error::{ApiError, Result};
use crate::journal;
use serde_json::{Value, json};
use staunch_host::HostConfig;
use staunch_host::def::{STATUS_ROOT, VM_ROOT, VmDef};
use staunch_host::storeio;
use staunch_store::client::Client;
use std::fmt::Write as _;

/// One VM as `GET /v1/vms/{name}` shows it (404 if it is not defined).
pub fn vm(c: &mut Client, cfg: &HostConfig, name: &str) -> Result<Value> {
    if staunch_host::def::check_name(name).is_err() {
        return Err(ApiError::not_found(format!("no VM named '{name}'")));
    }
    let keys = storeio::subtree(c, &format!("{VM_ROOT}/{name}"))?;
    if keys.is_empty() {
        return Err(ApiError::not_found(format!("no VM named '{name}'")));
    }
    let def = VmDef::from_keys(&keys);
    let st = storeio::status(c, name)?;
    let op = journal::holder(c, name)?.map(|o| o.id);
    let comps: Value = st.get("components").and_then(|t| serde_json::from_str(t).ok()).unwrap_or(json!([]));
    let state = st.get("state").cloned().filter(|s| !s.is_empty()).unwrap_or_else(|| "unknown".into());
    let (definition, def_error) = match def {
        Ok(d) => (serde_json::to_value(&d).unwrap_or(Value::Null), None),
        Err(e) => (Value::Null, Some(e.to_string())),
    };
    let error = st.get("error").cloned().filter(|e| !e.is_empty()).or(def_error);
    let desired = keys.get("state").cloned().unwrap_or_else(|| "running".into());
    let _ = cfg;
    Ok(json!({
        "name": name,
        "desired": desired,
        "state": state,
        "error": error,
        "definition": definition,
        "components": comps,
        "operation": op,
    }))
}

pub fn vms(c: &mut Client, cfg: &HostConfig) -> Result<Value> {
    let mut out = Vec::new();
    for name in storeio::children(c, VM_ROOT)? {
        match vm(c, cfg, &name) {
            Ok(v) => out.push(v),
            // Undefined between the listing and the read.
            Err(e) if e.code == "not-found" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json!({ "vms": out }))
}

/// The supervisor's components, as it last published them.
pub fn components(cfg: &HostConfig) -> Value {
    let st = staunch_host::status::read(&cfg.status_file());
    let age = (!st.is_null()).then(|| staunch_host::status::age_ms(&st));
    json!({
        "supervisor": st["supervisor"],
        "status_age_ms": age,
        "components": st["components"].as_array().cloned().unwrap_or_default(),
    })
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus' text format (version 0.0.4).
pub fn metrics(c: &mut Client, cfg: &HostConfig) -> Result<String> {
    let mut m = String::new();
    let st = staunch_host::status::read(&cfg.status_file());
    let comps = st["components"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(m, "# HELP staunch_component_up 1 if the supervisor finds the component healthy.");
    let _ = writeln!(m, "# TYPE staunch_component_up gauge");
    for k in &comps {
        let id = esc(k["id"].as_str().unwrap_or(""));
        let kind = esc(k["kind"].as_str().unwrap_or(""));
        let up = u8::from(k["health"] == "healthy");
        let _ = writeln!(m, "staunch_component_up{{component=\"{id}\",kind=\"{kind}\"}} {up}");
    }
    let _ = writeln!(m, "# HELP staunch_component_restarts_total Restarts of the component by the supervisor.");
    let _ = writeln!(m, "# TYPE staunch_component_restarts_total counter");
    for k in &comps {
        let id = esc(k["id"].as_str().unwrap_or(""));
        let _ = writeln!(
            m,
            "staunch_component_restarts_total{{component=\"{id}\"}} {}",
            k["restarts"].as_u64().unwrap_or(0)
        );
    }
    let names = storeio::children(c, VM_ROOT)?;
    let _ = writeln!(m, "# HELP staunch_vm_state The VM's state as the supervisor reports it (1 for the current one).");
    let _ = writeln!(m, "# TYPE staunch_vm_state gauge");
    for n in &names {
        let s = storeio::read(c, &format!("{STATUS_ROOT}/{n}/state"))?.unwrap_or_else(|| "unknown".into());
        let _ = writeln!(m, "staunch_vm_state{{vm=\"{}\",state=\"{}\"}} 1", esc(n), esc(&s));
    }
    // Recoveries by rung, from the host's events (the supervisor's own
    // record of what it did, and each component's reports it relays).
    let events = staunch_events::read(&cfg.events());
    let mut by: std::collections::BTreeMap<(String, u64), u64> = Default::default();
    for e in &events {
        if let (Some(ev), Some(r)) = (e["event"].as_str(), e["rung"].as_u64()) {
            *by.entry((ev.to_string(), r)).or_default() += 1;
        }
    }
    let _ = writeln!(
        m,
        "# HELP staunch_recoveries_total Recoveries and restarts the supervisor recorded, by event and rung."
    );
    let _ = writeln!(m, "# TYPE staunch_recoveries_total counter");
    for ((ev, r), n) in by {
        let _ = writeln!(m, "staunch_recoveries_total{{event=\"{}\",rung=\"{r}\"}} {n}", esc(&ev));
    }
    vmm_metrics(&mut m, cfg, &comps);
    Ok(m)
}

/// What each running VMM and backend says of itself: labelled as such.
fn vmm_metrics(m: &mut String, cfg: &HostConfig, comps: &[Value]) {
    use staunch_host::probe::{Target, ping};
    let within = std::time::Duration::from_millis(200);
    let mut exits = String::new();
    let mut pause = String::new();
    let mut reqs = String::new();
    for k in comps.iter().filter(|k| k["health"] == "healthy") {
        let id = k["id"].as_str().unwrap_or("");
        let mut parts = id.split('/');
        let (Some("vm"), Some(vm), Some(what)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let p = staunch_host::component::VmPaths::new(cfg, vm);
        let vmq = esc(vm);
        if what == "vmm" {
            if let Ok((_, d)) = ping(&Target::Vmm(p.api()), within) {
                let _ = writeln!(exits, "staunch_vm_exits_total{{vm=\"{vmq}\"}} {}", d["exits"].as_u64().unwrap_or(0));
                if let Some(ms) = d["last_recovery"]["guest_pause_ms"].as_f64() {
                    let _ = writeln!(pause, "staunch_vm_last_pause_vmm_reported_seconds{{vm=\"{vmq}\"}} {}", ms / 1e3);
                }
            }
        } else if let Some(i) = what.strip_prefix("blk").or_else(|| what.strip_prefix("net")) {
            let kind = &what[..3];
            let ctl = p.backend(kind, i.parse().unwrap_or(0), ".ctl");
            if let Ok((_, d)) = ping(&Target::Backend(ctl), within)
                && let Some(done) = d["done"].as_u64()
            {
                let _ = writeln!(
                    reqs,
                    "staunch_backend_requests_total{{vm=\"{vmq}\",backend=\"{what}\",kind=\"{kind}\"}} {done}"
                );
            }
        }
    }
    let _ =
        writeln!(m, "# HELP staunch_vm_exits_total KVM exits of the VM's current VMM process (the VMM's own count).");
    let _ = writeln!(m, "# TYPE staunch_vm_exits_total counter");
    m.push_str(&exits);
    let _ = writeln!(
        m,
        "# HELP staunch_vm_last_pause_vmm_reported_seconds The guest pause of the VM's last recovery or upgrade as its VMM reports it (the guest's own figure is on its console)."
    );
    let _ = writeln!(m, "# TYPE staunch_vm_last_pause_vmm_reported_seconds gauge");
    m.push_str(&pause);
    let _ = writeln!(
        m,
        "# HELP staunch_backend_requests_total Requests completed by the backend's serving process (its own count)."
    );
    let _ = writeln!(m, "# TYPE staunch_backend_requests_total counter");
    m.push_str(&reqs);
}
