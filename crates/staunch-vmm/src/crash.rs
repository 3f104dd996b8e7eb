//! Rung 2: crash re-exec (ReHype's microreboot) and hang detection.
//!
//! A fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, a stack overflow
//! on the alternate stack), a panic outside a contained region, or a handler
//! that makes no progress for too long wakes a rescuer thread spawned in
//! advance. The failing thread parks (a vCPU thread keeps serving state saves
//! for its own vCPU from inside the handler). The rescuer pauses the other
//! vCPUs, saves every vCPU and device next to the guest memory and execs a
//! fresh image of the binary, which validates the record and resumes the
//! guest around the same memfds. Guest memory is never copied.

use crate::events;
use crate::record::monotonic_ns;
use crate::vm::Core;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static RESCUE_FD: AtomicI32 = AtomicI32::new(-1);
static RESCUER_TID: AtomicI32 = AtomicI32::new(0);
static IN_CRASH: AtomicBool = AtomicBool::new(false);
/// Signal number, or one of the pseudo-causes below.
static CAUSE: AtomicI32 = AtomicI32::new(0);
static FAULT_TID: AtomicI32 = AtomicI32::new(0);
const CAUSE_PANIC: i32 = -1;
const CAUSE_HANG: i32 = -2;
static HANG_MS: AtomicU64 = AtomicU64::new(100);

/// The VM the crash path protects (replaced at every launch).
static CORE: Mutex<Option<Arc<Core>>> = Mutex::new(None);

fn park_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

const FATAL: [i32; 5] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGABRT];

fn cause_name(c: i32) -> String {
    match c {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        CAUSE_PANIC => "panic".into(),
        CAUSE_HANG => "hang".into(),
        n => format!("signal {n}"),
    }
}

/// Never returns: a vCPU thread serves its vCPU's state saves, any other
/// thread sleeps until exec replaces the process.
/// Returns only on a vCPU thread caught entering KVM_RUN: the signal
/// handler then returns, and the thread parks when the call comes back.
fn park() {
    if staunch_kvm::vcpu::park_current_thread() == staunch_kvm::vcpu::Park::Deferred {
        return;
    }
    loop {
        // SAFETY: pause(2) just sleeps until a signal.
        unsafe { libc::pause() };
    }
}

fn wake_rescuer(cause: i32) {
    CAUSE.store(cause, Ordering::SeqCst);
    // SAFETY: gettid has no preconditions.
    FAULT_TID.store(unsafe { libc::gettid() }, Ordering::SeqCst);
    let one: u64 = 1;
    let fd = RESCUE_FD.load(Ordering::SeqCst);
    // SAFETY: write(2) to our eventfd, async-signal-safe.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if sig == park_signal() {
        park();
        return;
    }
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    if me == RESCUER_TID.load(Ordering::SeqCst) && !IN_CRASH.swap(true, Ordering::SeqCst) {
        // The rescuer itself was hit while idle (it holds nothing): rescue
        // from right here rather than wait for a thread that will not come.
        CAUSE.store(sig, Ordering::SeqCst);
        FAULT_TID.store(me, Ordering::SeqCst);
        rescue();
    }
    if IN_CRASH.swap(true, Ordering::SeqCst) {
        if me == RESCUER_TID.load(Ordering::SeqCst) {
            // The rescue itself failed: nothing left to save the guest with.
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(71) };
        }
        park();
        return;
    }
    wake_rescuer(sig);
    park();
}

