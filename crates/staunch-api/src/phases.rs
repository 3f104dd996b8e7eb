//! Each operation kind as a sequence of phases. A phase looks at the world
//! (the store, the supervisor's view, a file) and returns what to do next;
//! a phase whose effect is outside the store first checks whether the
//! effect already happened, so running it again after a crash is harmless.

use crate::error::{ApiError, Result};
use crate::journal::{Op, OpKind, OpStatus, Write};
use crate::runner::Ctx;
use serde_json::{Value, json};
use staunch_host::def::{Desired, STATUS_ROOT, VM_ROOT, VmDef};
use staunch_host::storeio;
use std::time::Duration;

/// What a phase decided.
pub enum Step {
    /// Look again shortly.
    Wait,
    /// The phase is done: `writes` commit with the move to `to`.
    Go { to: &'static str, writes: Vec<Write>, result: Option<Value> },
    /// The operation is over.
    Finish { status: OpStatus, writes: Vec<Write>, result: Option<Value> },
    /// It cannot go on: roll back (where the kind can) or end as failed.
    Fail(String),
}

fn go(to: &'static str, writes: Vec<Write>) -> Step {
    Step::Go { to, writes, result: None }
}

fn done(writes: Vec<Write>) -> Step {
    Step::Finish { status: OpStatus::Succeeded, writes, result: None }
}

/// The first phase of each kind, and where a failure goes.
pub fn first(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Create => "define",
        OpKind::Delete => "stop",
        OpKind::Snapshot => "save",
        OpKind::Restore => "define",
        OpKind::HostUpgrade => "request",
    }
}

pub fn rollback(kind: OpKind) -> Option<&'static str> {
    match kind {
        OpKind::Create | OpKind::Restore => Some("rollback"),
        _ => None,
    }
}

/// Every phase of each kind, in order (for the crash-at-every-phase tests
/// and the spec's documentation).
pub fn all(kind: OpKind) -> &'static [&'static str] {
    match kind {
        OpKind::Create => &["define", "wait-running", "rollback", "rollback-wait"],
        OpKind::Delete => &["stop", "wait-stopped", "undefine", "wait-gone", "cleanup"],
        OpKind::Snapshot => &["save", "wait-stopped"],
        OpKind::Restore => &["define", "wait-running", "clear", "rollback"],
        OpKind::HostUpgrade => &["request", "wait"],
    }
}

fn vm(op: &Op) -> Result<&str> {
    op.vm.as_deref().ok_or_else(|| ApiError::internal(format!("operation {} names no VM", op.id)))
}

/// The supervisor's state of a VM (None: it has none, so the VM is not
/// known to it).
pub fn vm_state(c: &mut staunch_store::client::Client, name: &str) -> Result<Option<String>> {
    Ok(storeio::read(c, &format!("{STATUS_ROOT}/{name}/state"))?.filter(|s| !s.is_empty()))
}

fn defined(c: &mut staunch_store::client::Client, name: &str) -> Result<bool> {
    Ok(!storeio::children(c, &format!("{VM_ROOT}/{name}"))?.is_empty())
}

/// How long the current phase has run (across resumptions).
fn in_phase(op: &Op) -> Duration {
    let since = op.history.last().map_or(op.created_ms, |m| m.at_ms);
    Duration::from_millis(crate::journal::now_ms().saturating_sub(since))
}

fn timeout(op: &Op) -> Duration {
    Duration::from_secs(op.params["timeout_s"].as_u64().unwrap_or(120))
}

pub fn step(ctx: &Ctx, op: &Op) -> Result<Step> {
    match op.kind {
        OpKind::Create => create(ctx, op),
        OpKind::Delete => delete(ctx, op),
        OpKind::Snapshot => snapshot(ctx, op),
        OpKind::Restore => restore(ctx, op),
        OpKind::HostUpgrade => host_upgrade(ctx, op),
    }
}

/// Wait for the supervisor to report the VM running; its refusal of the
/// definition or a start that keeps failing is a failure.
fn wait_running(ctx: &Ctx, op: &Op, next: Step) -> Result<Step> {
    let name = vm(op)?.to_string();
    let (state, error) = ctx.store.with(|c| {
        Ok((vm_state(c, &name)?, storeio::read(c, &format!("{STATUS_ROOT}/{name}/error"))?.unwrap_or_default()))
    })?;
    Ok(match state.as_deref() {
        Some("running") => next,
        Some("error" | "backoff") => Step::Fail(format!("the VM did not start: {error}")),
        _ if in_phase(op) > timeout(op) => Step::Fail(format!("not running after {} s", timeout(op).as_secs())),
        _ => Step::Wait,
    })
}

