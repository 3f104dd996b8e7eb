//! Reconciliation: from the definitions and what runs, what to start and
//! what to stop, in dependency order (store, then each VM's backends, then
//! its VMM once they answer). Level-triggered: it looks only at the state
//! now, so running it again, or after any crash, converges to the same
//! host. And what the supervisor tells the world: the VM's actual state in
//! the store, `host-status.json`, the state file it adopts from.

use crate::component::{Health, Kind, Record, id_of};
use crate::def::{Desired, STATUS_ROOT, VmDef};
use crate::proc::{self, Identity};
use crate::supervisor::Supervisor;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

impl Supervisor {
    pub(crate) fn reconcile(&mut self) {
        self.refresh_plan();
        self.reconcile_store();
        self.reconcile_vms();
    }

    /// Check the definitions again when a new read of them arrived.
    fn refresh_plan(&mut self) {
        let Some((seen, defs)) = self.link.definitions() else { return };
        if seen == self.defs_seen && self.plan.is_some() {
            return;
        }
        self.defs_seen = seen;
        let mut plan: BTreeMap<String, Result<VmDef, crate::def::DefError>> =
            defs.into_iter().map(|(n, d)| (n, d.and_then(|d| d.validate().map(|()| d)))).collect();
        let ok: BTreeMap<String, VmDef> =
            plan.iter().filter_map(|(n, d)| Some((n.clone(), d.as_ref().ok()?.clone()))).collect();
        let running = |n: &str| self.comps.contains_key(&id_of(&Kind::Vmm { vm: n.into() }));
        for (n, e) in crate::def::check_shared_disks(&ok, &running) {
            plan.insert(n, Err(e));
        }
        for (n, d) in &plan {
            if let Ok(d) = d
                && d.state == Desired::Stopped
            {
                self.powered_off.remove(n);
            }
        }
        self.plan = Some(plan);
    }

    fn reconcile_store(&mut self) {
        if !self.comps.contains_key("store") {
            let slot = self.store_slot.clone();
            self.start_new(Kind::Store { standby: false, slot }, None);
        }
        let primary_ok = self.comps.get("store").is_some_and(|c| c.health == Health::Healthy);
        if self.cfg.store.standby && primary_ok && !self.comps.contains_key("store-standby") {
            let slot = if self.store_slot == "a" { "b" } else { "a" }.to_string();
            let dir = self.cfg.run_dir.join("store").join(&slot);
            let _ = std::fs::remove_dir_all(&dir);
            self.start_new(Kind::Store { standby: true, slot }, None);
        }
    }

    fn reconcile_vms(&mut self) {
        // Until the definitions have been read, nothing is stopped: not
        // knowing what should run is no reason to stop what runs.
        let Some(plan) = self.plan.clone() else { return };
        for (name, def) in &plan {
            match def {
                Ok(d) if d.state == Desired::Running && !self.powered_off.contains(name) => self.ensure_vm(name, d),
                Ok(_) => self.stop_vm(name, "desired state: stopped"),
                // A running VM keeps running on the definition it was started
                // with; the error is its status until the definition is fixed.
                Err(_) => {}
            }
        }
        let gone: Vec<String> = self
            .comps
            .values()
            .filter_map(|c| c.rec.kind.vm().map(String::from))
            .filter(|vm| !plan.contains_key(vm))
            .collect();
        for vm in gone {
            self.stop_vm(&vm, "undefined");
        }
    }

    fn ensure_vm(&mut self, name: &str, d: &VmDef) {
        let mut ready = true;
        let backends = (0..d.disk.len()).map(|index| Kind::Blk { vm: name.into(), index });
        let nets = (0..d.nic.len()).map(|index| Kind::Net { vm: name.into(), index });
        for kind in backends.chain(nets).collect::<Vec<_>>() {
            match self.comps.get(&id_of(&kind)) {
                None => {
                    self.start_new(kind, Some(d.clone()));
                    ready = false;
                }
                Some(c) => ready &= c.health == Health::Healthy,
            }
        }
        let vmm = Kind::Vmm { vm: name.into() };
        if ready && !self.comps.contains_key(&id_of(&vmm)) {
            self.start_new(vmm, Some(d.clone()));
        }
    }

    /// Stop a VM: its VMM first, then its backends.
    pub(crate) fn stop_vm(&mut self, name: &str, why: &str) {
        let mut ids: Vec<String> =
            self.comps.iter().filter(|(_, c)| c.rec.kind.vm() == Some(name)).map(|(i, _)| i.clone()).collect();
        if ids.is_empty() {
            return;
        }
        ids.sort_by_key(|i| !i.ends_with("/vmm"));
        for id in &ids {
            if let Some(c) = self.comps.remove(id) {
                if let Some(p) = &c.probe {
                    p.stop();
                }
                c.kill();
            }
        }
        self.emit("vm-stopped", json!({"component": format!("vm/{name}"), "why": why, "components": ids}));
        self.dirty = true;
    }

