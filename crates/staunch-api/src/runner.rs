//! Driving operations: one thread per operation in progress, started when
//! the operation is created and, for every unfinished operation whose
//! driver is gone, when an API process starts (and every few seconds, for
//! operations another API process left behind). A phase that meets an
//! unreachable store waits and tries again; it never skips ahead.

use crate::journal::{self, Mark, Op, OpStatus};
use crate::phases::{self, Step};
use crate::store::Store;
use serde_json::json;
use staunch_host::HostConfig;
use staunch_host::proc::Identity;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The failpoints of the API: `STAUNCH_API_CRASH=create.define,snapshot.save.done`
/// SIGKILLs the API when an operation of that kind enters that phase (or,
/// with `.done`, when the phase's effect is done and not yet recorded).
pub const CRASH_ENV: &str = "STAUNCH_API_CRASH";

pub struct Ctx {
    pub store: Store,
    pub cfg: HostConfig,
    pub me: Identity,
    running: Mutex<HashSet<String>>,
    crash: Vec<String>,
}

impl Ctx {
    pub fn new(store: Store, cfg: HostConfig) -> Ctx {
        let me =
            staunch_host::proc::identity(std::process::id()).unwrap_or(Identity { pid: std::process::id(), start: 0 });
        let crash = std::env::var(CRASH_ENV).unwrap_or_default();
        let crash = crash.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
        Ctx { store, cfg, me, running: Mutex::default(), crash }
    }

    /// SIGKILL this process here if the failpoint is armed: the crash a
    /// test injects between two steps of an operation.
    pub fn crash_point(&self, op: &Op, at: &str) {
        let name = if at.is_empty() {
            format!("{}.{}", op.kind.name(), op.phase)
        } else {
            format!("{}.{}.{at}", op.kind.name(), op.phase)
        };
        if self.crash.contains(&name) {
            self.emit("api-failpoint", json!({"failpoint": name, "operation": op.id, "action": "kill"}));
            // SAFETY: kill(2) of ourselves; SIGKILL cannot be caught.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    pub fn emit(&self, event: &str, fields: serde_json::Value) {
        staunch_events::emit(Some(&self.cfg.events()), event, fields);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drive `id` on its own thread unless this process drives it already.
pub fn spawn(ctx: &Arc<Ctx>, id: &str) {
    if !ctx.lock().insert(id.to_string()) {
        return;
    }
    let (ctx, id) = (ctx.clone(), id.to_string());
    let t = std::thread::Builder::new().name(format!("op-{id}")).spawn({
        let (ctx, id) = (ctx.clone(), id.clone());
        move || {
            drive(&ctx, &id);
            ctx.lock().remove(&id);
        }
    });
    if t.is_err() {
        ctx.lock().remove(&id);
    }
}

/// Every unfinished operation not driven by a live process, driven here.
pub fn resume_all(ctx: &Arc<Ctx>) {
    let Ok(ops) = ctx.store.with(journal::list) else { return };
    for op in ops.into_iter().filter(|o| !o.finished()) {
        let ours = op.owner == Some(ctx.me);
        let orphan = op.owner.is_none_or(|o| o == ctx.me || staunch_host::proc::open(o).is_none());
        if orphan && !ctx.lock().contains(&op.id) {
            if !ours {
                ctx.emit(
                    "operation-resumed",
                    json!({"operation": op.id, "kind": op.kind.name(), "vm": op.vm, "phase": op.phase,
                           "previous_owner": op.owner.map(|o| o.pid)}),
                );
            }
            spawn(ctx, &op.id);
        }
    }
}

fn drive(ctx: &Ctx, id: &str) {
    loop {
        let op = match ctx.store.with(|c| journal::claim(c, id, ctx.me)) {
            Ok(Some(op)) => op,
            Ok(None) => return,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match run(ctx, op) {
            Ok(()) => return,
            Err(e) if e.code == "conflict" => return,
            Err(e) => {
                tracing::warn!("operation {id}: {e}; trying again");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn run(ctx: &Ctx, mut op: Op) -> crate::error::Result<()> {
    let mut entered = String::new();
    while !op.finished() {
        if entered != op.phase {
            entered = op.phase.clone();
            ctx.crash_point(&op, "");
        }
        let step = match phases::step(ctx, &op) {
            Ok(s) => s,
            // A store that is away: wait for it, in this phase.
            Err(e) if e.code == "store-unavailable" => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => Step::Fail(e.message),
        };
        let (writes, to, status) = match step {
            Step::Wait => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Step::Go { to, writes, result } => {
                if let Some(r) = result {
                    op.result = r;
                }
                (writes, to.to_string(), OpStatus::Running)
            }
            Step::Finish { status, writes, result } => {
                if let Some(r) = result {
                    op.result = r;
                }
                (writes, op.phase.clone(), status)
            }
            Step::Fail(why) => {
                op.error = Some(why);
                match phases::rollback(op.kind).filter(|_| !op.phase.starts_with("rollback")) {
                    Some(rb) => (vec![], rb.to_string(), OpStatus::Running),
                    None => (vec![], op.phase.clone(), OpStatus::Failed),
                }
            }
        };
        ctx.crash_point(&op, "done");
        let t = journal::now_ms();
        let moved = to != op.phase;
        op.phase = to;
        op.status = status;
        op.updated_ms = t;
        if moved {
            op.history.push(Mark { phase: op.phase.clone(), at_ms: t });
        }
        ctx.store.with(|c| journal::commit(c, &op, &writes))?;
        if moved && !op.finished() {
            ctx.emit(
                "operation-phase",
                json!({"operation": op.id, "kind": op.kind.name(), "vm": op.vm, "phase": op.phase}),
            );
        }
    }
    let took = op.updated_ms.saturating_sub(op.created_ms);
    ctx.emit(
        "operation-finished",
        json!({"operation": op.id, "kind": op.kind.name(), "vm": op.vm, "status": op.status,
               "error": op.error, "took_ms": took}),
    );
    Ok(())
}
