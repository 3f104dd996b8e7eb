//! Named failpoints for fault injection in release builds.
//!
//! Every point is a static with an atomic action. While no point is armed a
//! check is one relaxed load of a global counter and a branch. Points are
//! armed from `STAUNCH_FAILPOINTS` at start-up or over a VM's control socket:
//! `name=action[*count]`, comma separated; `count` defaults to 1 (one-shot).
//!
//! Actions: `panic`, `error` (the call site returns an error), `hang` (the
//! thread sleeps forever), `corrupt` (the call site corrupts a named field),
//! `segv` (a real invalid memory access), `abort`, `stack-overflow`,
//! `slow` (the thread stalls for [`SLOW`], then goes on: what a loaded host
//! makes of a thread; not in the campaign's catalog), and `kill` (SIGKILL to
//! the own process: `kill -9` at exactly that point; not in the VMM
//! campaign's catalog, which injects SIGKILL from outside).
//!
//! Each firing is counted per point and reported to an optional hook before
//! the action runs, so a campaign can tell a fault that fired from one that
//! was armed but never hit.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a `slow` action stalls its thread.
pub const SLOW: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Action {
    Off = 0,
    Panic,
    Error,
    Hang,
    Corrupt,
    Segv,
    Abort,
    StackOverflow,
    Kill,
    Slow,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::Panic,
        Action::Error,
        Action::Hang,
        Action::Corrupt,
        Action::Segv,
        Action::Abort,
        Action::StackOverflow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Off => "off",
            Action::Panic => "panic",
            Action::Error => "error",
            Action::Hang => "hang",
            Action::Corrupt => "corrupt",
            Action::Segv => "segv",
            Action::Abort => "abort",
            Action::StackOverflow => "stack-overflow",
            Action::Kill => "kill",
            Action::Slow => "slow",
        }
    }

    fn from_u8(v: u8) -> Action {
        match v {
            1 => Action::Panic,
            2 => Action::Error,
            3 => Action::Hang,
            4 => Action::Corrupt,
            5 => Action::Segv,
            6 => Action::Abort,
            7 => Action::StackOverflow,
            8 => Action::Kill,
            9 => Action::Slow,
            _ => Action::Off,
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.iter().copied().chain([Action::Off, Action::Kill, Action::Slow]).find(|a| a.name() == s)
    }
}

pub struct Point {
    pub name: &'static str,
    action: AtomicU8,
    remaining: AtomicU32,
    fired: AtomicU64,
}

impl Point {
    pub const fn new(name: &'static str) -> Point {
        Point { name, action: AtomicU8::new(0), remaining: AtomicU32::new(0), fired: AtomicU64::new(0) }
    }

    /// How many times an armed action fired here in this process.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }
}