fn create(ctx: &Ctx, op: &Op) -> Result<Step> {
    let name = vm(op)?.to_string();
    match op.phase.as_str() {
        "define" => {
            let def: VmDef = serde_json::from_value(op.params["definition"].clone())
                .map_err(|e| ApiError::internal(format!("operation {}: definition: {e}", op.id)))?;
            if ctx.store.with(|c| defined(c, &name))? {
                return Ok(Step::Fail(format!("a VM named '{name}' is defined already")));
            }
            let root = format!("{VM_ROOT}/{name}");
            let writes = def.to_keys().into_iter().map(|(k, v)| Write::Set(format!("{root}/{k}"), v)).collect();
            Ok(go("wait-running", writes))
        }
        "wait-running" => wait_running(ctx, op, done(vec![])),
        "rollback" => Ok(go("rollback-wait", vec![Write::Rm(format!("{VM_ROOT}/{name}"))])),
        "rollback-wait" => gone(ctx, op, Step::Finish { status: OpStatus::RolledBack, writes: vec![], result: None }),
        p => Err(unknown(op, p)),
    }
}

/// Wait until the supervisor runs nothing of the VM any more.
fn gone(ctx: &Ctx, op: &Op, next: Step) -> Result<Step> {
    let name = vm(op)?.to_string();
    let state = ctx.store.with(|c| vm_state(c, &name))?;
    let status = staunch_host::status::read(&ctx.cfg.status_file());
    let prefix = format!("vm/{name}/");
    let running = status["components"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["id"].as_str().is_some_and(|i| i.starts_with(&prefix)));
    Ok(if state.is_none() && !running { next } else { Step::Wait })
}

fn delete(ctx: &Ctx, op: &Op) -> Result<Step> {
    let name = vm(op)?.to_string();
    match op.phase.as_str() {
        "stop" => {
            if !ctx.store.with(|c| defined(c, &name))? {
                return Ok(go("wait-gone", vec![]));
            }
            Ok(go("wait-stopped", vec![Write::Set(format!("{VM_ROOT}/{name}/state"), "stopped".into())]))
        }
        "wait-stopped" => {
            let state = ctx.store.with(|c| vm_state(c, &name))?;
            // Undefining stops it too; waiting first keeps the order the
            // supervisor uses (VMM, then backends) visible in the events.
            let stopped = matches!(state.as_deref(), None | Some("stopped" | "error"));
            Ok(if stopped || in_phase(op) > timeout(op) { go("undefine", vec![]) } else { Step::Wait })
        }
        "undefine" => Ok(go("wait-gone", vec![Write::Rm(format!("{VM_ROOT}/{name}"))])),
        "wait-gone" => gone(ctx, op, go("cleanup", vec![])),
        "cleanup" => {
            let dir = ctx.cfg.vm_dir(&name);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Ok(Step::Fail(format!("removing {}: {e}", dir.display()))),
            }
            Ok(done(vec![]))
        }
        p => Err(unknown(op, p)),
    }
}

