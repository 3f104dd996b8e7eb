//! Durability: a write-ahead log of change sets plus a snapshot.
//!
//! A change is acknowledged only after its log record is on disk
//! (`fdatasync`). Records carry a sequence number and a CRC; a record torn
//! by a crash is the log's last one and was never acknowledged, so it is
//! cut off at start-up. Compaction writes a snapshot (to a temporary file,
//! synced, renamed over the old one, directory synced) and then empties the
//! log; records at or below the snapshot's sequence are skipped on replay,
//! so a crash between the two steps loses nothing.

use crate::tree::{Changes, Node, PathMap, SHARDS, Shards, Tree};
use serde::{Deserialize, Serialize};
use staunch_fault as fault;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const REC_MAGIC: u32 = 0x5354_574c; // "STWL"
const SNAP_MAGIC: [u8; 8] = *b"STNCHSNP";
const SNAP_VERSION: u32 = 2;
const REC_HEADER: usize = 4 + 4 + 4 + 8; // magic, len, crc, seq

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("store data {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("store snapshot {0} is corrupted: {1}")]
    BadSnapshot(String, String),
    #[error("store log {path} is corrupted at byte {offset} (valid records follow it): refusing to serve")]
    BadLog { path: String, offset: u64 },
    #[error("encoding: {0}")]
    Encode(String),
    #[error("injected: {0}")]
    Injected(String),
}

/// A shard's map, allocated at its full size before decoding (serde's own
/// map decoding grows it step by step; the shard is CRC-checked already).
struct Presized(PathMap<Node>);

impl<'de> Deserialize<'de> for Presized {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Presized;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of nodes")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Presized, A::Error> {
                let n = a.size_hint().unwrap_or(0).min(1 << 24);
                let mut m = PathMap::with_capacity_and_hasher(n, Default::default());
                while let Some((k, v)) = a.next_entry::<String, Node>()? {
                    m.insert(k, v);
                }
                Ok(Presized(m))
            }
        }
        d.deserialize_map(V)
    }
}

/// What a snapshot says besides its shards.
#[derive(Serialize, Deserialize)]
struct SnapMeta {
    seq: u64,
    generation: u64,
    hash: u64,
    owned: HashMap<u32, usize>,
    /// Each shard's encoded length and CRC.
    shards: Vec<(u64, u32)>,
}

pub struct Wal {
    dir: PathBuf,
    log: File,
    seq: u64,
    bytes: u64,
    /// A standby's installed snapshot is not on disk for sure yet: the next
    /// `sync` makes it so (the primary waits for the standby's first
    /// acknowledgement, not for three fsyncs).
    unsynced: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |err| WalError::Io { path: path.display().to_string(), err }
}