/// Install the signal handlers and the rescuer for this process (once), and
/// point them at `core`.
pub(crate) fn arm(core: Arc<Core>) -> std::io::Result<()> {
    if !staunch_fault::recovery_enabled() {
        return Ok(());
    }
    if let Some(ms) = core.cfg.hang_ms {
        HANG_MS.store(ms.max(1), Ordering::SeqCst);
    }
    *CORE.lock().unwrap_or_else(|p| p.into_inner()) = Some(core);
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    RESCUE_FD.store(fd, Ordering::SeqCst);
    std::thread::Builder::new().name("rescuer".into()).spawn(move || rescuer(fd))?;
    std::thread::Builder::new().name("watchdog".into()).spawn(watchdog)?;
    // SAFETY: installs handlers with a full mask on the alternate stack; the
    // signals were unblocked at start (an exec from a handler would have
    // left them blocked).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FATAL.iter().copied().chain([park_signal()]) {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        for s in FATAL.iter().copied().chain([park_signal()]) {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigfillset(&mut sa.sa_mask);
            if libc::sigaction(s, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // A panic nobody will catch takes the crash path before it unwinds (a
    // vCPU's fd must not be dropped on the way).
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if staunch_fault::in_contained_region() {
            // Contained: a microreset follows and reports it. One line, no
            // backtrace: symbolizing one would stall the guest.
            tracing::warn!("contained panic: {info}");
            return;
        }
        if CORE.lock().map(|c| c.is_some()).unwrap_or(true) {
            // Recovery first, then one line, no backtrace (symbolizing one
            // takes long enough to be taken for a hang while the guest waits).
            if !IN_CRASH.swap(true, Ordering::SeqCst) {
                wake_rescuer(CAUSE_PANIC);
            }
            tracing::error!("panic, taking the crash path: {info}");
            park();
            return;
        }
        prev(info);
    }));
    Ok(())
}

/// The VM stopped normally: the crash path has nothing left to protect.
pub(crate) fn disarm() {
    CORE.lock().unwrap_or_else(|p| p.into_inner()).take();
}

fn rescuer(fd: i32) {
    // SAFETY: gettid has no preconditions.
    RESCUER_TID.store(unsafe { libc::gettid() }, Ordering::SeqCst);
    staunch_kvm::vcpu::big_signal_stack();
    let mut buf = 0u64;
    // SAFETY: read(2) of 8 bytes from our eventfd into a u64.
    while unsafe { libc::read(fd, &mut buf as *mut u64 as *mut libc::c_void, 8) } != 8 {}
    rescue();
}

fn rescue() -> ! {
    let t0 = monotonic_ns();
    let cause = cause_name(CAUSE.load(Ordering::SeqCst));
    let Some(core) = CORE.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        // No VM to save (it had stopped): just die as the fault would have.
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(70) };
    };
    let events = core.cfg.events.clone();
    events::emit(
        events.as_deref(),
        "fault",
        json!({"component": "vmm", "fault": cause, "thread": FAULT_TID.load(Ordering::SeqCst), "rung": 2}),
    );
    // Everyone out of the guest. A vCPU stuck in a handler is made to park.
    for v in &core.vcpus {
        if !v.pause_timeout(Duration::from_millis(50)) {
            let tid = v.tid.load(Ordering::SeqCst);
            // SAFETY: tgkill to a thread of this process.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, park_signal()) };
            if !v.pause_timeout(Duration::from_millis(200)) {
                events::emit(
                    events.as_deref(),
                    "recovery-failed",
                    json!({"error": format!("vCPU {} would not stop", v.index), "outcome": "guest-lost"}),
                );
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(72) };
            }
        }
    }
    let cause = format!("crash: {cause}");
    // A ready spare takes the state over (no VM to build in the pause);
    // without one, or if it fails, this image re-executes itself.
    if let Some(spare) = core.take_spare() {
        match core.hand_over(&spare, &cause, t0, true) {
            Ok(()) => {
                let pid = spare.pid();
                let ms = (monotonic_ns() - t0) as f64 / 1e6;
                events::emit(
                    events.as_deref(),
                    "handover",
                    json!({"cause": cause, "successor_pid": pid, "paused_to_commit_ms": ms}),
                );
                crate::handover::leave(pid);
            }
            Err(e) => {
                events::emit(
                    events.as_deref(),
                    "spare-failed",
                    json!({"cause": cause, "error": e.to_string(), "fallback": "exec"}),
                );
                spare.abort(&e.to_string());
            }
        }
    }
    let err = match core.exec_successor(&cause, t0, true) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    events::emit(events.as_deref(), "recovery-failed", json!({"error": err.to_string(), "outcome": "guest-lost"}));
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(73) };
}

