//! Transactions: what one has read and written, and the snapshot it reads.
//!
//! A transaction reads the tree as of its start (snapshot isolation, as
//! oxenstored does; C xenstored keeps each node as first read). The
//! tree is not copied: it is shared and changed in place, and every change
//! made while some transaction is open keeps the node it replaced, tagged
//! with the change's generation, in [`Versions`]. A transaction started at
//! generation `g` sees, for each path, the version replaced by the first
//! change after `g`, or the live node if none. Old versions are dropped
//! once no open transaction is older than the change that replaced them,
//! so with no transaction open a change costs nothing extra, and memory
//! grows with what changes while transactions are open, not with the tree.
//! A transaction left open while the store keeps changing would hold ever
//! more: past [`KEPT_BYTES_MAX`] the oldest snapshots expire, and their
//! transactions fail with EAGAIN (clients retry, as after a conflict).
//! At commit, optimistic validation as before: every node read (writes
//! read their node first) must still be at the generation the snapshot saw.

use crate::tree::{Changes, Node, PathMap, Tree};
use crate::wire::XsError;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Old versions kept for open transactions, in bytes (roughly), before the
/// oldest snapshots expire.
pub const KEPT_BYTES_MAX: usize = 64 << 20;

#[derive(Debug)]
struct SnapState {
    generation: u64,
    expired: AtomicBool,
}

/// A transaction's view of the tree: the generation it started at. The
/// tree holds it weakly, so a transaction dropped any way (ended, its
/// connection gone, a handler unwound) releases its old versions.
#[derive(Debug, Clone)]
pub struct Snapshot(Arc<SnapState>);

impl Snapshot {
    pub fn generation(&self) -> u64 {
        self.0.generation
    }

    /// The store no longer keeps what this snapshot would read.
    pub fn expired(&self) -> bool {
        self.0.expired.load(Ordering::Relaxed)
    }
}

/// Versions of nodes that open snapshots may still need.
#[derive(Debug, Clone)]
pub struct Versions {
    open: Vec<Weak<SnapState>>,
    /// Per path, oldest first: (generation of the change, the node it replaced).
    old: PathMap<VecDeque<(u64, Option<Node>)>>,
    /// Every kept version in generation order, to drop them oldest first,
    /// with its size.
    order: VecDeque<(u64, String, usize)>,
    bytes: usize,
    /// Expire snapshots once the kept versions pass this many bytes.
    pub cap: usize,
}

impl Default for Versions {
    fn default() -> Self {
        Versions { open: Vec::new(), old: PathMap::default(), order: VecDeque::new(), bytes: 0, cap: KEPT_BYTES_MAX }
    }
}

/// A node's rough footprint, to bound what the kept versions hold.
fn footprint(p: &str, n: Option<&Node>) -> usize {
    let body =
        n.map_or(0, |n| n.value.len() + n.perms.len() * 12 + n.children.iter().map(|c| c.len() + 32).sum::<usize>());
    64 + 2 * p.len() + body
}

impl Versions {
    pub fn begin(&mut self, generation: u64) -> Snapshot {
        let s = Arc::new(SnapState { generation, expired: AtomicBool::new(false) });
        self.open.retain(|w| w.strong_count() > 0);
        self.open.push(Arc::downgrade(&s));
        Snapshot(s)
    }

