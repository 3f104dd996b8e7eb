//! A backend's process life: a spare that takes over when it dies, and an
//! upgrade in place.
//!
//! - **Spare.** The backend keeps a second process of itself ready: it
//!   holds the same listening socket and has its device open, and waits on
//!   a pidfd of the serving process, hearing its session's snapshots
//!   (`handoff`). When that one dies (SIGKILL, a crash, an OOM kill) the
//!   spare resumes the connection it holds a duplicate of, the rings from
//!   the inflight region, and starts a spare of its own; the frontend sees
//!   no hang-up. Where it cannot (a death inside a control message), it
//!   lets the connection go and accepts the frontend's reconnect from the
//!   socket's backlog.
//! - **Upgrade.** SIGUSR2 makes the serving process finish what it has
//!   taken from the rings, close its connection and exec the binary now
//!   installed at the path it was started from (a package upgrade replaces
//!   that file), keeping the listening socket: the frontend reconnects into
//!   the backlog and the new image serves it.

use crate::backend::{self, Device, Options, Standby};
use crate::handoff;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("{what}: {err}")]
    Io { what: &'static str, err: std::io::Error },
    #[error("exec {path}: {err}")]
    Exec { path: String, err: std::io::Error },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ProcessError {
    move |err| ProcessError::Io { what, err }
}

/// How this process came to serve.
pub struct Role {
    /// A listening socket inherited from a predecessor (upgrade) or the
    /// process a spare stands in for.
    pub listen_fd: Option<RawFd>,
    /// Serve only once this process has died (a spare).
    pub spare_of: Option<u32>,
    /// A spare's end of the channel its serving process describes its
    /// connection on (`handoff`).
    pub handoff_fd: Option<RawFd>,
    /// Keep a spare (off for the spare's own spare-less tests and peers).
    pub spare: bool,
    /// This image's command line after the subcommand's own role flags,
    /// reused for spares and upgrades.
    pub args: Vec<String>,
    /// The subcommand (`blk`).
    pub command: &'static str,
    /// The control socket (ping, failpoints), served by whichever process
    /// serves the device.
    pub control: Option<PathBuf>,
    /// A queue worker busy for longer than this is hung: the process ends
    /// and its spare takes over.
    pub hang_limit: Duration,
}

static UPGRADE_FD: AtomicI32 = AtomicI32::new(-1);

/// The binary an upgrade asked for over the control socket (None: the
/// file now at our own path).
static UPGRADE_BIN: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

fn upgrade_bin(own: &Path) -> PathBuf {
    UPGRADE_BIN.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| own.to_path_buf())
}

/// Upgrade the serving process, as SIGUSR2 does, to `binary` (or to the
/// file now at its own path): a fresh spare from that file takes the
/// session over. Refused before anything changes if the file cannot be
/// executed.
pub fn request_upgrade(binary: Option<PathBuf>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(b) = &binary {
        let m = std::fs::metadata(b).map_err(|e| format!("{}: {e}", b.display()))?;
        if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not an executable file", b.display()));
        }
    }
    let fd = UPGRADE_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return Err("not serving yet".into());
    }
    *UPGRADE_BIN.lock().unwrap_or_else(|p| p.into_inner()) = binary;
    on_usr2(0);
    Ok(())
}