/// The watched thread `i`: vCPUs, then queue workers, then the saver.
fn component_name(core: &Core, i: usize) -> String {
    let (v, w) = (core.vcpus.len(), core.workers.len());
    if i < v {
        format!("vcpu{i}")
    } else if i < v + w {
        format!("worker{}", i - v)
    } else {
        "handover".into()
    }
}

/// True if the thread is in uninterruptible sleep (state `D` in
/// /proc/<tid>/stat): blocked in the kernel on I/O, not stuck in our code.
fn waiting_for_disk(tid: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces or parentheses.
    s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('D'))
}

/// True if the thread is runnable but has not had the CPU since the last
/// look (its run-queue wait grew more than its run time).
fn waiting_for_cpu(tid: i32) -> bool {
    use std::collections::HashMap;
    static SEEN: Mutex<Option<HashMap<i32, (u64, u64)>>> = Mutex::new(None);
    // /proc/<tid>/schedstat: time on CPU, time waiting on a run queue (ns).
    let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")) else { return false };
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let (run, wait) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let prev = seen.get_or_insert_with(HashMap::new).insert(tid, (run, wait));
    match prev {
        Some((r0, w0)) => wait.saturating_sub(w0) > run.saturating_sub(r0),
        None => true,
    }
}

/// Hang detection: a vCPU or queue worker busy in one exit or one batch for
/// longer than the threshold (default 100 ms) escalates to the crash path.
fn watchdog() {
    let mut last: Vec<(bool, u64, u32)> = Vec::new();
    loop {
        let period = Duration::from_millis((HANG_MS.load(Ordering::Relaxed) / 4).clamp(1, 25));
        std::thread::sleep(period);
        let Some(core) = CORE.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            last.clear();
            continue;
        };
        if IN_CRASH.load(Ordering::SeqCst) {
            continue;
        }
        let now: Vec<(bool, u64, i32)> = core
            .vcpus
            .iter()
            .map(|v| (v.busy.load(Ordering::Relaxed), v.exits.load(Ordering::Relaxed), v.tid.load(Ordering::Relaxed)))
            .chain(core.workers.iter().chain([&core.saver]).map(|w| {
                (w.busy.load(Ordering::Relaxed), w.served.load(Ordering::Relaxed), w.tid.load(Ordering::Relaxed))
            }))
            .collect();
        if last.len() != now.len() {
            last = now.iter().map(|(b, n, _)| (*b, *n, 0)).collect();
            continue;
        }
        let limit = (HANG_MS.load(Ordering::Relaxed) as u128).div_ceil(period.as_millis().max(1)) as u32;
        for (i, (busy, n, tid)) in now.iter().enumerate() {
            let (_, ln, stuck) = &mut last[i];
            if *busy && *n == *ln {
                // Runnable but not running is a busy host, and a thread in
                // the kernel waiting for the disk (a flush on a loaded host)
                // is slow storage: neither is a hang a new process would cure.
                if !waiting_for_cpu(*tid) && !waiting_for_disk(*tid) {
                    *stuck += 1;
                }
            } else {
                *stuck = 0;
            }
            *ln = *n;
            if *stuck >= limit.max(1) {
                if IN_CRASH.swap(true, Ordering::SeqCst) {
                    break;
                }
                events::emit(
                    core.cfg.events.as_deref(),
                    "hang-detected",
                    json!({"component": component_name(&core, i),
                           "stuck_ms": (*stuck as u128 * period.as_millis()) as u64, "rung": 2}),
                );
                // SAFETY: tgkill to a thread of this process; it parks.
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), *tid, park_signal()) };
                CAUSE.store(CAUSE_HANG, Ordering::SeqCst);
                let one: u64 = 1;
                // SAFETY: write(2) to our eventfd.
                unsafe { libc::write(RESCUE_FD.load(Ordering::SeqCst), &one as *const u64 as *const libc::c_void, 8) };
                break;
            }
        }
    }
}
