//! XenStore's data model: a tree of paths with byte values, per-node
//! permissions, generation numbers for optimistic transactions, and quotas.
//!
//! Every operation runs against an [`Overlay`] over the committed tree and
//! yields a change set. The server persists a change set before it applies
//! it, so memory never runs ahead of the log, and a transaction is just an
//! overlay kept across requests, reading a snapshot of the tree (see
//! [`crate::txn`]) and validated against the tree at commit.

use crate::txn::{Pending, Snapshot, Versions};
use crate::wire::{ABS_PATH_MAX, XsError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One permission entry: `n` none, `r` read, `w` write, `b` both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Perm {
    pub dom: u32,
    pub read: bool,
    pub write: bool,
}

impl Perm {
    pub fn parse(s: &str) -> Result<Perm, XsError> {
        let (c, dom) = s.split_at_checked(1).ok_or(XsError::Inval)?;
        let (read, write) = match c {
            "n" => (false, false),
            "r" => (true, false),
            "w" => (false, true),
            "b" => (true, true),
            _ => return Err(XsError::Inval),
        };
        Ok(Perm { dom: dom.parse().map_err(|_| XsError::Inval)?, read, write })
    }

    pub fn render(&self) -> String {
        let c = match (self.read, self.write) {
            (false, false) => 'n',
            (true, false) => 'r',
            (false, true) => 'w',
            (true, true) => 'b',
        };
        format!("{c}{}", self.dom)
    }
}

/// A node. `perms[0]` names the owner and the access of every domain not
/// listed after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Perm>,
    pub children: BTreeSet<String>,
    /// The tree generation that last changed this node.
    pub generation: u64,
    /// Checksum of this node's path and content, set when the node is
    /// committed; a scrub recomputes it (R-VMM's sanity check).
    #[serde(default)]
    pub sum: u64,
}

/// FNV-1a over a node's path and content (not its `sum`).
pub fn node_sum(path: &str, n: &Node) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(path.as_bytes());
    eat(&[0xff]);
    eat(&(n.value.len() as u64).to_le_bytes());
    eat(&n.value);
    for p in &n.perms {
        eat(&p.dom.to_le_bytes());
        eat(&[p.read as u8, p.write as u8]);
    }
    for c in &n.children {
        eat(c.as_bytes());
        eat(&[0]);
    }
    eat(&n.generation.to_le_bytes());
    h
}

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Scrub {
    pub nodes: usize,
    /// Nodes whose content no longer matches their checksum.
    pub bad: Vec<String>,
    /// The sum of the nodes' checksums matches the tree's running hash.
    pub hash_ok: bool,
    pub hash: u64,
    /// The sum of the checksums recomputed from the nodes' content: equal
    /// to `hash` in a sound tree, and comparable across copies.
    pub recomputed: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub nodes_per_domain: usize,
    pub value_bytes: usize,
    pub watches_per_conn: usize,
    pub transactions_per_conn: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        // cxenstored's defaults.
        Quotas { nodes_per_domain: 1000, value_bytes: 2048, watches_per_conn: 128, transactions_per_conn: 10 }
    }
}

/// Who asks: a domain id; domain 0 is privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub dom: u32,
}

impl Caller {
    pub fn privileged(&self) -> bool {
        self.dom == 0
    }

    fn can(&self, node: &Node, write: bool) -> bool {
        if self.privileged() || node.perms.first().is_some_and(|p| p.dom == self.dom) {
            return true;
        }
        let p = node.perms.iter().skip(1).find(|p| p.dom == self.dom).or(node.perms.first());
        p.is_some_and(|p| if write { p.write } else { p.read })
    }

    /// Resolve a request's path: absolute, or relative to the domain's home.
    pub fn path(&self, p: &str) -> Result<String, XsError> {
        let abs = if p.starts_with('/') { p.to_string() } else { format!("{}/{p}", home(self.dom)) };
        valid_path(&abs)?;
        Ok(abs)
    }
}

pub fn home(dom: u32) -> String {
    format!("/local/domain/{dom}")
}

/// XenStore's path rules: absolute, `[A-Za-z0-9_@-]` components separated by
/// single slashes, no trailing slash, bounded length.
pub fn valid_path(p: &str) -> Result<(), XsError> {
    if p == "/" {
        return Ok(());
    }
    let ok = p.len() <= ABS_PATH_MAX
        && p.starts_with('/')
        && !p.ends_with('/')
        && !p.contains("//")
        && p.bytes().all(|c| c.is_ascii_alphanumeric() || b"/_-@".contains(&c));
    if ok { Ok(()) } else { Err(XsError::Inval) }
}