impl Wal {
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join("store.log")
    }

    pub fn snapshot_path(dir: &Path) -> PathBuf {
        dir.join("store.snap")
    }

    /// Open (or create) the store in `dir` and rebuild the tree.
    pub fn open(dir: &Path) -> Result<(Wal, Tree, u64), WalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let log_path = Self::log_path(dir);
        let mut log = OpenOptions::new().read(true).append(true).create(true).open(&log_path).map_err(io(&log_path))?;
        let l = load(dir)?;
        if l.valid < l.len {
            // A torn last record: never acknowledged, cut off.
            tracing::warn!(offset = l.valid, dropped = l.len - l.valid, "store log: torn last record cut off");
            log.set_len(l.valid).map_err(io(&log_path))?;
            log.sync_data().map_err(io(&log_path))?;
        }
        log.seek(SeekFrom::End(0)).map_err(io(&log_path))?;
        Ok((Wal { dir: dir.to_path_buf(), log, seq: l.seq, bytes: l.valid, unsynced: false }, l.tree, l.replayed))
    }

    /// Read `dir` back without changing it (a scrub's look at the disk):
    /// the tree it holds and the sequence number it reaches. A torn tail
    /// counts as damage here: while the store runs, none may exist.
    pub fn verify(dir: &Path) -> Result<(Tree, u64), WalError> {
        let l = load(dir)?;
        if l.valid < l.len {
            return Err(WalError::BadLog { path: Self::log_path(dir).display().to_string(), offset: l.valid });
        }
        Ok((l.tree, l.seq))
    }

    pub fn log_bytes(&self) -> u64 {
        self.bytes
    }

    /// The sequence number of the last record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Append one change set and make it durable; returns its sequence number.
    pub fn append(&mut self, changes: &Changes) -> Result<u64, WalError> {
        fault::hit(&fault::STORE_WAL_APPEND).map_err(|e| WalError::Injected(e.to_string()))?;
        let payload = bincode::serialize(changes).map_err(|e| WalError::Encode(e.to_string()))?;
        let seq = self.seq + 1;
        self.write_record(seq, &payload, true)?;
        fault::hit(&fault::STORE_WAL_SYNCED).map_err(|e| WalError::Injected(e.to_string()))?;
        Ok(seq)
    }

    /// A standby's copy of the primary's record `seq` (already encoded).
    /// Not synced here: the standby syncs in batches and before it serves.
    pub fn append_copy(&mut self, seq: u64, payload: &[u8]) -> Result<(), WalError> {
        self.write_record(seq, payload, false)
    }

    /// The log file, for a thread that syncs it in the background.
    pub fn log_file(&self) -> Result<File, WalError> {
        self.log.try_clone().map_err(io(&Self::log_path(&self.dir)))
    }

    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.unsynced {
            let snap = Self::snapshot_path(&self.dir);
            File::open(&snap).and_then(|f| f.sync_all()).map_err(io(&snap))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            self.unsynced = false;
        }
        let p = Self::log_path(&self.dir);
        self.log.sync_data().map_err(io(&p))
    }

    fn write_record(&mut self, seq: u64, payload: &[u8], sync: bool) -> Result<(), WalError> {
        let mut rec = Vec::with_capacity(REC_HEADER + payload.len());
        rec.extend_from_slice(&REC_MAGIC.to_le_bytes());
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(payload);
        rec.extend_from_slice(&h.finalize().to_le_bytes());
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(payload);
        let path = Self::log_path(&self.dir);
        if fault::hit(&fault::STORE_WAL_TORN).map_err(|e| WalError::Injected(e.to_string()))? {
            // `corrupt`: half a record reaches the disk, then the process dies.
            self.log.write_all(&rec[..rec.len() / 2]).map_err(io(&path))?;
            let _ = self.log.sync_data();
            // SAFETY: kill(2) of ourselves: a crash in the middle of a write.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        self.log.write_all(&rec).map_err(io(&path))?;
        if sync {
            self.log.sync_data().map_err(io(&path))?;
        }
        self.seq = seq;
        self.bytes += rec.len() as u64;
        Ok(())
    }

    /// Write `tree` as the new snapshot and empty the log.
    pub fn compact(&mut self, tree: &Tree) -> Result<(), WalError> {
        let b = encode_snapshot(tree, self.seq)?;
        self.replace_with(&b, true)
    }

    /// Replace everything with a snapshot as the primary encoded it (at
    /// the primary's record number, which this log continues from).
    pub fn install(&mut self, snapshot: &[u8]) -> Result<Tree, WalError> {
        let (tree, seq) = decode_snapshot(snapshot).map_err(|e| WalError::BadSnapshot("(replicated)".into(), e))?;
        self.seq = seq;
        self.replace_with(snapshot, false)?;
        self.unsynced = true;
        Ok(tree)
    }

    /// Write `b` (an encoded snapshot at `self.seq`) in place of the old
    /// snapshot, then empty the log; durably unless `sync` is false (a
    /// standby's install: its `sync` before serving makes it durable).
    fn replace_with(&mut self, b: &[u8], sync: bool) -> Result<(), WalError> {
        let (tmp, dst) = (self.dir.join("store.snap.tmp"), Self::snapshot_path(&self.dir));
        let f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all_at(b, 0).map_err(io(&tmp))?;
        if sync {
            f.sync_all().map_err(io(&tmp))?;
        }
        fault::hit(&fault::STORE_COMPACT_SNAPSHOT).map_err(|e| WalError::Injected(e.to_string()))?;
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        if sync {
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        }
        fault::hit(&fault::STORE_COMPACT_RENAMED).map_err(|e| WalError::Injected(e.to_string()))?;
        let lp = Self::log_path(&self.dir);
        self.log.set_len(0).map_err(io(&lp))?;
        if sync {
            self.log.sync_all().map_err(io(&lp))?;
        }
        self.bytes = 0;
        Ok(())
    }
}