/// Called with the point and the action each time one fires, before the
/// action runs (a fatal action gives no other chance to tell).
pub type FiredHook = fn(&'static Point, Action);
static FIRED_HOOK: OnceLock<FiredHook> = OnceLock::new();

/// Install the hook (once per process; later calls are ignored).
pub fn on_fired(hook: FiredHook) {
    let _ = FIRED_HOOK.set(hook);
}

/// How many points are armed; zero keeps every check on the fast path.
static ARMED: AtomicUsize = AtomicUsize::new(0);

macro_rules! points {
    ($all:ident: $($id:ident = $name:literal: $doc:literal;)*) => {
        $( #[doc = $doc] pub static $id: Point = Point::new($name); )*
        pub static $all: &[&Point] = &[$(&$id),*];
    };
}

points! {
    // Every VMM failpoint, for listing and for campaigns.
    ALL:
    VCPU_LOOP = "vcpu.loop": "a vCPU thread's loop, between two guest entries";
    PIO_WRITE = "pio.write": "a port-I/O device's register write";
    PIO_READ = "pio.read": "a port-I/O device's register read";
    MMIO_WRITE = "mmio.write": "an MMIO device's register write";
    MMIO_READ = "mmio.read": "an MMIO device's register read";
    VIRTQ_PROCESS = "virtq.process": "virtqueue processing, after a request was taken from the ring";
    SERIAL_WRITE = "serial.write": "the UART's register write";
    RECORD_SAVE = "record.save": "saving the preserved record (corrupt: flip a byte after the CRC)";
    API_REQUEST = "api.request": "the control socket's request handler (outside any contained region)";
    API_REPLY = "api.reply": "the control socket's connection thread, about to write a reply";
}

points! {
    // The config store's points (crash-at-every-point durability tests).
    STORE:
    STORE_WAL_APPEND = "store.wal.append": "before a committed change is appended to the store's log";
    STORE_WAL_TORN = "store.wal.torn": "half of a log record written, not synced";
    STORE_WAL_SYNCED = "store.wal.synced": "a change is durable, not yet applied or acknowledged";
    STORE_TX_COMMIT = "store.tx.commit": "a transaction validated, before its log record";
    STORE_COMPACT_SNAPSHOT = "store.compact.snapshot": "a compaction's snapshot written, not yet renamed into place";
    STORE_COMPACT_RENAMED = "store.compact.renamed": "a compaction's snapshot in place, the old log not yet cut";
    STORE_REQUEST = "store.request": "a store connection's request handler";
}

points! {
    // The vhost-user backends' points (staunch blk, staunch net).
    BACKEND:
    VHOST_REQUEST = "vhost.request": "a backend took a request from the ring and marked it in flight, before serving it";
    VHOST_COMPLETED = "vhost.completed": "a backend served a request (the disk written), its used entry not yet published";
    VHOST_INFLIGHT = "vhost.inflight": "a backend published a used entry, its inflight entry not yet cleared";
    VHOST_MESSAGE = "vhost.message": "a backend handled a control message and replied, its spare not yet told";
    NET_RX = "net.rx": "a net backend read a frame into a receive buffer, the buffer not yet published (the frame dies with the process)";
    NET_TX = "net.tx": "a net backend sent a frame to the tap, its chain not yet published (it is sent again)";
}

pub fn find(name: &str) -> Option<&'static Point> {
    ALL.iter().chain(STORE.iter()).chain(BACKEND.iter()).copied().find(|p| p.name == name)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailError {
    #[error("unknown failpoint '{0}' (known: {known})", known = ALL.iter().chain(STORE.iter()).chain(BACKEND.iter()).map(|p| p.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error("unknown failpoint action '{0}'")]
    Action(String),
    #[error("bad failpoint spec '{0}': expected name=action[*count]")]
    Spec(String),
}

/// Arm `p` with `action` for the next `count` hits (0 disarms).
pub fn arm(p: &Point, action: Action, count: u32) {
    let was = p.action.swap(if count == 0 { 0 } else { action as u8 }, Ordering::SeqCst) != 0;
    p.remaining.store(count, Ordering::SeqCst);
    let now = count != 0 && action != Action::Off;
    match (was, now) {
        (false, true) => {
            ARMED.fetch_add(1, Ordering::SeqCst);
        }
        (true, false) => {
            ARMED.fetch_sub(1, Ordering::SeqCst);
        }
        _ => {}
    }
}

/// Parse a spec like `mmio.write=panic,vcpu.loop=hang*2` without arming it.
pub fn parse(spec: &str) -> Result<Vec<(&'static Point, Action, u32)>, FailError> {
    let mut items = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, act) = item.split_once('=').ok_or_else(|| FailError::Spec(item.into()))?;
        let (act, count) = match act.split_once('*') {
            Some((a, n)) => (a, n.parse().map_err(|_| FailError::Spec(item.into()))?),
            None => (act, 1),
        };
        let p = find(name).ok_or_else(|| FailError::Unknown(name.into()))?;
        let a = Action::parse(act).ok_or_else(|| FailError::Action(act.into()))?;
        items.push((p, a, count));
    }
    Ok(items)
}

/// Apply a spec like `mmio.write=panic,vcpu.loop=hang*2` (all or nothing).
pub fn configure(spec: &str) -> Result<(), FailError> {
    for (p, a, count) in parse(spec)? {
        arm(p, a, count);
    }
    Ok(())
}

/// Arm points from `STAUNCH_FAILPOINTS`, if set.
pub fn from_env() -> Result<(), FailError> {
    match std::env::var("STAUNCH_FAILPOINTS") {
        Ok(s) => configure(&s),
        Err(_) => Ok(()),
    }
}

/// The action due at `p` now, if any (consumes one of its count).
#[inline(always)]
pub fn check(p: &'static Point) -> Option<Action> {
    if ARMED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    check_slow(p)
}

