//! The store, as the supervisor and the CLI use it: definitions under
//! `/staunch/vm/<name>/`, actual state under `/staunch/host/vm/<name>/`.
//! [`Link`] is the supervisor's connection on its own thread: it re-reads
//! the definitions when their watch fires (and every second), hands them to
//! the main loop, and writes the status the main loop queues, so that a
//! store that is down or hung never stalls the loop that repairs it.

use crate::def::{DefError, Definitions, STATUS_ROOT, VM_ROOT, VmDef};
use staunch_store::client::{Client, nul};
use staunch_store::wire::Op;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreIoError {
    #[error("config store {0}: {1}")]
    Io(String, std::io::Error),
    #[error("config store: {0} {1}")]
    Refused(String, String),
    #[error("no VM named '{0}' is defined")]
    NoSuchVm(String),
    #[error("VM '{name}' is not defined correctly: {err}")]
    Def { name: String, err: DefError },
}

type Result<T> = std::result::Result<T, StoreIoError>;

fn io(what: &str) -> impl FnOnce(std::io::Error) -> StoreIoError + '_ {
    move |e| StoreIoError::Io(what.to_string(), e)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b.strip_suffix(&[0]).unwrap_or(b)).into_owned()
}

pub fn connect(socket: &Path) -> Result<Client> {
    let mut c = Client::connect(socket).map_err(|e| StoreIoError::Io(socket.display().to_string(), e))?;
    c.reconnect_for = Duration::from_secs(2);
    Ok(c)
}

/// The children of `path` (none if it does not exist).
pub fn children(c: &mut Client, path: &str) -> Result<Vec<String>> {
    match c.request(Op::Directory, 0, &nul(&[path])).map_err(io(path))? {
        Ok(b) => {
            Ok(b.split(|x| *x == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into()).collect())
        }
        Err(e) if e == "ENOENT" => Ok(Vec::new()),
        Err(e) => Err(StoreIoError::Refused(path.into(), e)),
    }
}

pub fn read(c: &mut Client, path: &str) -> Result<Option<String>> {
    match c.read_value(0, path).map_err(io(path))? {
        Ok(b) => Ok(Some(text(&b))),
        Err(e) if e == "ENOENT" => Ok(None),
        Err(e) => Err(StoreIoError::Refused(path.into(), e)),
    }
}

/// Every node below `root` with its value, by path relative to `root`.
pub fn subtree(c: &mut Client, root: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let abs = if rel.is_empty() { root.to_string() } else { format!("{root}/{rel}") };
        for k in children(c, &abs)? {
            let r = if rel.is_empty() { k } else { format!("{rel}/{k}") };
            out.insert(r.clone(), read(c, &format!("{root}/{r}"))?.unwrap_or_default());
            todo.push(r);
        }
    }
    Ok(out)
}

/// Every defined VM, each with its definition or what is wrong with it.
pub fn definitions(c: &mut Client) -> Result<Definitions> {
    let mut out = BTreeMap::new();
    for name in children(c, VM_ROOT)? {
        let keys = subtree(c, &format!("{VM_ROOT}/{name}"))?;
        let def = crate::def::check_name(&name).and_then(|()| VmDef::from_keys(&keys));
        out.insert(name, def);
    }
    Ok(out)
}

/// Run `body` in a transaction until it commits: again after a conflict
/// (`EAGAIN` inside or at the end) and across a store failover, which
/// resets the connection (the client reconnects), for up to 5 s. `body`
/// returns None when it met a conflict (the attempt is aborted).
pub fn in_transaction<T, E: From<StoreIoError>>(
    c: &mut Client,
    mut body: impl FnMut(&mut Client, u32) -> std::result::Result<Option<T>, E>,
) -> std::result::Result<T, E> {
    let t = Instant::now();
    loop {
        let tx = match c.transaction_start() {
            Err(_) if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            r => r.map_err(io("transaction"))?.map_err(|e| StoreIoError::Refused("transaction".into(), e))?,
        };
        let v = match body(c, tx) {
            Ok(v) => v,
            Err(e) => {
                // Not left open on a connection that may be used again.
                let _ = c.transaction_end(tx, false);
                return Err(e);
            }
        };
        match c.transaction_end(tx, v.is_some()).map_err(io("transaction"))? {
            Ok(_) => {
                if let Some(v) = v {
                    return Ok(v);
                }
            }
            Err(e) if e == "EAGAIN" => {}
            Err(e) => return Err(StoreIoError::Refused("transaction".into(), e).into()),
        }
    }
}

