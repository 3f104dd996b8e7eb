//! Journaled operations: every multi-step operation is a record in the
//! config store (`/staunch/api/op/<id>`, JSON, versioned) with its current
//! phase. A phase's effect on the store and the record's move to the next
//! phase commit in one store transaction, so a SIGKILL of the API at any
//! instant leaves each operation at a phase boundary; the next instance
//! (or this one) claims it and carries on. Effects outside the store (a
//! VMM's snapshot) are idempotent: a phase first looks whether its effect
//! already happened.
//!
//! Also here: the per-VM lock (`/staunch/api/lock/<vm>` = the operation
//! holding it, taken with the record and released with its last phase), so
//! two operations on one VM are never interleaved, and idempotency keys
//! (`/staunch/api/key/<key>` = the operation a key created).

use crate::error::{ApiError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use staunch_host::proc::Identity;
use staunch_host::storeio::{self, in_transaction, write_in};
use staunch_store::client::{Client, nul};
use staunch_store::wire::Op as StoreOp;

pub const OP_ROOT: &str = "/staunch/api/op";
pub const LOCK_ROOT: &str = "/staunch/api/lock";
pub const KEY_ROOT: &str = "/staunch/api/key";
const NEXT: &str = "/staunch/api/next";
/// The lock a host-wide operation takes.
pub const HOST_LOCK: &str = "_host";

/// The operation record's format; a reader refuses any other.
pub const OP_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    Create,
    Delete,
    Snapshot,
    Restore,
    HostUpgrade,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Delete => "delete",
            OpKind::Snapshot => "snapshot",
            OpKind::Restore => "restore",
            OpKind::HostUpgrade => "host-upgrade",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpStatus {
    Running,
    Succeeded,
    Failed,
    RolledBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mark {
    pub phase: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub version: u32,
    pub id: String,
    pub kind: OpKind,
    /// The VM it is about (None: the host).
    pub vm: Option<String>,
    pub key: Option<String>,
    /// Of the request that created it: a retry with the same key and a
    /// different request is refused.
    pub request_hash: u64,
    pub params: Value,
    pub phase: String,
    pub status: OpStatus,
    pub error: Option<String>,
    pub result: Value,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The API process driving it; another instance takes it over only
    /// once this one is gone.
    pub owner: Option<Identity>,
    /// Every phase entered, in order (resumptions show as a phase entered
    /// twice).
    pub history: Vec<Mark>,
}

impl Op {
    pub fn finished(&self) -> bool {
        self.status != OpStatus::Running
    }
    fn lock_name(&self) -> String {
        self.vm.clone().unwrap_or_else(|| HOST_LOCK.into())
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// FNV-1a: stable across processes and releases (std's hasher is not).
pub fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn refused(path: &str, e: String) -> ApiError {
    ApiError::from(storeio::StoreIoError::Refused(path.into(), e))
}

fn io(path: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::from(storeio::StoreIoError::Io(path.into(), e))
}

/// Read `path` in `tx`: Ok(None) if absent, Err(None) on a conflict.
fn read_in(c: &mut Client, tx: u32, path: &str) -> std::result::Result<Option<String>, Option<ApiError>> {
    match c.read_value(tx, path).map_err(|e| Some(io(path)(e)))? {
        Ok(b) => Ok(Some(String::from_utf8_lossy(b.strip_suffix(&[0]).unwrap_or(&b)).into_owned())),
        Err(e) if e == "ENOENT" => Ok(None),
        Err(e) if e == "EAGAIN" => Err(None),
        Err(e) => Err(Some(refused(path, e))),
    }
}

fn rm_in(c: &mut Client, tx: u32, path: &str) -> Result<bool> {
    match c.request(StoreOp::Rm, tx, &nul(&[path])).map_err(io(path))? {
        Ok(_) => Ok(true),
        Err(e) if e == "ENOENT" => Ok(true),
        Err(e) if e == "EAGAIN" => Ok(false),
        Err(e) => Err(refused(path, e)),
    }
}

/// A store change that commits together with a phase move.
#[derive(Debug, Clone)]
pub enum Write {
    Set(String, String),
    Rm(String),
}

/// Apply `writes` in `tx`; false on a conflict.
pub fn apply(c: &mut Client, tx: u32, writes: &[Write]) -> Result<bool> {
    for w in writes {
        let ok = match w {
            Write::Set(p, v) => write_in(c, tx, p, v).map_err(ApiError::from)?,
            Write::Rm(p) => rm_in(c, tx, p)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

pub fn op_path(id: &str) -> String {
    format!("{OP_ROOT}/{id}")
}

fn parse(id: &str, text: &str) -> Result<Op> {
    let v: Value = serde_json::from_str(text).map_err(|e| ApiError::internal(format!("operation {id}: {e}")))?;
    let found = v["version"].as_u64().unwrap_or(0);
    if found != OP_VERSION as u64 {
        return Err(ApiError::internal(format!("operation {id}: version {found}, this API reads {OP_VERSION}")));
    }
    serde_json::from_value(v).map_err(|e| ApiError::internal(format!("operation {id}: {e}")))
}

pub fn get(c: &mut Client, id: &str) -> Result<Option<Op>> {
    match storeio::read(c, &op_path(id))? {
        Some(t) => parse(id, &t).map(Some),
        None => Ok(None),
    }
}

pub fn list(c: &mut Client) -> Result<Vec<Op>> {
    let mut out = Vec::new();
    for id in storeio::children(c, OP_ROOT)? {
        if let Some(op) = get(c, &id)? {
            out.push(op);
        }
    }
    Ok(out)
}

/// The unfinished operation holding `lock`, if any.
pub fn holder(c: &mut Client, lock: &str) -> Result<Option<Op>> {
    let Some(id) = storeio::read(c, &format!("{LOCK_ROOT}/{lock}"))? else { return Ok(None) };
    Ok(get(c, &id)?.filter(|o| !o.finished()))
}

/// What a new operation is.
pub struct NewOp {
    pub kind: OpKind,
    pub vm: Option<String>,
    pub key: Option<String>,
    pub request_hash: u64,
    pub params: Value,
    pub first_phase: &'static str,
}

/// Either the operation just created, or the one a retry's key names.
pub enum Created {
    New(Op),
    Existing(Op),
}

/// Create an operation and take its lock in one transaction: refused with
/// 409 if another unfinished operation holds the lock; the same operation
/// again if `key` already created one with the same request.
pub fn create(c: &mut Client, n: &NewOp, check: impl Fn(&mut Client, u32) -> Result<()>) -> Result<Created> {
    in_transaction(c, |c, tx| {
        if let Some(k) = &n.key {
            match read_in(c, tx, &format!("{KEY_ROOT}/{k}")) {
                Err(None) => return Ok(None),
                Err(Some(e)) => return Err(e),
                Ok(Some(id)) => {
                    let op = match read_in(c, tx, &op_path(&id)) {
                        Err(None) => return Ok(None),
                        Err(Some(e)) => return Err(e),
                        Ok(None) => return Err(ApiError::internal(format!("key {k}: operation {id} is gone"))),
                        Ok(Some(t)) => parse(&id, &t)?,
                    };
                    if op.request_hash != n.request_hash || op.kind != n.kind || op.vm != n.vm {
                        return Err(ApiError::new(
                            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                            "idempotency-key-reused",
                            format!("Idempotency-Key '{k}' was used for a different request (operation {id})"),
                        ));
                    }
                    return Ok(Some(Created::Existing(op)));
                }
                Ok(None) => {}
            }
        }
        let lock = n.vm.clone().unwrap_or_else(|| HOST_LOCK.into());
        let lock_path = format!("{LOCK_ROOT}/{lock}");
        match read_in(c, tx, &lock_path) {
            Err(None) => return Ok(None),
            Err(Some(e)) => return Err(e),
            Ok(Some(id)) => match read_in(c, tx, &op_path(&id)) {
                Err(None) => return Ok(None),
                Err(Some(e)) => return Err(e),
                Ok(Some(t)) if !parse(&id, &t)?.finished() => {
                    return Err(ApiError::busy(&lock, &id));
                }
                Ok(_) => {}
            },
            Ok(None) => {}
        }
        check(c, tx)?;
        let next = match read_in(c, tx, NEXT) {
            Err(None) => return Ok(None),
            Err(Some(e)) => return Err(e),
            Ok(v) => v.and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0) + 1,
        };
        let id = format!("op-{next:06}");
        let t = now_ms();
        let op = Op {
            version: OP_VERSION,
            id: id.clone(),
            kind: n.kind,
            vm: n.vm.clone(),
            key: n.key.clone(),
            request_hash: n.request_hash,
            params: n.params.clone(),
            phase: n.first_phase.into(),
            status: OpStatus::Running,
            error: None,
            result: Value::Null,
            created_ms: t,
            updated_ms: t,
            owner: None,
            history: vec![Mark { phase: n.first_phase.into(), at_ms: t }],
        };
        let mut w = vec![
            Write::Set(NEXT.into(), next.to_string()),
            Write::Set(op_path(&id), serde_json::to_string(&op).map_err(|e| ApiError::internal(e.to_string()))?),
            Write::Set(lock_path.clone(), id.clone()),
        ];
        if let Some(k) = &n.key {
            w.push(Write::Set(format!("{KEY_ROOT}/{k}"), id.clone()));
        }
        Ok(apply(c, tx, &w)?.then_some(Created::New(op)))
    })
}

/// Move `op` to its next state: `writes` and the record commit together;
/// a finished operation releases its lock in the same transaction. Fails
/// with `lost` if another process owns the operation now.
pub fn commit(c: &mut Client, op: &Op, writes: &[Write]) -> Result<()> {
    let me = op.owner;
    let text = serde_json::to_string(op).map_err(|e| ApiError::internal(e.to_string()))?;
    let lock = format!("{LOCK_ROOT}/{}", op.lock_name());
    in_transaction(c, |c, tx| {
        let cur = match read_in(c, tx, &op_path(&op.id)) {
            Err(None) => return Ok(None),
            Err(Some(e)) => return Err(e),
            Ok(None) => return Err(ApiError::internal(format!("operation {} vanished", op.id))),
            Ok(Some(t)) => parse(&op.id, &t)?,
        };
        if cur.owner != me {
            return Err(ApiError::conflict(format!("operation {} is driven by another API process", op.id)));
        }
        let mut w = writes.to_vec();
        w.push(Write::Set(op_path(&op.id), text.clone()));
        if op.finished() {
            let held = match read_in(c, tx, &lock) {
                Err(None) => return Ok(None),
                Err(Some(e)) => return Err(e),
                Ok(v) => v,
            };
            if held.as_deref() == Some(op.id.as_str()) {
                w.push(Write::Rm(lock.clone()));
            }
        }
        Ok(apply(c, tx, &w)?.then_some(()))
    })
}

/// Take `id` over for `me` if it is unfinished and its owner is gone (or
/// is `me`). Returns the claimed record.
pub fn claim(c: &mut Client, id: &str, me: Identity) -> Result<Option<Op>> {
    in_transaction(c, |c, tx| {
        let mut op = match read_in(c, tx, &op_path(id)) {
            Err(None) => return Ok(None),
            Err(Some(e)) => return Err(e),
            Ok(None) => return Ok(Some(None)),
            Ok(Some(t)) => parse(id, &t)?,
        };
        if op.finished() {
            return Ok(Some(None));
        }
        if let Some(o) = op.owner
            && o != me
            && staunch_host::proc::open(o).is_some()
        {
            return Ok(Some(None));
        }
        op.owner = Some(me);
        let text = serde_json::to_string(&op).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(apply(c, tx, &[Write::Set(op_path(id), text)])?.then_some(Some(op)))
    })
}