#[cold]
fn check_slow(p: &'static Point) -> Option<Action> {
    let a = Action::from_u8(p.action.load(Ordering::Acquire));
    if a == Action::Off {
        return None;
    }
    let left = p.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).ok()?;
    if left == 1 {
        arm(p, Action::Off, 0);
    }
    p.fired.fetch_add(1, Ordering::Relaxed);
    if let Some(hook) = FIRED_HOOK.get() {
        hook(p, a);
    }
    Some(a)
}

/// Recovery switched off (`STAUNCH_NO_RECOVERY=1`): the baseline a fault
/// campaign compares against. Faults then take their natural course.
pub fn recovery_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STAUNCH_NO_RECOVERY").is_none_or(|v| v.is_empty() || v == "0"))
}

thread_local! {
    static CONTAINED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Marks a region whose panics are caught and recovered from (microreset).
/// A panic hook can ask [`in_contained_region`] to tell a contained panic
/// from one that will take the thread down.
pub struct ContainedRegion(());

impl ContainedRegion {
    pub fn enter() -> Self {
        CONTAINED.with(|c| c.set(c.get() + 1));
        ContainedRegion(())
    }
}

impl Drop for ContainedRegion {
    fn drop(&mut self) {
        CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

pub fn in_contained_region() -> bool {
    CONTAINED.with(|c| c.get() > 0)
}

/// The injected error of an `error` action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected(pub &'static str);

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected error at failpoint {}", self.0)
    }
}

/// Check `p` and carry out the generic actions. Returns `Err` for `error`,
/// `Ok(true)` for `corrupt` (the caller corrupts its field), `Ok(false)`
/// otherwise; the fatal actions do not return.
#[inline(always)]
pub fn hit(p: &'static Point) -> Result<bool, Injected> {
    match check(p) {
        None => Ok(false),
        Some(a) => act(p, a),
    }
}

#[cold]
fn act(p: &'static Point, a: Action) -> Result<bool, Injected> {
    match a {
        Action::Off => Ok(false),
        Action::Corrupt => Ok(true),
        Action::Error => Err(Injected(p.name)),
        Action::Panic => panic!("injected panic at failpoint {}", p.name),
        Action::Slow => {
            std::thread::sleep(SLOW);
            Ok(false)
        }
        Action::Hang => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        Action::Segv => {
            // A real invalid access, so the real fatal-signal path runs.
            let bad = std::hint::black_box(8usize) as *mut u64;
            // SAFETY: deliberately not safe: this is the injected fault.
            unsafe { bad.write_volatile(0xdead) };
            unreachable!()
        }
        Action::Abort => std::process::abort(),
        Action::Kill => {
            // SAFETY: kill(2) of ourselves; SIGKILL cannot be caught.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            loop {
                std::thread::park();
            }
        }
        Action::StackOverflow => {
            overflow(std::hint::black_box(1));
            unreachable!()
        }
    }
}

#[allow(unconditional_recursion)]
#[inline(never)]
fn overflow(n: u64) -> u64 {
    let buf = std::hint::black_box([n; 512]);
    overflow(buf[3] + 1) + buf[7]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_and_counts() {
        assert_eq!(check(&VCPU_LOOP), None);
        configure("vcpu.loop=error*2").unwrap();
        assert_eq!(hit(&VCPU_LOOP), Err(Injected("vcpu.loop")));
        assert_eq!(hit(&VCPU_LOOP), Err(Injected("vcpu.loop")));
        assert_eq!(hit(&VCPU_LOOP), Ok(false));
        configure("pio.read=corrupt").unwrap();
        assert_eq!(hit(&PIO_READ), Ok(true));
        assert_eq!(hit(&PIO_READ), Ok(false));
        assert_eq!(VCPU_LOOP.fired(), 2);
        assert_eq!(PIO_READ.fired(), 1);
    }

    #[test]
    fn bad_specs() {
        assert!(matches!(configure("nope=panic"), Err(FailError::Unknown(_))));
        assert!(matches!(configure("vcpu.loop=explode"), Err(FailError::Action(_))));
        assert!(matches!(configure("vcpu.loop"), Err(FailError::Spec(_))));
        assert!(matches!(configure("vcpu.loop=panic*x"), Err(FailError::Spec(_))));
    }

    #[test]
    fn panic_is_catchable() {
        arm(&MMIO_READ, Action::Panic, 1);
        assert!(std::panic::catch_unwind(|| hit(&MMIO_READ)).is_err());
        assert_eq!(hit(&MMIO_READ), Ok(false));
    }
}