    /// Forget the versions no open snapshot needs; true if one is open
    /// (then the coming change must keep what it replaces).
    pub fn prune(&mut self) -> bool {
        loop {
            let live: Vec<Arc<SnapState>> = self.open.iter().filter_map(|w| w.upgrade()).collect();
            self.open.retain(|w| w.upgrade().is_some_and(|s| !s.expired.load(Ordering::Relaxed)));
            let Some(oldest) = live.iter().filter(|s| !s.expired.load(Ordering::Relaxed)).map(|s| s.generation).min()
            else {
                // Fresh maps, not clear(): give the memory back, and keep
                // this path (taken by every change) free of O(capacity) work.
                if !self.order.is_empty() {
                    self.old = PathMap::default();
                    self.order = VecDeque::new();
                    self.bytes = 0;
                }
                return false;
            };
            // A snapshot at `g` needs the first version replaced after `g`,
            // so versions replaced at or before the oldest snapshot are dead.
            while let Some((at, _, _)) = self.order.front()
                && *at <= oldest
            {
                let Some((_, p, size)) = self.order.pop_front() else { break };
                self.bytes = self.bytes.saturating_sub(size);
                if let Some(q) = self.old.get_mut(&p) {
                    q.pop_front();
                    if q.is_empty() {
                        self.old.remove(&p);
                    }
                }
            }
            if self.bytes <= self.cap {
                return true;
            }
            for s in live.iter().filter(|s| s.generation == oldest) {
                s.expired.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Keep `prev`, the node at `p` before the change at generation `at`.
    pub fn keep(&mut self, p: &str, at: u64, prev: Option<Node>) {
        let size = footprint(p, prev.as_ref());
        self.bytes += size;
        self.old.entry(p.to_string()).or_default().push_back((at, prev));
        self.order.push_back((at, p.to_string(), size));
    }

    /// The node at `p` as of generation `g`, if a later change replaced it
    /// (`Some(None)`: it did not exist then); `None`: the live node is it.
    pub fn at(&self, p: &str, g: u64) -> Option<Option<&Node>> {
        let q = self.old.get(p)?;
        q.iter().find(|(at, _)| *at > g).map(|(_, n)| n.as_ref())
    }

    /// How many old versions are kept (for tests and metrics).
    pub fn kept(&self) -> usize {
        self.order.len()
    }
}

/// What a transaction (or one plain request) has read and written so far.
#[derive(Debug, Default, Clone)]
pub struct Pending {
    /// Set for a transaction: reads see the tree as of its start.
    pub snapshot: Option<Snapshot>,
    pub writes: Changes,
    /// Generation of each node as first seen (`None`: it did not exist).
    pub reads: HashMap<String, Option<u64>>,
    pub(crate) created: HashMap<u32, usize>,
    /// Paths the requests named (watches fire for these), and the roots of
    /// removed subtrees (watches below them fire too).
    pub targets: BTreeSet<String>,
    pub removed: BTreeSet<String>,
}

impl Pending {
    /// A transaction starting now over `tree`.
    pub fn begin(tree: &mut Tree) -> Pending {
        Pending { snapshot: Some(tree.begin()), ..Pending::default() }
    }

    /// EAGAIN once the store dropped this transaction's snapshot.
    pub fn live(&self) -> Result<(), XsError> {
        if self.snapshot.as_ref().is_some_and(|s| s.expired()) { Err(XsError::Again) } else { Ok(()) }
    }

    /// Optimistic concurrency: every node this transaction looked at must
    /// be as it saw it.
    pub fn validate(&self, tree: &Tree) -> Result<(), XsError> {
        self.live()?;
        for (p, g) in &self.reads {
            if tree.get(p).map(|n| n.generation) != *g {
                return Err(XsError::Again);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Caller, Overlay, Perm, Quotas};

    fn overlay(t: &Tree, pending: Pending) -> Overlay<'_> {
        Overlay { tree: t, pending, quotas: Quotas::default(), caller: Caller { dom: 0 } }
    }

    /// Run `f` as a plain request: applied at once.
    fn now(t: &mut Tree, f: impl FnOnce(&mut Overlay) -> Result<(), XsError>) {
        let mut o = overlay(t, Pending::default());
        f(&mut o).unwrap();
        let w = o.pending.writes;
        t.apply(&w);
    }

    /// Run `f` inside the transaction `tx`.
    fn inside<R>(t: &Tree, tx: &mut Pending, f: impl FnOnce(&mut Overlay) -> R) -> R {
        let mut o = overlay(t, std::mem::take(tx));
        let r = f(&mut o);
        *tx = o.pending;
        r
    }

    #[test]
    fn a_transaction_reads_its_snapshot() {
        let mut t = Tree::default();
        now(&mut t, |o| o.write("/a", b"old"));
        now(&mut t, |o| o.write("/d/x", b"1"));
        now(&mut t, |o| o.write("/gone", b"g"));
        let mut tx = Pending::begin(&mut t);
        assert_eq!(inside(&t, &mut tx, |o| o.read("/a")), Ok(b"old".to_vec()));
        now(&mut t, |o| o.write("/a", b"outside"));
        now(&mut t, |o| o.write("/d/new", b"n"));
        now(&mut t, |o| o.rm("/gone"));
        now(&mut t, |o| o.set_perms("/d/x", vec![Perm::parse("n0").unwrap(), Perm::parse("r5").unwrap()]));
        assert_eq!(inside(&t, &mut tx, |o| o.read("/a")), Ok(b"old".to_vec()));
        assert_eq!(inside(&t, &mut tx, |o| o.read("/gone")), Ok(b"g".to_vec()));
        assert_eq!(inside(&t, &mut tx, |o| o.read("/d/new")), Err(XsError::NoEnt));
        assert_eq!(inside(&t, &mut tx, |o| o.directory("/d")), Ok(vec!["x".to_string()]));
        assert_eq!(inside(&t, &mut tx, |o| o.get_perms("/d/x")), Ok(vec![Perm::parse("n0").unwrap()]));
        inside(&t, &mut tx, |o| o.write("/a", b"inside")).unwrap();
        assert_eq!(inside(&t, &mut tx, |o| o.read("/a")), Ok(b"inside".to_vec()));
        assert_eq!(t.get("/a").unwrap().value, b"outside");
        assert_eq!(tx.validate(&t), Err(XsError::Again));
    }

    #[test]
    fn untouched_changes_do_not_conflict() {
        let mut t = Tree::default();
        now(&mut t, |o| o.write("/a/k", b"0"));
        let mut tx = Pending::begin(&mut t);
        inside(&t, &mut tx, |o| o.write("/a/k", b"1")).unwrap();
        now(&mut t, |o| o.write("/b", b"x"));
        assert_eq!(tx.validate(&t), Ok(()));
        // A node created outside that the transaction also creates conflicts.
        let mut tx = Pending::begin(&mut t);
        now(&mut t, |o| o.write("/a/new", b"outside"));
        assert_eq!(inside(&t, &mut tx, |o| o.read("/a/new")), Err(XsError::NoEnt));
        inside(&t, &mut tx, |o| o.write("/a/new", b"inside")).unwrap();
        assert_eq!(tx.validate(&t), Err(XsError::Again));
    }

    /// Old versions live as long as a snapshot that needs them, no longer.
    #[test]
    fn versions_are_dropped_with_their_snapshots() {
        let mut t = Tree::default();
        now(&mut t, |o| o.write("/k", b"0"));
        now(&mut t, |o| o.write("/k", b"1"));
        assert_eq!(t.versions().kept(), 0, "no transaction open: nothing kept");
        let mut first = Pending::begin(&mut t);
        now(&mut t, |o| o.write("/k", b"2"));
        let mut second = Pending::begin(&mut t);
        now(&mut t, |o| o.write("/k", b"3"));
        now(&mut t, |o| o.write("/other", b"x"));
        assert_eq!(inside(&t, &mut first, |o| o.read("/k")), Ok(b"1".to_vec()));
        assert_eq!(inside(&t, &mut second, |o| o.read("/k")), Ok(b"2".to_vec()));
        assert_eq!(inside(&t, &mut second, |o| o.read("/other")), Err(XsError::NoEnt));
        drop(first);
        now(&mut t, |o| o.write("/k", b"4"));
        // What was replaced after `second` started stays (/k as 2 and 3,
        // / and /other's absence); /k as 1 went with `first`.
        assert_eq!(inside(&t, &mut second, |o| o.read("/k")), Ok(b"2".to_vec()));
        assert_eq!(t.versions().kept(), 4);
        drop(second);
        now(&mut t, |o| o.write("/k", b"5"));
        assert_eq!(t.versions().kept(), 0);
        let plain = Pending::default();
        assert_eq!(overlay(&t, plain).read("/k"), Ok(b"5".to_vec()));
    }

    /// A transaction held open while the store keeps changing expires
    /// rather than hold memory without bound; newer ones live on.
    #[test]
    fn old_snapshots_expire_past_the_cap() {
        let mut t = Tree::default();
        t.limit_versions(4096);
        now(&mut t, |o| o.write("/k", b"0"));
        let stale = Pending::begin(&mut t);
        for i in 0..20 {
            now(&mut t, |o| o.write("/k", format!("{i}").repeat(100).as_bytes()));
        }
        assert_eq!(stale.live(), Err(XsError::Again));
        assert_eq!(stale.validate(&t), Err(XsError::Again));
        assert!(t.versions().kept() < 20, "{}", t.versions().kept());
        let mut fresh = Pending::begin(&mut t);
        now(&mut t, |o| o.write("/k", b"new"));
        assert_eq!(fresh.live(), Ok(()));
        assert_eq!(inside(&t, &mut fresh, |o| o.read("/k")), Ok(b"19".repeat(100)));
    }
}