    fn start_new(&mut self, kind: Kind, def: Option<VmDef>) {
        let id = id_of(&kind);
        let rec = Record {
            kind,
            leader: Identity { pid: 0, start: 0 },
            serving: None,
            restarts: 0,
            boots: 0,
            def,
            binary: None,
            generation: 0,
        };
        let c = self.component(rec, Vec::new());
        self.comps.insert(id.clone(), c);
        match self.launch(&id) {
            Ok(()) => {
                let pid = self.comps[&id].rec.leader.pid;
                self.note(&id, "component-started", json!({"component": id, "process": pid}));
            }
            Err(e) => self.note(&id, "component-start-failed", json!({"component": id, "fault": e.to_string()})),
        }
    }

    /// A VM's actual state, from its components and its definition.
    fn vm_state(&self, name: &str) -> (String, String) {
        let comps: Vec<_> = self.comps.values().filter(|c| c.rec.kind.vm() == Some(name)).collect();
        let def = self.plan.as_ref().and_then(|p| p.get(name));
        if let Some(Err(e)) = def {
            let state = if comps.is_empty() { "error" } else { "running-with-error" };
            return (state.into(), e.to_string());
        }
        if let Some(c) = comps.iter().find(|c| c.health == Health::Backoff) {
            let next = c.backoff.map(|(u, _)| u.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(0);
            return ("backoff".into(), format!("{} is failing again and again: next try in {next} ms", c.id()));
        }
        let vmm = comps.iter().find(|c| matches!(c.rec.kind, Kind::Vmm { .. }));
        let state = match vmm.map(|c| c.health) {
            Some(Health::Healthy) => "running",
            Some(Health::Hung | Health::Recovering) => "recovering",
            Some(_) => "starting",
            None if comps.is_empty() => "stopped",
            None => "starting",
        };
        (state.into(), String::new())
    }

    fn status_json(&self) -> serde_json::Value {
        let comps: Vec<_> = self
            .comps
            .values()
            .map(|c| {
                json!({"id": c.id(), "kind": c.rec.kind.name(), "health": c.health, "pid": c.serving_pid(),
                       "leader": c.rec.leader.pid, "restarts": c.rec.restarts, "boots": c.rec.boots,
                       "generation": c.rec.generation, "binary": c.rec.binary, "last_event": c.last_event})
            })
            .collect();
        let names: std::collections::BTreeSet<String> = self
            .plan
            .iter()
            .flat_map(|p| p.keys().cloned())
            .chain(self.comps.values().filter_map(|c| c.rec.kind.vm().map(String::from)))
            .collect();
        let vms: Vec<_> = names
            .iter()
            .map(|n| {
                let (state, error) = self.vm_state(n);
                json!({"name": n, "state": state, "error": error})
            })
            .collect();
        json!({"supervisor": std::process::id(), "time_ms": crate::supervisor::wall_ms(), "components": comps, "vms": vms})
    }

    /// host-status.json and each VM's status in the store, when changed
    /// (and the file at least every second, as a sign of life).
    pub(crate) fn publish(&mut self) {
        if !self.dirty && self.last_publish.elapsed() < Duration::from_millis(250) {
            return;
        }
        let st = self.status_json();
        let _ = crate::state::write_atomic(&self.cfg.status_file(), st.to_string().as_bytes(), false);
        self.last_publish = Instant::now();
        let mut now: BTreeMap<String, String> = BTreeMap::new();
        for vm in st["vms"].as_array().into_iter().flatten() {
            let n = vm["name"].as_str().unwrap_or_default();
            let base = format!("{STATUS_ROOT}/{n}");
            now.insert(format!("{base}/state"), vm["state"].as_str().unwrap_or_default().into());
            now.insert(format!("{base}/error"), vm["error"].as_str().unwrap_or_default().into());
            let comps: Vec<_> = st["components"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["id"].as_str().is_some_and(|i| i.starts_with(&format!("vm/{n}/"))))
                .map(|c| json!({"id": c["id"], "health": c["health"], "pid": c["pid"], "restarts": c["restarts"], "boots": c["boots"]}))
                .collect();
            now.insert(format!("{base}/components"), serde_json::Value::Array(comps).to_string());
        }
        for (k, v) in &now {
            if self.published.get(k) != Some(v) {
                self.link.write(k.clone(), Some(v.clone()));
            }
        }
        for k in self.published.keys() {
            if !now.contains_key(k) {
                let vm = k.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or_default();
                self.link.write(vm, None);
            }
        }
        self.published = now;
    }

    pub(crate) fn persist(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let st = crate::state::HostState {
            version: crate::state::VERSION,
            supervisor: proc::identity(std::process::id()),
            store_slot: self.store_slot.clone(),
            components: self.comps.values().map(|c| c.rec.clone()).collect(),
            binary: Some(self.bin.clone()),
            generation: self.upgrade.as_ref().map(|u| u.generation),
            binary_generation: self.upgrade.as_ref().map(|u| u.binary.clone()),
            halted: self.halted,
            prev_binary: self.prev_bin.clone(),
        };
        if let Err(e) = crate::state::save(&self.cfg.state_file(), &st) {
            tracing::error!("cannot save the host state: {e}");
            self.dirty = true;
        }
    }
}