/// Write `value` at `path` in transaction `tx`; false on a conflict.
pub fn write_in(c: &mut Client, tx: u32, path: &str, value: &str) -> Result<bool> {
    match c.write_value(tx, path, value.as_bytes()).map_err(io(path))? {
        Ok(_) => Ok(true),
        Err(e) if e == "EAGAIN" => Ok(false),
        Err(e) => Err(StoreIoError::Refused(path.into(), e)),
    }
}

/// Replace a VM's definition in one transaction.
pub fn define(c: &mut Client, name: &str, def: &VmDef) -> Result<()> {
    crate::def::check_name(name).map_err(|err| StoreIoError::Def { name: name.into(), err })?;
    let root = format!("{VM_ROOT}/{name}");
    in_transaction(c, |c, tx| {
        match c.request(Op::Rm, tx, &nul(&[&root])).map_err(io(&root))? {
            Ok(_) => {}
            Err(e) if e == "ENOENT" => {}
            Err(e) if e == "EAGAIN" => return Ok(None),
            Err(e) => return Err(StoreIoError::Refused(root.clone(), e)),
        }
        for (k, v) in def.to_keys() {
            if !write_in(c, tx, &format!("{root}/{k}"), &v)? {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

pub fn set_desired(c: &mut Client, name: &str, state: crate::def::Desired) -> Result<()> {
    if read(c, &format!("{VM_ROOT}/{name}/kernel"))?.is_none() && children(c, &format!("{VM_ROOT}/{name}"))?.is_empty()
    {
        return Err(StoreIoError::NoSuchVm(name.into()));
    }
    let p = format!("{VM_ROOT}/{name}/state");
    let v = if state == crate::def::Desired::Running { "running" } else { "stopped" };
    c.write_value(0, &p, v.as_bytes()).map_err(io(&p))?.map_err(|e| StoreIoError::Refused(p, e))?;
    Ok(())
}

pub fn undefine(c: &mut Client, name: &str) -> Result<()> {
    let p = format!("{VM_ROOT}/{name}");
    match c.request(Op::Rm, 0, &nul(&[&p])).map_err(io(&p))? {
        Ok(_) => Ok(()),
        Err(e) if e == "ENOENT" => Err(StoreIoError::NoSuchVm(name.into())),
        Err(e) => Err(StoreIoError::Refused(p, e)),
    }
}

/// The supervisor's view of a VM (`status/...`), as it last wrote it.
pub fn status(c: &mut Client, name: &str) -> Result<BTreeMap<String, String>> {
    subtree(c, &format!("{STATUS_ROOT}/{name}"))
}

/// Where a host-wide rolling upgrade is asked for: `binary` (the path every
/// component should run) and `generation` (bumped on each request, so that
/// asking again for the same path, with a new file there, rolls again).
pub const UPGRADE_ROOT: &str = "/staunch/upgrade";

/// A rolling upgrade as the store asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub binary: PathBuf,
    pub generation: u64,
}

fn upgrade(c: &mut Client) -> Result<Option<Upgrade>> {
    let generation = read(c, &format!("{UPGRADE_ROOT}/generation"))?.and_then(|g| g.trim().parse().ok());
    let binary = read(c, &format!("{UPGRADE_ROOT}/binary"))?;
    Ok(match (binary, generation) {
        (Some(b), Some(generation)) if !b.is_empty() => Some(Upgrade { binary: b.into(), generation }),
        _ => None,
    })
}

/// Ask for a rolling upgrade of every component to `binary`: the next
/// generation, written in one transaction. Returns it.
pub fn request_upgrade(c: &mut Client, binary: &Path) -> Result<u64> {
    let (gp, bp) = (format!("{UPGRADE_ROOT}/generation"), format!("{UPGRADE_ROOT}/binary"));
    in_transaction(c, |c, tx| {
        let now = match c.read_value(tx, &gp).map_err(io(&gp))? {
            Ok(b) => text(&b).trim().parse::<u64>().unwrap_or(0),
            Err(e) if e == "ENOENT" => 0,
            Err(e) if e == "EAGAIN" => return Ok(None),
            Err(e) => return Err(StoreIoError::Refused(gp.clone(), e)),
        };
        let next = now + 1;
        let ok = write_in(c, tx, &bp, &binary.display().to_string())? && write_in(c, tx, &gp, &next.to_string())?;
        Ok(ok.then_some(next))
    })
}

/// What the definitions' reader hands the main loop.
#[derive(Default)]
struct Shared {
    /// Definitions as last read, and a counter bumped on each read.
    defs: Option<(u64, Definitions)>,
    /// The rolling upgrade asked for, as last read.
    upgrade: Option<Upgrade>,
    /// Status to write: path → value (None: remove).
    writes: BTreeMap<String, Option<String>>,
    connected: bool,
}

#[derive(Clone)]
pub struct Link {
    shared: Arc<Mutex<Shared>>,
}

impl Link {
    /// Re-read the definitions when their watch fires and every `every`.
    pub fn start(socket: PathBuf, every: Duration) -> Link {
        let l = Link { shared: Arc::default() };
        let s = l.shared.clone();
        let _ = std::thread::Builder::new().name("store-link".into()).spawn(move || run(&socket, &s, every));
        l
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest definitions, with their read counter.
    pub fn definitions(&self) -> Option<(u64, Definitions)> {
        self.lock().defs.clone()
    }

    pub fn upgrade(&self) -> Option<Upgrade> {
        self.lock().upgrade.clone()
    }

    pub fn write(&self, path: String, value: Option<String>) {
        self.lock().writes.insert(path, value);
    }

    pub fn connected(&self) -> bool {
        self.lock().connected
    }
}

fn run(socket: &Path, shared: &Mutex<Shared>, every: Duration) {
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let Ok(mut c) = connect(socket) else {
            lock().connected = false;
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        c.reconnect_for = Duration::from_millis(500);
        if session(&mut c, shared, every).is_err() {
            lock().connected = false;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn session(c: &mut Client, shared: &Mutex<Shared>, every: Duration) -> Result<()> {
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    c.request(Op::Watch, 0, &nul(&[VM_ROOT, "defs"]))
        .map_err(io("watch"))?
        .map_err(|e| StoreIoError::Refused("watch".into(), e))?;
    c.request(Op::Watch, 0, &nul(&[UPGRADE_ROOT, "upgrade"]))
        .map_err(io("watch"))?
        .map_err(|e| StoreIoError::Refused("watch".into(), e))?;
    let mut dirty = true;
    let mut last_read = Instant::now();
    let mut reads = 0u64;
    loop {
        if dirty || last_read.elapsed() > every {
            let defs = definitions(c)?;
            let up = upgrade(c)?;
            reads += 1;
            let mut s = lock();
            s.defs = Some((reads, defs));
            s.upgrade = up;
            s.connected = true;
            dirty = false;
            last_read = Instant::now();
        }
        let writes = std::mem::take(&mut lock().writes);
        for (p, v) in &writes {
            let r = match v {
                Some(v) => c.write_value(0, p, v.as_bytes()),
                None => c.request(Op::Rm, 0, &nul(&[p])),
            };
            if let Err(e) = r {
                // Not lost: queued again unless a newer value came meanwhile.
                let failed = p.clone();
                let mut s = lock();
                for (p, v) in writes {
                    s.writes.entry(p).or_insert(v);
                }
                return Err(StoreIoError::Io(failed, e));
            }
        }
        if c.next_event(Duration::from_millis(50)).map_err(io("watch"))?.is_some() {
            dirty = true;
            while c.next_event(Duration::ZERO).map_err(io("watch"))?.is_some() {}
        }
    }
}
