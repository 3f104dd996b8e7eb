//! A backend's control socket and its hang watchdog.
//!
//! The control socket speaks one line per request: `ping` (answered
//! `pong pid=N stuck_ms=S done=D`, a supervisor's liveness and progress
//! probe: the longest a current request has run, requests completed), `failpoint SPEC` (arm
//! failpoints in the serving process, as the VMM's control socket does)
//! and `upgrade [BINARY]` (SIGUSR2's upgrade through the spare, to another
//! binary if named: a supervisor's rolling upgrade and rejuvenation).
//!
//! The watchdog looks at every queue worker: one whose current request has
//! run longer than the limit is hung (a device model stuck in a system call, an
//! injected `hang`). Nothing inside the process can unstick a thread, so
//! the process ends itself: its spare takes over, and the inflight region
//! says what was in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {err}")]
    Bind { path: String, err: std::io::Error },
}

/// Serve the control socket at `path` on a thread of its own. A stale file
/// (its process died) is replaced.
pub fn serve(path: &Path) -> Result<(), ControlError> {
    let p = path.display().to_string();
    if path.exists() && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|err| ControlError::Bind { path: p.clone(), err })?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = answer(s);
            }
        })
        .map_err(|err| ControlError::Bind { path: p, err })?;
    Ok(())
}

fn answer(s: UnixStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(s.try_clone()?).take(4096).read_line(&mut line)?;
    let reply = match line.trim().split_once(' ').unwrap_or((line.trim(), "")) {
        ("ping", _) => {
            let (stuck, done) = progress();
            format!("pong pid={} stuck_ms={} done={done}", std::process::id(), stuck.as_millis())
        }
        ("failpoint", spec) => match staunch_fault::configure(spec) {
            Ok(()) => "ok".into(),
            Err(e) => format!("error {e}"),
        },
        ("upgrade", bin) => {
            let bin = (!bin.trim().is_empty()).then(|| PathBuf::from(bin.trim()));
            match crate::process::request_upgrade(bin) {
                Ok(()) => "ok upgrading".into(),
                Err(e) => format!("error {e}"),
            }
        }
        (other, _) => format!("error unknown request '{other}' (ping, failpoint SPEC, upgrade [BINARY])"),
    };
    (&s).write_all(format!("{reply}\n").as_bytes())
}

/// When a worker's current request began (CLOCK_MONOTONIC ns; 0 when
/// idle), and how many requests it completed.
#[derive(Default)]
pub struct Busy(AtomicU64, AtomicU64);

impl Busy {
    pub fn enter(&self) {
        self.0.store(now_ns().max(1), Ordering::Relaxed);
    }
    pub fn leave(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
    /// A request went to the used ring.
    pub fn completed(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
    fn since(&self) -> Option<Duration> {
        let t = self.0.load(Ordering::Relaxed);
        (t != 0).then(|| Duration::from_nanos(now_ns().saturating_sub(t)))
    }
}

/// For a supervisor's heartbeat: how long the longest-running current
/// request has run without completing (zero when every worker is idle),
/// and the requests completed by the workers that serve now.
pub fn progress() -> (Duration, u64) {
    let Some(w) = WATCH.get() else { return (Duration::ZERO, 0) };
    let v = w.workers.lock().unwrap_or_else(|p| p.into_inner());
    let live: Vec<_> = v.iter().filter_map(|(_, b)| b.upgrade()).collect();
    let stuck = live.iter().filter_map(|b| b.since()).max().unwrap_or_default();
    (stuck, live.iter().map(|b| b.1.load(Ordering::Relaxed)).sum())
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Watch {
    workers: Mutex<Vec<(usize, std::sync::Weak<Busy>)>>,
}

static WATCH: OnceLock<Watch> = OnceLock::new();

fn workers() -> &'static Watch {
    WATCH.get_or_init(|| Watch { workers: Mutex::new(Vec::new()) })
}

/// Watch a worker's passes from now on (also one started before the
/// watchdog: a spare resumes its rings first).
pub fn watch(queue: usize, busy: &Arc<Busy>) {
    let mut v = workers().workers.lock().unwrap_or_else(|p| p.into_inner());
    v.retain(|(_, b)| b.strong_count() > 0);
    v.push((queue, Arc::downgrade(busy)));
}

/// Start the watchdog: a pass busy for longer than `limit` ends the process.
pub fn start_watchdog(limit: Duration, events: Option<PathBuf>, component: &'static str) {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return;
    }
    workers();
    let _ = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        loop {
            std::thread::sleep(limit / 8);
            let Some(w) = WATCH.get() else { return };
            let stuck = w
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(|(q, b)| Some((*q, b.upgrade()?.since()?)))
                .find(|(_, d)| *d > limit);
            if let Some((queue, d)) = stuck {
                staunch_events::emit(
                    events.as_deref(),
                    "hang-detected",
                    serde_json::json!({"component": component, "queue": queue, "stuck_ms": d.as_secs_f64() * 1e3,
                                       "action": "exit: the spare takes over"}),
                );
                // SAFETY: ending our own process; the spare and the inflight
                // region carry on.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    });
}