fn parent(p: &str) -> Option<&str> {
    match p.rfind('/') {
        Some(0) if p.len() > 1 => Some("/"),
        Some(0) | None => None,
        Some(i) => Some(&p[..i]),
    }
}

fn base(p: &str) -> &str {
    &p[p.rfind('/').map_or(0, |i| i + 1)..]
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

/// A fast hasher for the path map (paths are short; SipHash dominated
/// start-up with 100k nodes). Seeded per process, so collisions cannot be
/// precomputed by a client.
#[derive(Clone, Copy)]
pub struct PathHasher(u64);

impl std::hash::Hasher for PathHasher {
    fn write(&mut self, b: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &x in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ x as u64).wrapping_mul(K);
        }
    }
    fn finish(&self) -> u64 {
        // A final avalanche, so low bits depend on every byte.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

#[derive(Clone, Copy)]
pub struct PathHash(u64);

impl Default for PathHash {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        PathHash(*SEED.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id() as u64);
            h.finish()
        }))
    }
}

impl std::hash::BuildHasher for PathHash {
    type Hasher = PathHasher;
    fn build_hasher(&self) -> PathHasher {
        PathHasher(self.0)
    }
}

pub type PathMap<V> = HashMap<String, V, PathHash>;

/// The path map, split in a fixed number of shards by a stable hash of the
/// path, so a snapshot's shards decode in parallel at start-up.
pub const SHARDS: usize = 4;

#[derive(Debug, Clone)]
pub struct Shards(pub Vec<PathMap<Node>>);

impl Shards {
    fn new() -> Self {
        Shards((0..SHARDS).map(|_| PathMap::default()).collect())
    }

    /// Which shard holds `p` (the same in every process).
    pub fn of(p: &str) -> usize {
        let mut h: u32 = 0x811c_9dc5;
        for &b in p.as_bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        h as usize % SHARDS
    }

    fn get(&self, p: &str) -> Option<&Node> {
        self.0[Self::of(p)].get(p)
    }

    fn get_mut(&mut self, p: &str) -> Option<&mut Node> {
        self.0[Self::of(p)].get_mut(p)
    }

    fn insert(&mut self, p: String, n: Node) -> Option<Node> {
        self.0[Self::of(&p)].insert(p, n)
    }

    fn remove(&mut self, p: &str) -> Option<Node> {
        self.0[Self::of(p)].remove(p)
    }

    fn len(&self) -> usize {
        self.0.iter().map(|m| m.len()).sum()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.0.iter().flat_map(|m| m.iter())
    }
}

/// A change set: each path's new node, or `None` for removed.
pub type Changes = BTreeMap<String, Option<Node>>;

/// The committed tree.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Shards,
    pub generation: u64,
    owned: HashMap<u32, usize>,
    /// Running hash of the tree: the wrapping sum of every node's checksum.
    pub hash: u64,
    /// Nodes replaced while transactions that may read them are open.
    versions: Versions,
}

impl Default for Tree {
    fn default() -> Self {
        let root = Node {
            value: Vec::new(),
            perms: vec![Perm { dom: 0, read: false, write: false }],
            children: BTreeSet::new(),
            generation: 0,
            sum: 0,
        };
        let mut t =
            Tree { nodes: Shards::new(), generation: 0, owned: HashMap::new(), hash: 0, versions: Versions::default() };
        t.insert("/".into(), root);
        t
    }
}

impl Tree {
    pub fn get(&self, p: &str) -> Option<&Node> {
        self.nodes.get(p)
    }

    /// The node at `p` as `snap` sees it (`None`: as it is now).
    pub fn get_at(&self, p: &str, snap: Option<&Snapshot>) -> Option<&Node> {
        match snap.and_then(|s| self.versions.at(p, s.generation())) {
            Some(then) => then,
            None => self.nodes.get(p),
        }
    }