extern "C" fn on_usr2(_: libc::c_int) {
    let fd = UPGRADE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; 8 bytes to an eventfd.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<std::fs::File> {
    // SAFETY: a plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as RawFd) })
}

/// Block until process `pid` has exited (immediately if it is gone).
fn wait_exit(pid: u32) {
    let Ok(pfd) = pidfd_open(pid) else { return };
    loop {
        let mut p = libc::pollfd { fd: pfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, -1) } > 0 {
            return;
        }
    }
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The binary to start spares and upgrades from: the path this image was
/// started from (so an upgrade picks up a new file installed there).
fn own_path() -> PathBuf {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| if p.components().count() > 1 { std::fs::canonicalize(&p).ok() } else { None })
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

fn role_args(role: &Role, fd: RawFd, spare_of: Option<u32>) -> Vec<String> {
    let mut a = vec![role.command.to_string()];
    a.extend(role.args.iter().cloned());
    a.push("--listen-fd".into());
    a.push(fd.to_string());
    if let Some(p) = spare_of {
        a.push("--spare-of".into());
        a.push(p.to_string());
    }
    a
}

/// What the spare-keeping thread needs.
struct Keeper {
    bin: PathBuf,
    args: Vec<String>,
    /// The listening socket, inherited by every spare.
    fd: RawFd,
    device_fds: Vec<RawFd>,
    events: Option<PathBuf>,
    sink: Option<Arc<handoff::Sink>>,
    stop: Arc<EventFd>,
    /// Replace the spare by a fresh one (from the file now at `bin`).
    renew: Arc<EventFd>,
    first: std::sync::mpsc::Sender<()>,
    spare_of_gone: bool,
}

/// Keep a spare of this process running until told to stop.
fn keep_spare(k: Keeper) {
    let mut backoff = Duration::from_millis(10);
    if k.spare_of_gone {
        // Leave the cores to the frontend's reconnect for a moment.
        std::thread::sleep(Duration::from_millis(20));
    }
    loop {
        let mut cmd = std::process::Command::new(upgrade_bin(&k.bin));
        cmd.args(&k.args).env_remove("STAUNCH_FAILPOINTS").stdin(std::process::Stdio::null());
        // The spare's channel: ours stays close-on-exec, its end is passed.
        let chan = match k.sink.as_ref().map(|_| handoff::pair()).transpose() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "handoff channel");
                None
            }
        };
        let theirs = chan.as_ref().map(|(_, t)| t.as_raw_fd());
        if let Some(t) = theirs {
            cmd.args(["--handoff-fd".to_string(), t.to_string()]);
        }
        let (fd, device_fds) = (k.fd, k.device_fds.clone());
        // SAFETY: only async-signal-safe fcntl between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                clear_cloexec(fd)?;
                for &d in &device_fds {
                    clear_cloexec(d)?;
                }
                theirs.map_or(Ok(()), clear_cloexec)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "spare backend did not start");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let pid = child.id();
        if let (Some(sink), Some((ours, theirs))) = (&k.sink, chan) {
            drop(theirs);
            sink.attach(ours);
        }
        // From here a death of ours is covered: the spare takes over even
        // if it has not reached its wait yet (its pidfd_open then fails).
        let _ = k.first.send(());
        // Wait for the spare's exit, our stop or a renewal.
        let Ok(pfd) = pidfd_open(pid) else { return };
        let mut fds = [
            libc::pollfd { fd: pfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: k.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: k.renew.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: three valid pollfd entries.
            if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } > 0 {
                break;
            }
        }
        if fds[1].revents != 0 || fds[2].revents != 0 {
            let _ = child.kill();
            let _ = child.wait();
            if fds[1].revents != 0 {
                return;
            }
            let _ = k.renew.read();
            continue;
        }
        let status = child.wait().ok().and_then(|s| s.code());
        staunch_events::emit(
            k.events.as_deref(),
            "spare-lost",
            serde_json::json!({"pid": pid, "status": status, "restart_in_ms": backoff.as_millis() as u64}),
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Serve `device` on `socket` for the rest of the process's life, as
/// `role` says: bind (or inherit) the socket, wait as a spare if one,
/// keep a spare, and exec the upgraded binary on SIGUSR2.
pub fn run(
    socket: &Path,
    device: Arc<dyn Device>,
    mut opts: Options,
    role: Role,
) -> Result<std::convert::Infallible, ProcessError> {
    // A panic a queue worker contains gets one line and no backtrace:
    // symbolizing one would stall the guest's I/O for hundreds of ms.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if staunch_fault::in_contained_region() {
            tracing::warn!("contained panic: {info}");
            eprintln!("staunch: contained panic: {info}");
        } else {
            prev(info);
        }
    }));
    let listener = match role.listen_fd {
        // SAFETY: the predecessor or the primary passed this listening
        // socket across exec and named its number; we take it over once.
        Some(fd) => unsafe { UnixListener::from_raw_fd(fd) },
        None => backend::bind(socket)?,
    };
    let ev = opts.events.as_deref();
    let name = device.name();
    let mut resumed = None;
    if let Some(pid) = role.spare_of {
        // SAFETY: our keeper passed this channel end across exec and named
        // its number; we take it over once.
        let chan = role.handoff_fd.map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let (d, o) = (device.clone(), opts.clone());
        let listening = chan.map(|c| {
            std::thread::spawn(move || {
                let mut standby = Standby::new(d, o);
                let heard = handoff::listen(c, |s, f| standby.apply(s, f));
                (standby, heard)
            })
        });
        staunch_events::emit(ev, "spare-ready", serde_json::json!({"component": name, "of": pid}));
        let t = std::time::Instant::now();
        wait_exit(pid);
        let woke = t.elapsed();
        let heard = listening.map(|l| l.join());
        let upgraded = matches!(&heard, Some(Ok((_, h))) if h.upgrade);
        let (connection, why) = match heard {
            None => ("none", None),
            Some(Err(_)) => ("dropped", Some("the handoff listener panicked".to_string())),
            Some(Ok((_, h))) if h.busy => ("dropped", Some("it died handling a control message".into())),
            Some(Ok((_, h))) if h.state.is_none() => ("none", None),
            Some(Ok((standby, h))) => {
                let (snap, files) = h.state.expect("checked above");
                match standby.resume(snap, files) {
                    Ok(r) => {
                        resumed = Some(r);
                        ("kept", None)
                    }
                    Err(e) => ("dropped", Some(e)),
                }
            }
        };
        // A dropped connection was closed with the standby: the frontend
        // sees the hang-up and reconnects into our listening socket.
        staunch_events::emit(
            ev,
            "backend-takeover",
            serde_json::json!({"component": name, "from": pid, "woke_us": woke.as_micros() as u64,
                               "connection": connection, "why": why, "upgraded": upgraded,
                               "resumed_us": (t.elapsed() - woke).as_micros() as u64}),
        );
    } else {
        staunch_events::emit(
            ev,
            "backend-ready",
            serde_json::json!({"component": name, "socket": socket, "upgraded": role.listen_fd.is_some()}),
        );
    }
    if let Some(c) = &role.control {
        crate::control::serve(c)
            .map_err(|e| ProcessError::Io { what: "control socket", err: std::io::Error::other(e) })?;
    }
    crate::control::start_watchdog(role.hang_limit, opts.events.clone(), name);
    let upgrade = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io("eventfd"))?;
    UPGRADE_FD.store(upgrade.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: installing a handler that only writes to an eventfd.
    unsafe { libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t) };
    let fd = listener.as_raw_fd();
    let bin = own_path();
    let stop_spare = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io("eventfd"))?);
    let (spawned, first) = std::sync::mpsc::channel();
    let took_over = role.spare_of.is_some();
    let sink = role.spare.then(|| Arc::new(handoff::Sink::default()));
    opts.handoff = sink.clone();
    let device_fds = device.inherited_fds();
    let renew = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io("eventfd"))?);
    let spare = role.spare.then(|| {
        let k = Keeper {
            bin: bin.clone(),
            args: role_args(&role, fd, Some(std::process::id())),
            fd,
            device_fds: device_fds.clone(),
            events: opts.events.clone(),
            sink: sink.clone(),
            stop: stop_spare.clone(),
            renew: renew.clone(),
            first: spawned,
            spare_of_gone: took_over,
        };
        std::thread::Builder::new().name("spare".into()).spawn(move || keep_spare(k))
    });
    if role.spare && role.spare_of.is_none() {
        // A fresh backend serves only once a spare exists: a death right
        // after start is then covered too. A spare that just took over
        // serves at once (a frontend is waiting) and starts its own spare
        // meanwhile.
        let _ = first.recv_timeout(Duration::from_secs(2));
    }
    let live = backend::serve_from(&listener, device, &opts, &upgrade, resumed);
    let bin = upgrade_bin(&bin);
    // Upgrade. Through the spare: a fresh one, started from the file now
    // at our path, gets the session; we stop the rings (nothing stays in
    // flight), keep the connection open and exit, and it takes over with
    // the frontend never seeing a hang-up.
    if let (Some(sink), Some(Ok(_))) = (&sink, &spare) {
        let n = sink.attached();
        let _ = renew.write(1);
        if sink.wait_ready(n, Duration::from_secs(10)) {
            staunch_events::emit(
                ev,
                "backend-upgrade",
                serde_json::json!({"component": name, "binary": bin, "via": "spare"}),
            );
            if let Some(l) = live {
                l.park();
            }
            sink.upgrade();
            std::process::exit(0);
        }
        tracing::warn!("no upgraded spare became ready: upgrading in place");
    }
    // In place (no spare): the connection ends, the frontend reconnects to
    // the new image. The spare goes first (it would take over when we exec).
    if let Some(l) = live {
        l.end();
    }
    let _ = stop_spare.write(1);
    if let Some(Ok(t)) = spare {
        let _ = t.join();
    }
    staunch_events::emit(ev, "backend-upgrade", serde_json::json!({"component": name, "binary": bin, "via": "exec"}));
    clear_cloexec(fd).map_err(io("listening socket"))?;
    for d in device_fds {
        clear_cloexec(d).map_err(io("device descriptor"))?;
    }
    let fd = listener.into_raw_fd();
    let err = std::process::Command::new(&bin).args(role_args(&role, fd, None)).env_remove("STAUNCH_FAILPOINTS").exec();
    Err(ProcessError::Exec { path: bin.display().to_string(), err })
}
