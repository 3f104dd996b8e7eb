//! Warm upgrade through a standby successor (RootHammer's warm reboot with
//! the expensive part moved out of the pause).
//!
//! A KVM VM belongs to the process that created it, and the first memory
//! slot of a new VM costs several milliseconds. So instead of exec'ing and
//! then building the new VM inside the guest's pause, the running VMM starts
//! its successor first. The successor maps the same guest-memory memfds,
//! creates its VM, memory slots and vCPUs while the guest still runs, and
//! says `Ready`. Only then does the old VMM pause the guest and send the
//! state record (plus the disk and console descriptors). The successor
//! restores and answers `Restored`; the old VMM answers `Commit` and leaves;
//! the successor starts its vCPUs. Until `Commit` the old VMM still owns a
//! complete, paused VM: any failure on the way rolls back by killing the
//! successor and resuming, so a failed upgrade never costs the guest.
//!
//! The link is a `SOCK_SEQPACKET` socket pair (one message per record, the
//! descriptors travel with it as `SCM_RIGHTS`).

use crate::config::VmConfig;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Exit code of a VMM process whose VM now runs in its successor.
pub const HANDED_OVER_EXIT: i32 = 75;
/// Set in every successor's environment to the pid of the process that
/// started the VM (the keeper): only that first process stays behind.
pub const KEEPER_ENV: &str = "STAUNCH_KEEPER";

/// Largest message (the config is the biggest part).
const MAX_MSG: usize = 256 << 10;
const MAX_FDS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover link: {0}")]
    Io(#[from] std::io::Error),
    #[error("handover message: {0}")]
    Encoding(String),
    #[error("the other side did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the other side went away")]
    Closed,
    #[error("the successor failed: {0}")]
    Refused(String),
    #[error("unexpected handover message: {0}")]
    Unexpected(String),
    #[error("cannot start the successor {path}: {err}")]
    Spawn { path: String, err: std::io::Error },
}

/// One message of the handover, in order of the protocol.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    /// old → new: the VM to prepare; one memfd per region travels along.
    Prepare { config: Box<VmConfig>, ram: Vec<(u64, u64)> },
    /// new → old: VM, memory slots and vCPUs exist; pause when you like.
    Ready { pid: u32, prepare_ms: f64 },
    /// old → new: the guest is paused; here is its state. A memfd holding
    /// the encoded record, then the disk and the console descriptors, travel
    /// along (a memfd, so the record's size is not bound by the socket's).
    Record { disks: u32, consoles: u32 },
    /// new → old: restored, nothing runs yet.
    Restored,
    /// old → new: the old VM is gone for good; run.
    Commit,
    /// Either way: this side gives up, with why.
    Failed { error: String },
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::Prepare { .. } => "prepare",
            Msg::Ready { .. } => "ready",
            Msg::Record { .. } => "record",
            Msg::Restored => "restored",
            Msg::Commit => "commit",
            Msg::Failed { .. } => "failed",
        }
    }
}

/// One end of the handover link.
pub struct Link {
    sock: UnixDatagram,
}

impl Link {
    /// A connected pair: ours, and the raw end for the successor (close-on-exec
    /// is cleared for that end only in the successor, just before its exec).
    pub fn pair() -> std::io::Result<(Link, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into our array.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by us from here on.
        let (a, b) = unsafe { (UnixDatagram::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Link { sock: a }, b))
    }

    /// The successor's end, passed by number on its command line.
    ///
    /// # Safety
    /// `fd` must be an inherited handover socket that nothing else owns.
    pub unsafe fn from_fd(fd: RawFd) -> Link {
        // SAFETY: per this function's contract.
        Link { sock: unsafe { UnixDatagram::from_raw_fd(fd) } }
    }

    pub fn send(&self, msg: &Msg, fds: &[RawFd]) -> Result<(), HandoverError> {
        let bytes = bincode::serialize(msg).map_err(|e| HandoverError::Encoding(e.to_string()))?;
        if bytes.len() >= MAX_MSG || fds.len() > MAX_FDS {
            return Err(HandoverError::Encoding(format!("{} message too large", msg.name())));
        }
        let sent =
            self.sock.send_with_fds(&[&bytes[..]], fds).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if sent != bytes.len() {
            return Err(HandoverError::Encoding(format!("{} message cut short", msg.name())));
        }
        Ok(())
    }

    /// The next message and the descriptors that came with it (`None`: wait
    /// for ever; the other side's exit still ends the wait).
    pub fn recv(&self, within: Option<Duration>) -> Result<(Msg, Vec<OwnedFd>), HandoverError> {
        self.sock.set_read_timeout(within)?;
        let mut buf = vec![0u8; MAX_MSG];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: the iovec points at `buf`, which we own and may fill.
        let r = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EWOULDBLOCK => {
                return Err(HandoverError::Timeout(within.unwrap_or_default()));
            }
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno()).into()),
        };
        // SAFETY: recvmsg handed us `nfds` new descriptors; we own them now.
        let fds: Vec<OwnedFd> = raw[..nfds].iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
        if n == 0 {
            return Err(HandoverError::Closed);
        }
        let msg: Msg = bincode::deserialize(&buf[..n]).map_err(|e| HandoverError::Encoding(e.to_string()))?;
        if let Msg::Failed { error } = msg {
            return Err(HandoverError::Refused(error));
        }
        Ok((msg, fds))
    }
}