struct Loaded {
    tree: Tree,
    seq: u64,
    /// Bytes of the log that hold whole, valid records; `len` in all.
    valid: u64,
    len: u64,
    replayed: u64,
}

fn load(dir: &Path) -> Result<Loaded, WalError> {
    let snap_path = Wal::snapshot_path(dir);
    let (mut tree, snap_seq) = match std::fs::read(&snap_path) {
        Ok(b) => decode_snapshot(&b).map_err(|e| WalError::BadSnapshot(snap_path.display().to_string(), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Tree::default(), 0),
        Err(e) => return Err(io(&snap_path)(e)),
    };
    let log_path = Wal::log_path(dir);
    let all = match std::fs::read(&log_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&log_path)(e)),
    };
    let (mut off, mut seq, mut replayed) = (0usize, snap_seq, 0u64);
    while off < all.len() {
        let Some((rseq, changes, used)) = parse_record(&all[off..]) else {
            // Torn tail (never acknowledged) or corruption: only a tear is
            // allowed, so nothing valid may follow.
            if (off + 1..all.len()).any(|o| parse_record(&all[o..]).is_some()) {
                return Err(WalError::BadLog { path: log_path.display().to_string(), offset: off as u64 });
            }
            break;
        };
        if rseq > seq {
            tree.apply(&changes);
            seq = rseq;
            replayed += 1;
        }
        off += used;
    }
    Ok(Loaded { tree, seq, valid: off as u64, len: all.len() as u64, replayed })
}

fn parse_record(b: &[u8]) -> Option<(u64, Changes, usize)> {
    if b.len() < REC_HEADER {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != REC_MAGIC {
        return None;
    }
    let len = u32_at(4) as usize;
    let crc = u32_at(8);
    let seq = u64::from_le_bytes(b[12..20].try_into().ok()?);
    let payload = b.get(REC_HEADER..REC_HEADER.checked_add(len)?)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    if h.finalize() != crc {
        return None;
    }
    let changes = bincode::deserialize(payload).ok()?;
    Some((seq, changes, REC_HEADER + len))
}

/// Layout: magic, version, meta length, meta CRC, meta (bincode), then
/// each shard (bincode of its map) with its own length and CRC in the meta.
/// The tree's map is stored as it is, so a restart decodes straight into
/// it, shards in parallel.
pub(crate) fn encode_snapshot(tree: &Tree, seq: u64) -> Result<Vec<u8>, WalError> {
    let (nodes, owned) = tree.parts();
    let blobs: Vec<Vec<u8>> = nodes
        .0
        .iter()
        .map(|m| bincode::serialize(m).map_err(|e| WalError::Encode(e.to_string())))
        .collect::<Result<_, _>>()?;
    let meta = SnapMeta {
        seq,
        generation: tree.generation,
        hash: tree.hash,
        owned: owned.clone(),
        shards: blobs.iter().map(|b| (b.len() as u64, crc32fast::hash(b))).collect(),
    };
    let meta = bincode::serialize(&meta).map_err(|e| WalError::Encode(e.to_string()))?;
    let mut b = Vec::with_capacity(20 + meta.len() + blobs.iter().map(Vec::len).sum::<usize>());
    b.extend_from_slice(&SNAP_MAGIC);
    b.extend_from_slice(&SNAP_VERSION.to_le_bytes());
    b.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(&meta).to_le_bytes());
    b.extend_from_slice(&meta);
    for blob in &blobs {
        b.extend_from_slice(blob);
    }
    Ok(b)
}

