//! The store's unix-socket server: one thread per connection, one lock over
//! the tree and its log. A change is persisted, then applied, then its
//! watches fire, then it is acknowledged.

use crate::repl::ReplMsg;
use crate::tree::{Caller, Overlay, Perm, Quotas, Tree, watch_matches};
use crate::txn::Pending;
use crate::wal::{Wal, WalError};
use crate::wire::{self, Op, PAYLOAD_MAX, ReadError, XsError};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("socket {path}: {err}")]
    Socket { path: String, err: std::io::Error },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub data: PathBuf,
    pub quotas: Quotas,
    /// Compact the log into a snapshot once it grows past this.
    pub compact_bytes: u64,
    /// Structured events (failover, dropped standby, scrub) also go here.
    pub events: Option<PathBuf>,
    /// Scrub this often (also on demand: `XS_CONTROL scrub`).
    pub scrub_every: Option<Duration>,
    /// Connections served at once; more are closed at once (each costs a
    /// thread: a flood of connections must not take the store down).
    pub max_connections: usize,
}

/// False once a scrub found damage no healthy copy could repair: from then
/// on every request fails with EIO rather than be answered from bad data.
static SOUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

struct Watch {
    conn: u64,
    /// Absolute path, or `@introduceDomain` / `@releaseDomain`.
    path: String,
    token: String,
    /// Set for a watch registered with a relative path: events strip it.
    home: Option<String>,
}

struct Shared {
    tree: Tree,
    wal: Wal,
    quotas: Quotas,
    compact_bytes: u64,
    watches: Vec<Watch>,
    writers: HashMap<u64, Arc<Mutex<UnixStream>>>,
    introduced: BTreeSet<u32>,
    /// Hot standbys following the log (normally one).
    followers: Vec<UnixStream>,
    events: Option<PathBuf>,
    data: PathBuf,
}

/// What `staunch store` reports once it serves.
pub struct Started {
    pub nodes: usize,
    pub replayed: u64,
    pub open_ms: f64,
}

/// Open the data, bind the socket (atomically replacing a stale one) and
/// serve for ever on background threads.
pub fn start(cfg: &Config) -> Result<Started, StoreError> {
    let t = Instant::now();
    let (wal, tree, replayed) = Wal::open(&cfg.data)?;
    serve(cfg, wal, tree, replayed, t)
}