/// The old VMM's view of its successor process.
pub struct Successor {
    pub link: Link,
    child: std::process::Child,
}

impl Successor {
    /// Start `binary` as `staunch vmm standby`, linked to us.
    pub fn spawn(binary: &Path) -> Result<Self, HandoverError> {
        use std::os::unix::process::CommandExt;
        let (link, theirs) = Link::pair()?;
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(binary);
        cmd.args(["vmm", "standby", "--handover-fd", &fd.to_string()]);
        // Failpoints armed from the environment were for this image only.
        cmd.env_remove("STAUNCH_FAILPOINTS");
        if std::env::var_os(KEEPER_ENV).is_none() {
            // We are the VM's first process: we stay behind as its keeper,
            // and successors of successors must be re-parented to us.
            become_subreaper()?;
            cmd.env(KEEPER_ENV, std::process::id().to_string());
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|err| HandoverError::Spawn { path: binary.display().to_string(), err })?;
        drop(theirs);
        Ok(Successor { link, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Roll back: the successor must not survive a failed handover.
    pub fn abort(mut self, why: &str) {
        let _ = self.link.send(&Msg::Failed { error: why.into() }, &[]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VM runs in successor `pid` now. The VM's first process stays as its
/// keeper (one pid and exit status for whoever started it); a successor's
/// own successor lets it go. Either way nothing here runs on: exec and exit
/// end every thread without touching the guest.
pub fn leave(pid: u32) -> ! {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(KEEPER_ENV).is_none() {
        tracing::info!(successor = pid, "VM handed over; staying as its keeper");
        let err = std::process::Command::new("/proc/self/exe").args(["vmm", "keep"]).exec();
        tracing::error!("cannot exec the keeper ({err}); keeping from here");
        let code = keep();
        // SAFETY: _exit ends the process without running other threads' code.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: as above.
    unsafe { libc::_exit(HANDED_OVER_EXIT) }
}

/// Orphaned descendants (successors of successors) become our children.
fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The process that started a VM stays as its keeper after handing it over:
/// whoever launched it (a supervisor, a shell, a test) keeps one pid whose
/// exit status is the VM's. Waits for every descendant VMM, forwards
/// termination signals to them, and returns the last real exit status.
pub fn keep() -> i32 {
    use std::sync::atomic::{AtomicI32, Ordering};
    static PENDING: AtomicI32 = AtomicI32::new(0);
    extern "C" fn note(sig: libc::c_int) {
        PENDING.store(sig, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic; no SA_RESTART, so
    // waitpid returns EINTR and we forward the signal.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = note as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let _ = become_subreaper();
    let mut last = 0;
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own children.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {
                    let sig = PENDING.swap(0, Ordering::SeqCst);
                    for child in children() {
                        // SAFETY: kill(2) of our own child.
                        unsafe { libc::kill(child, sig) };
                    }
                    continue;
                }
                _ => return last, // ECHILD: every VMM is gone
            }
        }
        if libc::WIFEXITED(status) {
            let code = libc::WEXITSTATUS(status);
            if code != HANDED_OVER_EXIT {
                last = code;
            }
        } else if libc::WIFSIGNALED(status) {
            last = 128 + libc::WTERMSIG(status);
        }
    }
}

/// SIGKILL `pid` and every process below it (a keeper and the successors
/// it keeps): for tools and tests that started a VMM and must not leave its
/// VM behind. Descendants first, so none is re-parented away unseen.
pub fn kill_family(pid: u32) {
    let mut family = vec![pid as i32];
    let mut i = 0;
    while i < family.len() {
        family.extend(children_of(family[i]));
        i += 1;
    }
    for p in family.iter().rev() {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
}

fn children() -> Vec<i32> {
    children_of(std::process::id() as i32)
}

fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_the_link() {
        let (a, b) = Link::pair().unwrap();
        // SAFETY: `b` is a fresh socket handed to the Link.
        let b = unsafe { Link::from_fd(std::os::fd::IntoRawFd::into_raw_fd(b)) };
        let f = tempfile_fd();
        a.send(&Msg::Record { disks: 1, consoles: 0 }, &[f.as_raw_fd()]).unwrap();
        let (m, fds) = b.recv(Some(Duration::from_secs(1))).unwrap();
        assert!(matches!(m, Msg::Record { disks: 1, consoles: 0 }));
        assert_eq!(fds.len(), 1);
        b.send(&Msg::Failed { error: "no".into() }, &[]).unwrap();
        assert!(matches!(a.recv(Some(Duration::from_secs(1))), Err(HandoverError::Refused(e)) if e == "no"));
        assert!(matches!(a.recv(Some(Duration::from_millis(20))), Err(HandoverError::Timeout(_))));
        drop(b);
        assert!(matches!(a.recv(Some(Duration::from_secs(1))), Err(HandoverError::Closed)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (a, b) = Link::pair().unwrap();
        // SAFETY: `b` is a fresh socket we own.
        let raw = unsafe { UnixDatagram::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(b)) };
        raw.send(&[0xff; 13]).unwrap();
        assert!(matches!(a.recv(Some(Duration::from_secs(1))), Err(HandoverError::Encoding(_))));
    }

    fn tempfile_fd() -> OwnedFd {
        let name = std::ffi::CString::new("t").unwrap();
        // SAFETY: memfd_create(2) with a valid name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