fn snapshot(ctx: &Ctx, op: &Op) -> Result<Step> {
    let name = vm(op)?.to_string();
    let path = std::path::PathBuf::from(op.params["path"].as_str().unwrap_or_default());
    match op.phase.as_str() {
        "save" => {
            // The VMM writes beside the name and renames into place: a file
            // under the name is a whole snapshot.
            if let Ok(m) = std::fs::metadata(&path) {
                return Ok(Step::Go {
                    to: "wait-stopped",
                    writes: vec![],
                    result: Some(json!({"path": path, "bytes": m.len()})),
                });
            }
            if ctx.store.with(|c| vm_state(c, &name))?.as_deref() != Some("running") {
                return Ok(Step::Fail("the VM is not running (and no snapshot was written)".into()));
            }
            let sock = staunch_host::component::VmPaths::new(&ctx.cfg, &name).api();
            let req = staunch_vmm::api::ApiRequest::Snapshot { path: path.clone() };
            let r = staunch_vmm::api::request_within(&sock, &req, Duration::from_secs(600));
            match r {
                Ok(r) if r.ok => Ok(Step::Go { to: "wait-stopped", writes: vec![], result: Some(r.data) }),
                Ok(r) => Ok(Step::Fail(format!("the VMM refused: {}", r.error.unwrap_or_default()))),
                // The VMM went away mid-request: its file says whether it
                // finished.
                Err(_) if path.is_file() => Ok(Step::Wait),
                Err(e) => Ok(Step::Fail(format!("the VMM did not answer: {e}"))),
            }
        }
        "wait-stopped" => {
            let state = ctx.store.with(|c| vm_state(c, &name))?;
            Ok(if matches!(state.as_deref(), None | Some("stopped")) {
                done(vec![Write::Set(format!("{VM_ROOT}/{name}/state"), "stopped".into())])
            } else {
                Step::Wait
            })
        }
        p => Err(unknown(op, p)),
    }
}

fn restore(ctx: &Ctx, op: &Op) -> Result<Step> {
    let name = vm(op)?.to_string();
    let root = format!("{VM_ROOT}/{name}");
    match op.phase.as_str() {
        "define" => {
            let path = op.params["path"].as_str().unwrap_or_default().to_string();
            if !std::path::Path::new(&path).is_file() {
                return Ok(Step::Fail(format!("{path} is gone")));
            }
            Ok(go(
                "wait-running",
                vec![
                    Write::Set(format!("{root}/restore"), path),
                    Write::Set(format!("{root}/state"), "running".into()),
                ],
            ))
        }
        "wait-running" => wait_running(ctx, op, go("clear", vec![])),
        // Once restored, the VM's definition is its kernel again: a later
        // cold start must not go back to the snapshot.
        "clear" => Ok(done(vec![Write::Rm(format!("{root}/restore"))])),
        "rollback" => Ok(Step::Finish {
            status: OpStatus::RolledBack,
            writes: vec![
                Write::Rm(format!("{root}/restore")),
                Write::Set(format!("{root}/state"), word(Desired::Stopped)),
            ],
            result: None,
        }),
        p => Err(unknown(op, p)),
    }
}

fn word(d: Desired) -> String {
    if d == Desired::Running { "running" } else { "stopped" }.into()
}

fn host_upgrade(ctx: &Ctx, op: &Op) -> Result<Step> {
    use staunch_host::storeio::UPGRADE_ROOT;
    match op.phase.as_str() {
        "request" => {
            let binary = op.params["binary"].as_str().unwrap_or_default().to_string();
            let now = ctx.store.with(|c| {
                Ok(storeio::read(c, &format!("{UPGRADE_ROOT}/generation"))?
                    .and_then(|g| g.trim().parse::<u64>().ok())
                    .unwrap_or(0))
            })?;
            let g = now + 1;
            Ok(Step::Go {
                to: "wait",
                writes: vec![
                    Write::Set(format!("{UPGRADE_ROOT}/binary"), binary),
                    Write::Set(format!("{UPGRADE_ROOT}/generation"), g.to_string()),
                ],
                result: Some(json!({"generation": g})),
            })
        }
        "wait" => {
            let g = op.result["generation"].as_u64().unwrap_or(0);
            let events = staunch_events::read(&ctx.cfg.events());
            let end = events.iter().rev().find(|e| {
                e["generation"].as_u64() == Some(g)
                    && matches!(
                        e["event"].as_str(),
                        Some("host-upgrade-done" | "host-upgrade-halted" | "host-upgrade-refused")
                    )
            });
            Ok(match end {
                Some(e) if e["event"] == "host-upgrade-done" => Step::Finish {
                    status: OpStatus::Succeeded,
                    writes: vec![],
                    result: Some(json!({"generation": g, "components": e["components"]})),
                },
                Some(e) => {
                    Step::Fail(format!("{}: {}", e["event"].as_str().unwrap_or(""), e["fault"].as_str().unwrap_or("")))
                }
                None => Step::Wait,
            })
        }
        p => Err(unknown(op, p)),
    }
}

fn unknown(op: &Op, phase: &str) -> ApiError {
    ApiError::internal(format!("operation {} ({}): unknown phase '{phase}'", op.id, op.kind.name()))
}
