//! Heartbeats: one small thread per component asks it, every beat, to
//! answer within the hang threshold, over the channel it already serves
//! (the VMM's control socket, a backend's control socket, the store's own
//! protocol). The main loop reads the outcome from atomics and never
//! blocks on a component.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to ask, and where.
#[derive(Debug, Clone)]
pub enum Target {
    Vmm(PathBuf),
    Backend(PathBuf),
    Store(PathBuf),
}

/// Nanoseconds on one monotonic clock for the whole process (0: never).
pub fn now_ns() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

#[derive(Default)]
pub struct Probe {
    /// When the last answer arrived.
    pub last_ok: AtomicU64,
    /// When the first beat went unanswered since then (0: none).
    pub failing_since: AtomicU64,
    /// The process that answered last (a spare or successor that took
    /// over answers with its own pid).
    pub pid: AtomicU32,
    /// The last answer's details (the VMM's status).
    pub info: Mutex<serde_json::Value>,
    stop: AtomicBool,
}

impl Probe {
    pub fn start(target: Target, beat: Duration, hang: Duration) -> Arc<Probe> {
        let p = Arc::new(Probe::default());
        let q = p.clone();
        let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || q.run(&target, beat, hang));
        p
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Unanswered for at least `hang`, by beats that were really sent
    /// (a stall of this process or of the machine resets the count).
    pub fn silent_for(&self) -> Option<Duration> {
        let f = self.failing_since.load(Ordering::Relaxed);
        (f != 0).then(|| Duration::from_nanos(now_ns().saturating_sub(f)))
    }

    /// A backend's current request has run this long without completing,
    /// by its last answer (None: idle, or it does not say).
    pub fn stuck(&self) -> Option<Duration> {
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        info["stuck_ms"].as_u64().filter(|s| *s > 0).map(Duration::from_millis)
    }

    pub fn answered(&self) -> bool {
        self.last_ok.load(Ordering::Relaxed) != 0
    }

    fn run(&self, target: &Target, beat: Duration, hang: Duration) {
        let mut prev = now_ns();
        while !self.stop.load(Ordering::Relaxed) {
            let t0 = now_ns();
            if Duration::from_nanos(t0 - prev) > beat + hang {
                // Our sleep overran by more than the threshold: we did not
                // run, so whatever the component did meanwhile, the
                // silence is ours, not its.
                self.failing_since.store(0, Ordering::Relaxed);
            }
            match ping(target, hang) {
                Ok((pid, info)) => {
                    self.pid.store(pid, Ordering::Relaxed);
                    *self.info.lock().unwrap_or_else(|p| p.into_inner()) = info;
                    self.last_ok.store(now_ns(), Ordering::Relaxed);
                    self.failing_since.store(0, Ordering::Relaxed);
                }
                Err(_) => {
                    let _ = self.failing_since.compare_exchange(0, t0, Ordering::Relaxed, Ordering::Relaxed);
                }
            }
            prev = now_ns();
            std::thread::sleep(beat);
        }
    }
}

/// One heartbeat: the pid that answered, and what it said.
pub fn ping(target: &Target, within: Duration) -> std::io::Result<(u32, serde_json::Value)> {
    match target {
        Target::Vmm(sock) => {
            let r = staunch_vmm::api::request_within(sock, &staunch_vmm::api::ApiRequest::Status {}, within)?;
            let pid = r.data["pid"].as_u64().ok_or_else(|| std::io::Error::other("status without a pid"))?;
            Ok((pid as u32, r.data))
        }
        Target::Backend(ctl) => {
            let mut s = UnixStream::connect(ctl)?;
            s.set_read_timeout(Some(within))?;
            s.write_all(b"ping\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            let pid = line.trim().strip_prefix("pong pid=").and_then(|p| p.split_whitespace().next()?.parse().ok());
            let pid = pid.ok_or_else(|| std::io::Error::other(format!("unexpected reply {line:?}")))?;
            // Progress: `stuck_ms=S done=D` (an older backend says neither).
            let field = |k: &str| {
                line.split_whitespace().find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            Ok((pid, serde_json::json!({"stuck_ms": field("stuck_ms"), "done": field("done")})))
        }
        Target::Store(sock) => {
            use staunch_store::wire::{self, Op};
            let mut s = UnixStream::connect(sock)?;
            let pid = staunch_store::repl::peer_pid(&s)?;
            s.set_read_timeout(Some(within))?;
            s.write_all(&wire::encode(Op::Read as u32, 1, 0, b"/\0"))?;
            wire::read_msg(&mut s).map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok((pid, serde_json::Value::Null))
        }
    }
}