/// Follow the primary serving `cfg.socket` as its hot standby until it dies,
/// then take over. Returns once this process serves.
pub fn standby(cfg: &Config) -> Result<Started, StoreError> {
    let rp = crate::repl::repl_path(&cfg.socket);
    let serr = |err| StoreError::Socket { path: rp.display().to_string(), err };
    let t = Instant::now();
    let mut s = loop {
        match UnixStream::connect(&rp) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(serr(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let primary = crate::repl::peer_pidfd(&s).map_err(serr)?;
    crate::repl::send(&mut s, &ReplMsg::Hello).map_err(serr)?;
    let ReplMsg::Snapshot { bytes } = crate::repl::recv(&mut s).map_err(serr)? else {
        return Err(serr(std::io::Error::new(std::io::ErrorKind::InvalidData, "expected a snapshot")));
    };
    let (mut wal, _, _) = Wal::open(&cfg.data)?;
    let mut tree = wal.install(&bytes)?;
    let seq = wal.seq();
    tracing::info!(nodes = tree.len(), seq, "standby: following the primary");
    crate::emit(
        cfg.events.as_deref(),
        "store-standby-following",
        serde_json::json!({"component": "store", "nodes": tree.len(), "seq": seq}),
    );
    // The log (and the installed snapshot) reach the disk in batches, on a
    // thread of their own: acknowledging a record never waits for an fsync
    // (the primary's own log has made it durable already), and the
    // takeover's sync below makes everything durable before serving.
    let syncing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let syncer = {
        let (on, log, dir) = (syncing.clone(), wal.log_file()?, cfg.data.clone());
        std::thread::Builder::new().name("standby-sync".into()).spawn(move || {
            while on.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let snap = Wal::snapshot_path(&dir);
                let _ = std::fs::File::open(&snap).and_then(|f| f.sync_all());
                let _ = std::fs::File::open(&dir).and_then(|d| d.sync_all());
                let _ = log.sync_data();
            }
        })
    };
    let lost = loop {
        match crate::repl::recv(&mut s) {
            Ok(ReplMsg::Record { seq, payload }) => {
                let changes = crate::repl::decode_changes(&payload).map_err(serr)?;
                wal.append_copy(seq, &payload)?;
                tree.apply(&changes);
                if crate::repl::send(&mut s, &ReplMsg::Ack { seq }).is_err() {
                    break Instant::now();
                }
            }
            Ok(ReplMsg::Check { seq: at, .. }) => {
                let reply = ReplMsg::Checked { seq: at, hash: tree.scrub().recomputed };
                if crate::repl::send(&mut s, &reply).is_err() {
                    break Instant::now();
                }
            }
            Ok(ReplMsg::Snapshot { bytes }) => {
                // The primary found us diverged: start over from its copy.
                tree = wal.install(&bytes)?;
                crate::emit(
                    cfg.events.as_deref(),
                    "store-standby-resynced",
                    serde_json::json!({"component": "store", "nodes": tree.len(), "seq": wal.seq()}),
                );
            }
            Ok(ReplMsg::Corrupt { path }) => {
                tree.corrupt(&path);
            }
            Ok(other) => tracing::warn!(?other, "standby: unexpected replication message"),
            Err(_) => break Instant::now(),
        }
    };
    // Not joined: it may be asleep for up to 20 ms.
    syncing.store(false, Ordering::Relaxed);
    drop(syncer);
    if !crate::repl::exited(&primary, Duration::from_millis(200)) {
        // The primary dropped us but still serves: follow it again.
        tracing::warn!("standby: replication stream lost while the primary lives; following again");
        return standby(cfg);
    }
    wal.sync()?;
    let started = serve(cfg, wal, tree, 0, lost)?;
    let gap_ms = lost.elapsed().as_secs_f64() * 1e3;
    crate::emit(
        cfg.events.as_deref(),
        "store-failover",
        serde_json::json!({"component": "store", "rung": 2, "gap_ms": gap_ms, "nodes": started.nodes, "outcome": "standby serving"}),
    );
    Ok(Started { open_ms: gap_ms, ..started })
}

fn serve(cfg: &Config, wal: Wal, tree: Tree, replayed: u64, t: Instant) -> Result<Started, StoreError> {
    let nodes = tree.len();
    let shared = Arc::new(Mutex::new(Shared {
        tree,
        wal,
        quotas: cfg.quotas,
        compact_bytes: cfg.compact_bytes,
        watches: Vec::new(),
        writers: HashMap::new(),
        introduced: BTreeSet::new(),
        followers: Vec::new(),
        events: cfg.events.clone(),
        data: cfg.data.clone(),
    }));
    if let Some(every) = cfg.scrub_every {
        let sh = shared.clone();
        let _ = std::thread::Builder::new().name("store-scrub".into()).spawn(move || {
            loop {
                std::thread::sleep(every);
                scrub(&mut lock(&sh));
            }
        });
    }
    let max_connections = cfg.max_connections.max(1);
    let repl = bind(&crate::repl::repl_path(&cfg.socket))?;
    let listener = bind(&cfg.socket)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let serr = |err| StoreError::Socket { path: cfg.socket.display().to_string(), err };
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("store-repl".into())
        .spawn(move || {
            for mut f in repl.incoming().flatten() {
                if !matches!(crate::repl::recv(&mut f), Ok(ReplMsg::Hello)) {
                    continue;
                }
                let mut s = lock(&sh);
                let sent = crate::repl::snapshot_of(&s.tree, s.wal.seq()).and_then(|m| crate::repl::send(&mut f, &m));
                if sent.is_ok() {
                    let _ = f.set_read_timeout(Some(Duration::from_secs(1)));
                    s.followers.push(f);
                    tracing::info!("store: a standby follows");
                }
            }
        })
        .map_err(serr)?;
    std::thread::Builder::new()
        .name("store-accept".into())
        .spawn(move || {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for conn in listener.incoming().flatten() {
                if active.load(Ordering::Acquire) >= max_connections {
                    tracing::warn!(max_connections, "store: connection refused, too many open");
                    continue; // dropped: the client sees the connection close
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (s, id, a) = (shared.clone(), NEXT.fetch_add(1, Ordering::Relaxed), active.clone());
                let spawned = std::thread::Builder::new().name("store-conn".into()).spawn(move || {
                    connection(id, conn, s);
                    a.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(serr)?;
    Ok(Started { nodes, replayed, open_ms })
}

/// Bind a unix socket beside `path` and rename it over `path`: clients
/// never find the path missing, even when a predecessor's socket is there.
fn bind(path: &std::path::Path) -> Result<UnixListener, StoreError> {
    let serr = |err| StoreError::Socket { path: path.display().to_string(), err };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(serr)?;
    std::fs::rename(&tmp, path).map_err(serr)?;
    Ok(listener)
}

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while the lock was held happened before `apply` or after it
    // (apply itself does not fail): the tree is consistent either way.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-connection state.
struct Conn {
    id: u64,
    caller: Caller,
    txs: HashMap<u32, Pending>,
    next_tx: u32,
    writer: Arc<Mutex<UnixStream>>,
}

fn connection(id: u64, stream: UnixStream, shared: Arc<Mutex<Shared>>) {
    let Ok(w) = stream.try_clone() else { return };
    // A client that stops reading its events is dropped, not waited for.
    let _ = w.set_write_timeout(Some(Duration::from_secs(2)));
    let writer = Arc::new(Mutex::new(w));
    lock(&shared).writers.insert(id, writer.clone());
    let mut conn = Conn { id, caller: Caller { dom: 0 }, txs: HashMap::new(), next_tx: 1, writer };
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let msg = match wire::read_msg(&mut reader) {
            Ok(m) => m,
            Err(ReadError::TooLong(n)) => {
                // The stream cannot be resynchronised: say why, then close.
                tracing::warn!(conn = id, bytes = n, "oversized store message; closing the connection");
                let _ = send(&conn.writer, Op::Error as u32, 0, 0, b"E2BIG\0");
                break;
            }
            Err(_) => break,
        };
        let (ty, req, tx) = (msg.header.ty, msg.header.req_id, msg.header.tx_id);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&mut conn, &shared, &msg)));
        let (rty, payload) = match r {
            Ok(Ok((payload, after))) => {
                let ok = send(&conn.writer, ty, req, tx, &payload);
                if let Some(after) = after {
                    after(&lock(&shared));
                }
                if ok.is_err() {
                    break;
                }
                continue;
            }
            Ok(Err(e)) => (Op::Error as u32, format!("{e}\0").into_bytes()),
            Err(_) => {
                tracing::error!(conn = id, "store request handler panicked; request failed with EIO");
                (Op::Error as u32, b"EIO\0".to_vec())
            }
        };
        if send(&conn.writer, rty, req, tx, &payload).is_err() {
            break;
        }
    }
    let mut s = lock(&shared);
    s.writers.remove(&id);
    s.watches.retain(|w| w.conn != id);
}

fn send(w: &Mutex<UnixStream>, ty: u32, req: u32, tx: u32, payload: &[u8]) -> std::io::Result<()> {
    w.lock().unwrap_or_else(|p| p.into_inner()).write_all(&wire::encode(ty, req, tx, payload))
}

type After = Box<dyn FnOnce(&Shared)>;
type Reply = Result<(Vec<u8>, Option<After>), XsError>;

fn ok() -> Reply {
    Ok((b"OK\0".to_vec(), None))
}

fn handle(conn: &mut Conn, shared: &Mutex<Shared>, msg: &wire::Msg) -> Reply {
    staunch_fault::hit(&staunch_fault::STORE_REQUEST).map_err(|_| XsError::Io)?;
    if !SOUND.load(Ordering::Acquire) {
        return Err(XsError::Io);
    }
    let op = Op::from_u32(msg.header.ty).ok_or(XsError::Inval)?;
    let p = &msg.payload;
    let caller = conn.caller;
    let tx = msg.header.tx_id;
    match op {
        Op::Read => {
            let path = caller.path(wire::one_string(p)?)?;
            let v = query(conn, shared, tx, |o| o.read(&path))?;
            Ok((v, None))
        }
        Op::Directory => {
            let path = caller.path(wire::one_string(p)?)?;
            let names = query(conn, shared, tx, |o| o.directory(&path))?;
            let mut out = Vec::new();
            for n in names {
                out.extend_from_slice(n.as_bytes());
                out.push(0);
            }
            if out.len() > PAYLOAD_MAX {
                return Err(XsError::TooBig);
            }
            Ok((out, None))
        }
        Op::DirectoryPart => {
            let args = wire::strings(p)?;
            let [path, offset] = args.as_slice() else { return Err(XsError::Inval) };
            let path = caller.path(path)?;
            let offset: usize = offset.parse().map_err(|_| XsError::Inval)?;
            let (generation, names) = query(conn, shared, tx, |o| o.directory_gen(&path))?;
            let mut out = format!("{generation}\0").into_bytes();
            let mut flat = Vec::new();
            for n in names {
                flat.extend_from_slice(n.as_bytes());
                flat.push(0);
            }
            let rest = flat.get(offset..).ok_or(XsError::Inval)?;
            let room = PAYLOAD_MAX - out.len() - 1;
            if rest.len() <= room {
                out.extend_from_slice(rest);
                out.push(0); // an empty string: the end of the list
            } else {
                let cut = rest[..room].iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
                out.extend_from_slice(&rest[..cut]);
            }
            Ok((out, None))
        }
        Op::GetPerms => {
            let path = caller.path(wire::one_string(p)?)?;
            let perms = query(conn, shared, tx, |o| o.get_perms(&path))?;
            Ok((perms.iter().flat_map(|p| format!("{}\0", p.render()).into_bytes()).collect(), None))
        }
        Op::Write => {
            let (path, value) = wire::split_first(p)?;
            let path = caller.path(path)?;
            let value = value.to_vec();
            change(conn, shared, tx, move |o| o.write(&path, &value))
        }
        Op::Mkdir => {
            let path = caller.path(wire::one_string(p)?)?;
            change(conn, shared, tx, move |o| o.mkdir(&path))
        }
        Op::Rm => {
            let path = caller.path(wire::one_string(p)?)?;
            change(conn, shared, tx, move |o| o.rm(&path))
        }
        Op::SetPerms => {
            let args = wire::strings(p)?;
            let (path, perms) = args.split_first().ok_or(XsError::Inval)?;
            let path = caller.path(path)?;
            let perms = perms.iter().map(|s| Perm::parse(s)).collect::<Result<Vec<_>, _>>()?;
            change(conn, shared, tx, move |o| o.set_perms(&path, perms))
        }
        Op::Watch => {
            let args = wire::strings(p)?;
            let [path, token] = args.as_slice() else { return Err(XsError::Inval) };
            let (abs, home) = if path.starts_with('@') {
                (path.to_string(), None)
            } else if path.starts_with('/') {
                (caller.path(path)?, None)
            } else {
                (caller.path(path)?, Some(format!("{}/", crate::tree::home(caller.dom))))
            };
            let mut s = lock(shared);
            let mine = s.watches.iter().filter(|w| w.conn == conn.id).count();
            if mine >= s.quotas.watches_per_conn {
                return Err(XsError::Quota);
            }
            if s.watches.iter().any(|w| w.conn == conn.id && w.path == abs && w.token == *token) {
                return Err(XsError::Exist);
            }
            s.watches.push(Watch { conn: conn.id, path: abs, token: token.to_string(), home });
            // A new watch fires once at once (after the reply), with its path.
            let (path, token, w) = (path.to_string(), token.to_string(), conn.writer.clone());
            let after: After = Box::new(move |_| {
                let _ = send(&w, Op::WatchEvent as u32, 0, 0, format!("{path}\0{token}\0").as_bytes());
            });
            Ok((b"OK\0".to_vec(), Some(after)))
        }
        Op::Unwatch => {
            let args = wire::strings(p)?;
            let [path, token] = args.as_slice() else { return Err(XsError::Inval) };
            let abs = if path.starts_with('@') { path.to_string() } else { caller.path(path)? };
            let mut s = lock(shared);
            let before = s.watches.len();
            s.watches.retain(|w| !(w.conn == conn.id && w.path == abs && w.token == *token));
            if s.watches.len() == before { Err(XsError::NoEnt) } else { ok() }
        }
        Op::ResetWatches => {
            lock(shared).watches.retain(|w| w.conn != conn.id);
            conn.txs.clear();
            ok()
        }
        Op::TransactionStart => {
            let mut s = lock(shared);
            if conn.txs.len() >= s.quotas.transactions_per_conn {
                return Err(XsError::Quota);
            }
            let id = conn.next_tx;
            conn.next_tx = conn.next_tx.checked_add(1).unwrap_or(1).max(1);
            conn.txs.insert(id, Pending::begin(&mut s.tree));
            Ok((format!("{id}\0").into_bytes(), None))
        }
        Op::TransactionEnd => {
            let commit = match wire::one_string(p)? {
                "T" => true,
                "F" => false,
                _ => return Err(XsError::Inval),
            };
            let pending = conn.txs.remove(&tx).ok_or(XsError::NoEnt)?;
            if !commit {
                return ok();
            }
            let mut s = lock(shared);
            pending.validate(&s.tree)?;
            staunch_fault::hit(&staunch_fault::STORE_TX_COMMIT).map_err(|_| XsError::Io)?;
            commit_changes(&mut s, &pending)?;
            ok()
        }
        Op::GetDomainPath => {
            let dom: u32 = wire::one_string(p)?.parse().map_err(|_| XsError::Inval)?;
            Ok((format!("{}\0", crate::tree::home(dom)).into_bytes(), None))
        }
        Op::Introduce | Op::Release => {
            if !caller.privileged() {
                return Err(XsError::Acces);
            }
            let args = wire::strings(p)?;
            let dom: u32 = args.first().ok_or(XsError::Inval)?.parse().map_err(|_| XsError::Inval)?;
            let mut s = lock(shared);
            let special = if op == Op::Introduce {
                s.introduced.insert(dom);
                "@introduceDomain"
            } else {
                if !s.introduced.remove(&dom) {
                    return Err(XsError::NoEnt);
                }
                "@releaseDomain"
            };
            fire(&s, &[special.to_string()], &[]);
            ok()
        }
        Op::IsDomainIntroduced => {
            let dom: u32 = wire::one_string(p)?.parse().map_err(|_| XsError::Inval)?;
            let yes = dom == 0 || lock(shared).introduced.contains(&dom);
            Ok((if yes { b"T\0".to_vec() } else { b"F\0".to_vec() }, None))
        }
        Op::Control => {
            let args = wire::strings(p)?;
            match args.as_slice() {
                // Staunch's extension: a dom0 connection acts as `domid`
                // from now on (how a component or a test drops privilege).
                ["restrict", dom] if caller.privileged() => {
                    conn.caller = Caller { dom: dom.parse().map_err(|_| XsError::Inval)? };
                    ok()
                }
                // Fault injection, like the VMM's control socket.
                ["failpoint", spec] if caller.privileged() => {
                    staunch_fault::configure(spec).map_err(|_| XsError::Inval)?;
                    ok()
                }
                ["scrub"] if caller.privileged() => {
                    let report = scrub(&mut lock(shared));
                    Ok((format!("{report}\0").into_bytes(), None))
                }
                // Fault injection: corrupt a node in memory, behind its
                // checksum's back.
                ["corrupt-memory", path] if caller.privileged() => {
                    if lock(shared).tree.corrupt(path) {
                        ok()
                    } else {
                        Err(XsError::NoEnt)
                    }
                }
                ["corrupt-standby", path] if caller.privileged() => {
                    let mut s = lock(shared);
                    let msg = ReplMsg::Corrupt { path: path.to_string() };
                    s.followers.retain_mut(|f| crate::repl::send(f, &msg).is_ok());
                    ok()
                }
                ["compact"] if caller.privileged() => {
                    let mut s = lock(shared);
                    let s = &mut *s;
                    s.wal.compact(&s.tree).map_err(|e| log_io(&e))?;
                    ok()
                }
                _ => Err(XsError::Inval),
            }
        }
        Op::Resume | Op::SetTarget => {
            if caller.privileged() {
                ok()
            } else {
                Err(XsError::Acces)
            }
        }
        Op::WatchEvent | Op::Error => Err(XsError::Inval),
    }
}

fn log_io(e: &WalError) -> XsError {
    tracing::error!("store log: {e}");
    XsError::Io
}

/// A read-only request, in a transaction (`tx` != 0) or not.
fn query<R>(
    conn: &mut Conn,
    shared: &Mutex<Shared>,
    tx: u32,
    f: impl FnOnce(&mut Overlay) -> Result<R, XsError>,
) -> Result<R, XsError> {
    let s = lock(shared);
    let pending = if tx == 0 { Pending::default() } else { conn.txs.remove(&tx).ok_or(XsError::NoEnt)? };
    let live = pending.live();
    let mut o = Overlay { tree: &s.tree, pending, quotas: s.quotas, caller: conn.caller };
    let r = live.and_then(|()| f(&mut o));
    if tx != 0 {
        conn.txs.insert(tx, o.pending);
    }
    r
}

/// A changing request: inside a transaction it only joins the transaction;
/// otherwise it is persisted, applied and its watches fire before the reply.
fn change(
    conn: &mut Conn,
    shared: &Mutex<Shared>,
    tx: u32,
    f: impl FnOnce(&mut Overlay) -> Result<(), XsError>,
) -> Reply {
    let mut s = lock(shared);
    if tx != 0 {
        let pending = conn.txs.remove(&tx).ok_or(XsError::NoEnt)?;
        let live = pending.live();
        let mut o = Overlay { tree: &s.tree, pending, quotas: s.quotas, caller: conn.caller };
        let r = live.and_then(|()| f(&mut o));
        conn.txs.insert(tx, o.pending);
        return r.and_then(|()| ok());
    }
    let mut o = Overlay { tree: &s.tree, pending: Pending::default(), quotas: s.quotas, caller: conn.caller };
    f(&mut o)?;
    let pending = o.pending;
    commit_changes(&mut s, &pending)?;
    ok()
}

fn commit_changes(s: &mut Shared, p: &Pending) -> Result<(), XsError> {
    if p.writes.is_empty() {
        return Ok(());
    }
    let seq = s.wal.append(&p.writes).map_err(|e| log_io(&e))?;
    replicate(s, seq, &p.writes);
    s.tree.apply(&p.writes);
    let targets: Vec<String> = p.targets.iter().cloned().collect();
    let removed: Vec<String> = p.removed.iter().cloned().collect();
    fire(s, &targets, &removed);
    if s.wal.log_bytes() > s.compact_bytes {
        let s = &mut *s;
        if let Err(e) = s.wal.compact(&s.tree) {
            // The change itself is durable in the log; compaction retries later.
            tracing::error!("store compaction failed: {e}");
        }
    }
    Ok(())
}

/// Hand record `seq` to every standby and wait for each to take it; a
/// standby that does not answer is dropped (the primary never waits long).
fn replicate(s: &mut Shared, seq: u64, changes: &crate::tree::Changes) {
    if s.followers.is_empty() {
        return;
    }
    let Ok(payload) = bincode::serialize(changes) else { return };
    let msg = ReplMsg::Record { seq, payload };
    let events = s.events.clone();
    s.followers.retain_mut(|f| {
        let ok = crate::repl::send(f, &msg).is_ok()
            && matches!(crate::repl::recv(f), Ok(ReplMsg::Ack { seq: a }) if a == seq);
        if !ok {
            // Which standby (a supervisor replaces that one, not its successor).
            let standby = crate::repl::peer_pid(f).ok();
            crate::emit(
                events.as_deref(),
                "store-standby-lost",
                serde_json::json!({"component": "store", "seq": seq, "standby_pid": standby,
                                   "outcome": "primary continues without a standby"}),
            );
        }
        ok
    });
}

/// Verify the store's three copies and repair what a healthy copy allows:
/// memory (each node against its checksum, the running hash), the disk
/// (read back and compared), the standby (its hash at the same record).
/// Damage nothing can repair makes the store refuse to serve.
fn scrub(s: &mut Shared) -> serde_json::Value {
    let t = Instant::now();
    let mem = s.tree.scrub();
    let mut repaired: Vec<String> = Vec::new();
    let mut unrepaired: Vec<String> = Vec::new();
    let mut disk_ok = false;
    match Wal::verify(&s.data) {
        Ok((disk, seq)) if seq == s.wal.seq() => {
            for p in &mem.bad {
                // The disk's node is good if its content matches the
                // checksum memory recorded when the node was committed.
                match (disk.get(p), s.tree.get(p)) {
                    (Some(good), Some(bad)) if good.sum == bad.sum => {
                        let good = good.clone();
                        s.tree.repair(p, &good);
                        repaired.push(format!("memory:{p}"));
                    }
                    _ => unrepaired.push(format!("memory:{p}")),
                }
            }
            disk_ok = disk.hash == s.tree.hash;
        }
        Ok((_, seq)) => {
            tracing::error!(disk_seq = seq, seq = s.wal.seq(), "scrub: the disk is not at the log's record")
        }
        Err(e) => tracing::error!("scrub: the disk copy is damaged: {e}"),
    }
    let mem_sound = unrepaired.is_empty() && (disk_ok || mem.bad.is_empty()) && s.tree.scrub().bad.is_empty();
    if !disk_ok {
        if mem_sound {
            // Memory proved itself: write the disk copy again from it.
            let s2 = &mut *s;
            match s2.wal.compact(&s2.tree) {
                Ok(()) => repaired.push("disk".into()),
                Err(e) => unrepaired.push(format!("disk: {e}")),
            }
        } else {
            unrepaired.push("disk".into());
        }
    }
    // The standby must hold the very same tree at the same record.
    let (seq, hash) = (s.wal.seq(), s.tree.hash);
    let mut standby = Vec::new();
    let tree = &s.tree;
    s.followers.retain_mut(|f| {
        let theirs = crate::repl::send(f, &ReplMsg::Check { seq, hash }).ok().and_then(|()| crate::repl::recv(f).ok());
        match theirs {
            Some(ReplMsg::Checked { hash: h, .. }) if h == hash => {
                standby.push("match");
                true
            }
            Some(ReplMsg::Checked { .. }) => {
                standby.push("diverged: resynced");
                crate::repl::snapshot_of(tree, seq).and_then(|m| crate::repl::send(f, &m)).is_ok()
            }
            _ => false,
        }
    });
    let sound = unrepaired.is_empty();
    SOUND.store(sound, Ordering::Release);
    let report = serde_json::json!({
        "component": "store", "nodes": mem.nodes, "memory_bad": mem.bad, "hash_ok": mem.hash_ok,
        "disk_ok": disk_ok, "standby": standby, "repaired": repaired, "unrepaired": unrepaired,
        "sound": sound, "scrub_ms": t.elapsed().as_secs_f64() * 1e3,
    });
    let kind = if !sound {
        "store-unsound"
    } else if repaired.is_empty() && !standby.contains(&"diverged: resynced") {
        "store-scrub"
    } else {
        "store-repaired"
    };
    crate::emit(s.events.as_deref(), kind, report.clone());
    report
}

/// Send watch events for changed `targets` (and, for `removed` subtrees,
/// for watches below them).
fn fire(s: &Shared, targets: &[String], removed: &[String]) {
    for w in &s.watches {
        let mut hits: Vec<&str> = targets.iter().filter(|t| watch_matches(&w.path, t)).map(|t| t.as_str()).collect();
        if removed.iter().any(|r| watch_matches(r, &w.path) && *r != w.path) {
            hits.push(&w.path);
        }
        for path in hits {
            let shown = match &w.home {
                Some(h) => path.strip_prefix(h.as_str()).unwrap_or(path),
                None => path,
            };
            if let Some(out) = s.writers.get(&w.conn) {
                let _ = send(out, Op::WatchEvent as u32, 0, 0, format!("{shown}\0{}\0", w.token).as_bytes());
            }
        }
    }
}