    /// A snapshot of the tree as it is now, for a transaction.
    pub fn begin(&mut self) -> Snapshot {
        self.versions.begin(self.generation)
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Bound the old versions kept for open transactions (bytes).
    pub fn limit_versions(&mut self, bytes: usize) {
        self.versions.cap = bytes;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    fn insert(&mut self, p: String, mut n: Node) -> Option<Node> {
        n.sum = node_sum(&p, &n);
        self.hash = self.hash.wrapping_add(n.sum);
        if let Some(o) = n.perms.first() {
            *self.owned.entry(o.dom).or_default() += 1;
        }
        let old = self.nodes.insert(p, n);
        if let Some(old) = &old {
            self.disown(old);
        }
        old
    }

    fn disown(&mut self, n: &Node) {
        self.hash = self.hash.wrapping_sub(n.sum);
        if let Some(o) = n.perms.first()
            && let Some(c) = self.owned.get_mut(&o.dom)
        {
            *c = c.saturating_sub(1);
        }
    }

    /// Apply a persisted change set; each changed node gets the new
    /// generation, and the node it replaces is kept if an open transaction
    /// may read it.
    pub fn apply(&mut self, changes: &Changes) {
        self.generation += 1;
        let keep = self.versions.prune();
        for (p, n) in changes {
            let old = match n {
                Some(n) => {
                    let mut n = n.clone();
                    n.generation = self.generation;
                    self.insert(p.clone(), n)
                }
                None => {
                    let old = self.nodes.remove(p);
                    if let Some(old) = &old {
                        self.disown(old);
                    }
                    old
                }
            };
            if keep {
                self.versions.keep(p, self.generation, old);
            }
        }
    }

    /// Verify every node against its checksum and the running hash.
    pub fn scrub(&self) -> Scrub {
        let (mut bad, mut total, mut recomputed) = (Vec::new(), 0u64, 0u64);
        for (p, n) in self.nodes.iter() {
            let sum = node_sum(p, n);
            if sum != n.sum {
                bad.push(p.clone());
            }
            total = total.wrapping_add(n.sum);
            recomputed = recomputed.wrapping_add(sum);
        }
        bad.sort();
        Scrub { nodes: self.nodes.len(), bad, hash_ok: total == self.hash, hash: self.hash, recomputed }
    }

    /// Put back a node from a healthy copy (same path, verified content).
    pub fn repair(&mut self, p: &str, good: &Node) {
        self.insert(p.to_string(), good.clone());
    }

    /// Fault injection: flip a byte of a node's value behind its checksum's
    /// back (as a wild write or a bit flip would).
    pub fn corrupt(&mut self, p: &str) -> bool {
        match self.nodes.get_mut(p) {
            Some(n) => {
                match n.value.first_mut() {
                    Some(b) => *b ^= 0x20,
                    None => n.value.push(b'!'),
                }
                true
            }
            None => false,
        }
    }

    /// The parts a snapshot stores.
    pub fn parts(&self) -> (&Shards, &HashMap<u32, usize>) {
        (&self.nodes, &self.owned)
    }

    /// Rebuild from a snapshot's parts as they are: the snapshot's CRC
    /// vouches for them, and scrubs verify every node's checksum later.
    pub fn from_parts(nodes: Shards, owned: HashMap<u32, usize>, generation: u64, hash: u64) -> Tree {
        if nodes.0.len() != SHARDS || nodes.len() == 0 {
            return Tree::default();
        }
        Tree { nodes, generation, owned, hash, versions: Versions::default() }
    }
}

/// Operations over the committed tree plus pending changes.
pub struct Overlay<'a> {
    pub tree: &'a Tree,
    pub pending: Pending,
    pub quotas: Quotas,
    pub caller: Caller,
}

impl Overlay<'_> {
    fn get(&mut self, p: &str) -> Option<Node> {
        if let Some(w) = self.pending.writes.get(p) {
            return w.clone();
        }
        let n = self.tree.get_at(p, self.pending.snapshot.as_ref());
        self.pending.reads.entry(p.to_string()).or_insert(n.map(|n| n.generation));
        n.cloned()
    }

    fn put(&mut self, p: &str, n: Option<Node>) {
        self.pending.writes.insert(p.to_string(), n);
    }

    fn readable(&mut self, p: &str) -> Result<Node, XsError> {
        let n = self.get(p).ok_or(XsError::NoEnt)?;
        if self.caller.can(&n, false) { Ok(n) } else { Err(XsError::Acces) }
    }

    pub fn read(&mut self, p: &str) -> Result<Vec<u8>, XsError> {
        Ok(self.readable(p)?.value)
    }

    pub fn directory(&mut self, p: &str) -> Result<Vec<String>, XsError> {
        Ok(self.readable(p)?.children.into_iter().collect())
    }

    /// Children and the node's generation (for XS_DIRECTORY_PART).
    pub fn directory_gen(&mut self, p: &str) -> Result<(u64, Vec<String>), XsError> {
        let n = self.readable(p)?;
        Ok((n.generation, n.children.into_iter().collect()))
    }