fn decode_snapshot(b: &[u8]) -> Result<(Tree, u64), String> {
    if b.len() < 20 || b[..8] != SNAP_MAGIC {
        return Err("bad magic".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(8) != SNAP_VERSION {
        return Err(format!("version {} not supported", u32_at(8)));
    }
    let (len, crc) = (u32_at(12) as usize, u32_at(16));
    let meta = b.get(20..20 + len).ok_or("truncated")?;
    if crc32fast::hash(meta) != crc {
        return Err("CRC mismatch (header)".into());
    }
    let meta: SnapMeta = bincode::deserialize(meta).map_err(|e| e.to_string())?;
    if meta.shards.len() != SHARDS {
        return Err(format!("{} shards, expected {SHARDS}", meta.shards.len()));
    }
    let mut slices = Vec::new();
    let mut off = 20 + len;
    for &(n, crc) in &meta.shards {
        let end = off.checked_add(n as usize).ok_or("truncated")?;
        slices.push((b.get(off..end).ok_or("truncated")?, crc));
        off = end;
    }
    let maps: Vec<Result<PathMap<Node>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = slices
            .into_iter()
            .map(|(slice, crc)| {
                s.spawn(move || {
                    if crc32fast::hash(slice) != crc {
                        return Err("CRC mismatch".to_string());
                    }
                    bincode::deserialize::<Presized>(slice).map(|m| m.0).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("decoder panicked".into()))).collect()
    });
    let maps = maps.into_iter().collect::<Result<Vec<_>, _>>()?;
    // Each shard must hold only its own paths (else lookups would miss).
    for (i, m) in maps.iter().enumerate() {
        if m.keys().take(64).any(|k| Shards::of(k) != i) {
            return Err(format!("shard {i} holds foreign paths"));
        }
    }
    Ok((Tree::from_parts(Shards(maps), meta.owned, meta.generation, meta.hash), meta.seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Caller, Overlay, Quotas};
    use crate::txn::Pending;

    fn change(t: &Tree, p: &str, v: &[u8]) -> Changes {
        let mut o =
            Overlay { tree: t, pending: Pending::default(), quotas: Quotas::default(), caller: Caller { dom: 0 } };
        o.write(p, v).unwrap();
        o.pending.writes
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("staunch-wal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn replay_compact_and_torn_tail() {
        let d = dir("replay");
        let (mut w, mut t, _) = Wal::open(&d).unwrap();
        for i in 0..10 {
            let c = change(&t, &format!("/k{i}"), b"v");
            w.append(&c).unwrap();
            t.apply(&c);
        }
        w.compact(&t).unwrap();
        let c = change(&t, "/after", b"x");
        w.append(&c).unwrap();
        t.apply(&c);
        drop(w);
        // A torn record at the end: cut off, everything else intact.
        let mut f = OpenOptions::new().append(true).open(Wal::log_path(&d)).unwrap();
        f.write_all(&REC_MAGIC.to_le_bytes()).unwrap();
        f.write_all(&[9, 0, 0]).unwrap();
        drop(f);
        let (_, t2, replayed) = Wal::open(&d).unwrap();
        assert_eq!(replayed, 1);
        assert_eq!(t2.get("/after").unwrap().value, b"x");
        assert_eq!(t2.get("/k9").unwrap().value, b"v");
        assert_eq!(t2.len(), t.len());
    }

    #[test]
    fn corruption_in_the_middle_is_refused() {
        let d = dir("corrupt");
        let (mut w, mut t, _) = Wal::open(&d).unwrap();
        for i in 0..3 {
            let c = change(&t, &format!("/k{i}"), b"v");
            w.append(&c).unwrap();
            t.apply(&c);
        }
        drop(w);
        let p = Wal::log_path(&d);
        let mut b = std::fs::read(&p).unwrap();
        b[REC_HEADER + 2] ^= 0xff;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(Wal::open(&d), Err(WalError::BadLog { .. })));
        std::fs::write(Wal::snapshot_path(&d), b"STNCHSNPgarbage-garbage").unwrap();
        assert!(matches!(Wal::open(&d), Err(WalError::BadSnapshot(..))));
    }
}