    pub fn get_perms(&mut self, p: &str) -> Result<Vec<Perm>, XsError> {
        Ok(self.readable(p)?.perms)
    }

    /// The node at `p`, created (with any missing ancestors) if need be.
    fn ensure(&mut self, p: &str) -> Result<Node, XsError> {
        if let Some(n) = self.get(p) {
            return Ok(n);
        }
        let dir = parent(p).ok_or(XsError::Inval)?;
        let mut up = self.ensure(dir)?;
        if !self.caller.can(&up, true) {
            return Err(XsError::Acces);
        }
        if !self.caller.privileged() {
            let have = self.tree.owned.get(&self.caller.dom).copied().unwrap_or(0);
            let made = self.pending.created.entry(self.caller.dom).or_default();
            if have + *made >= self.quotas.nodes_per_domain {
                return Err(XsError::Quota);
            }
            *made += 1;
        }
        // New nodes inherit the parent's permissions; an unprivileged
        // domain owns what it creates.
        let mut perms = up.perms.clone();
        if !self.caller.privileged()
            && let Some(o) = perms.first_mut()
        {
            o.dom = self.caller.dom;
        }
        let n = Node { value: Vec::new(), perms, children: BTreeSet::new(), generation: 0, sum: 0 };
        up.children.insert(base(p).to_string());
        self.put(dir, Some(up));
        self.put(p, Some(n.clone()));
        Ok(n)
    }

    pub fn write(&mut self, p: &str, value: &[u8]) -> Result<(), XsError> {
        if !self.caller.privileged() && value.len() > self.quotas.value_bytes {
            return Err(XsError::TooBig);
        }
        let mut n = self.ensure(p)?;
        if !self.caller.can(&n, true) {
            return Err(XsError::Acces);
        }
        n.value = value.to_vec();
        self.put(p, Some(n));
        self.pending.targets.insert(p.to_string());
        Ok(())
    }

    pub fn mkdir(&mut self, p: &str) -> Result<(), XsError> {
        let existed = self.get(p).is_some();
        self.ensure(p)?;
        if !existed {
            self.pending.targets.insert(p.to_string());
        }
        Ok(())
    }

    pub fn rm(&mut self, p: &str) -> Result<(), XsError> {
        if p == "/" {
            return Err(XsError::Inval);
        }
        let Some(n) = self.get(p) else {
            // Like xenstored: removing a missing node whose parent exists
            // is not an error.
            let dir = parent(p).ok_or(XsError::Inval)?;
            return if self.get(dir).is_some() { Ok(()) } else { Err(XsError::NoEnt) };
        };
        if !self.caller.can(&n, true) {
            return Err(XsError::Acces);
        }
        let dir = parent(p).ok_or(XsError::Inval)?;
        let mut up = self.get(dir).ok_or(XsError::NoEnt)?;
        up.children.remove(base(p));
        self.put(dir, Some(up));
        self.remove_subtree(p, n);
        self.pending.targets.insert(p.to_string());
        self.pending.removed.insert(p.to_string());
        Ok(())
    }

    fn remove_subtree(&mut self, p: &str, n: Node) {
        for c in &n.children {
            let cp = join(p, c);
            if let Some(cn) = self.get(&cp) {
                self.remove_subtree(&cp, cn);
            }
        }
        self.put(p, None);
    }

    pub fn set_perms(&mut self, p: &str, perms: Vec<Perm>) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::Inval);
        }
        let mut n = self.get(p).ok_or(XsError::NoEnt)?;
        let owner = n.perms.first().is_some_and(|o| o.dom == self.caller.dom);
        if !(self.caller.privileged() || owner) {
            return Err(XsError::Acces);
        }
        n.perms = perms;
        self.put(p, Some(n));
        self.pending.targets.insert(p.to_string());
        Ok(())
    }
}

/// Paths a watch on `watch` fires for, given a change to `changed`:
/// the path itself and everything below it.
pub fn watch_matches(watch: &str, changed: &str) -> bool {
    watch == "/"
        || changed == watch
        || (changed.starts_with(watch) && changed.as_bytes().get(watch.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<R>(t: &mut Tree, dom: u32, f: impl FnOnce(&mut Overlay) -> Result<R, XsError>) -> Result<R, XsError> {
        let mut o = Overlay { tree: t, pending: Pending::default(), quotas: Quotas::default(), caller: Caller { dom } };
        let r = f(&mut o)?;
        let w = o.pending.writes;
        t.apply(&w);
        Ok(r)
    }

    #[test]
    fn write_read_directory_rm() {
        let mut t = Tree::default();
        run(&mut t, 0, |o| o.write("/a/b/c", b"v")).unwrap();
        assert_eq!(run(&mut t, 0, |o| o.read("/a/b/c")).unwrap(), b"v");
        assert_eq!(run(&mut t, 0, |o| o.directory("/a")).unwrap(), vec!["b"]);
        assert_eq!(run(&mut t, 0, |o| o.read("/a/b")).unwrap(), b"");
        run(&mut t, 0, |o| o.rm("/a/b")).unwrap();
        assert_eq!(run(&mut t, 0, |o| o.read("/a/b/c")), Err(XsError::NoEnt));
        assert_eq!(run(&mut t, 0, |o| o.directory("/a")).unwrap(), Vec::<String>::new());
        run(&mut t, 0, |o| o.rm("/a/missing")).unwrap();
        assert_eq!(run(&mut t, 0, |o| o.rm("/x/y")), Err(XsError::NoEnt));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn scrub_finds_corruption_and_repair_fixes_it() {
        let mut t = Tree::default();
        run(&mut t, 0, |o| o.write("/a/b", b"hello")).unwrap();
        let clean = t.scrub();
        assert!(clean.bad.is_empty() && clean.hash_ok);
        let good = t.get("/a/b").unwrap().clone();
        assert!(t.corrupt("/a/b"));
        assert_eq!(t.scrub().bad, vec!["/a/b".to_string()]);
        t.repair("/a/b", &good);
        assert_eq!(t.scrub(), clean);
    }

    #[test]
    fn permissions_and_quota() {
        let mut t = Tree::default();
        run(&mut t, 0, |o| o.write("/vm/5/name", b"five")).unwrap();
        assert_eq!(run(&mut t, 5, |o| o.read("/vm/5/name")), Err(XsError::Acces));
        let perms = vec![Perm::parse("n0").unwrap(), Perm::parse("r5").unwrap()];
        run(&mut t, 0, |o| o.set_perms("/vm/5/name", perms)).unwrap();
        assert_eq!(run(&mut t, 5, |o| o.read("/vm/5/name")).unwrap(), b"five");
        assert_eq!(run(&mut t, 5, |o| o.write("/vm/5/name", b"x")), Err(XsError::Acces));
        assert_eq!(run(&mut t, 6, |o| o.read("/vm/5/name")), Err(XsError::Acces));
        // A domain's own home: it owns what it creates there, up to its quota.
        run(&mut t, 0, |o| o.mkdir("/local/domain/7")).unwrap();
        run(&mut t, 0, |o| o.set_perms("/local/domain/7", vec![Perm::parse("n7").unwrap()])).unwrap();
        let q = Quotas { nodes_per_domain: 3, ..Quotas::default() };
        let mut o = Overlay { tree: &t, pending: Pending::default(), quotas: q, caller: Caller { dom: 7 } };
        o.write("/local/domain/7/a", b"1").unwrap();
        o.write("/local/domain/7/b", b"1").unwrap();
        assert_eq!(o.write("/local/domain/7/c", b"1"), Err(XsError::Quota));
        assert_eq!(o.write("/local/domain/7/a", &[0; 3000]), Err(XsError::TooBig));
        assert_eq!(Perm::parse("x1"), Err(XsError::Inval));
        assert_eq!(Perm::parse("b12").unwrap().render(), "b12");
    }

    #[test]
    fn conflicting_transactions() {
        let mut t = Tree::default();
        run(&mut t, 0, |o| o.write("/k", b"0")).unwrap();
        let mut a =
            Overlay { tree: &t, pending: Pending::default(), quotas: Quotas::default(), caller: Caller { dom: 0 } };
        a.read("/k").unwrap();
        a.write("/k", b"a").unwrap();
        let a = a.pending;
        run(&mut t, 0, |o| o.write("/k", b"b")).unwrap();
        assert_eq!(a.validate(&t), Err(XsError::Again));
    }

    #[test]
    fn paths() {
        for ok in ["/", "/a", "/a-b/c_d/@x/9"] {
            assert!(valid_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "/a/", "//a", "/a b", "/a/../b", "/\u{e9}"] {
            assert!(valid_path(bad).is_err(), "{bad}");
        }
        assert_eq!(Caller { dom: 3 }.path("x/y").unwrap(), "/local/domain/3/x/y");
        assert!(watch_matches("/a", "/a/b") && watch_matches("/a", "/a") && !watch_matches("/a", "/ab"));
    }
}
