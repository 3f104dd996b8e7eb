//! Hot standby. The primary streams its log to a follower over a unix
//! socket beside the client socket (`<socket>.repl`): first a snapshot of
//! the tree, then every record, each acknowledged by the follower before the
//! primary acknowledges the change to its client. So an acknowledged write
//! is in the follower's memory and log (page cache; synced in batches and
//! before it serves) before anyone relies on it. When the stream breaks and
//! the primary's client socket refuses connections (nobody listens: the
//! process is gone), the follower syncs its log, takes over the client
//! socket (renamed over the old one) and serves.

use crate::tree::{Changes, Tree};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Largest replication message (a snapshot of a big tree).
const MAX: usize = 1 << 30;

#[derive(Debug, Serialize, Deserialize)]
pub enum ReplMsg {
    Hello,
    /// The whole tree at its record, in the snapshot file's encoding.
    Snapshot {
        bytes: Vec<u8>,
    },
    Record {
        seq: u64,
        payload: Vec<u8>,
    },
    Ack {
        seq: u64,
    },
    /// A scrub compares the trees: the primary's hash at `seq`...
    Check {
        seq: u64,
        hash: u64,
    },
    /// ...and the standby's, recomputed from its nodes' content.
    Checked {
        seq: u64,
        hash: u64,
    },
    /// Fault injection: corrupt a node in the standby's memory.
    Corrupt {
        path: String,
    },
}

pub fn repl_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".repl");
    PathBuf::from(p)
}

pub fn send(s: &mut UnixStream, m: &ReplMsg) -> std::io::Result<()> {
    let b = bincode::serialize(m).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(4 + b.len());
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(&b);
    s.write_all(&out)
}

pub fn recv(s: &mut UnixStream) -> std::io::Result<ReplMsg> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > MAX {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "replication message too large"));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    bincode::deserialize(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub fn snapshot_of(tree: &Tree, seq: u64) -> std::io::Result<ReplMsg> {
    let bytes = crate::wal::encode_snapshot(tree, seq).map_err(std::io::Error::other)?;
    Ok(ReplMsg::Snapshot { bytes })
}

pub fn decode_changes(payload: &[u8]) -> std::io::Result<Changes> {
    bincode::deserialize(payload).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The process at the other end of a unix socket (SO_PEERCRED).
pub fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// A pidfd for the process at the other end of `s` (the primary): it turns
/// readable when that process has exited, zombie or not.
pub fn peer_pidfd(s: &UnixStream) -> std::io::Result<OwnedFd> {
    let pid = peer_pid(s)?;
    // SAFETY: pidfd_open(2) with a pid and no flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Has the process behind `pidfd` exited (waiting up to `within`)? A
/// dying process closes its sockets a moment before it counts as exited.
pub fn exited(pidfd: &OwnedFd, within: std::time::Duration) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own.
    unsafe { libc::poll(&mut p, 1, within.as_millis() as i32) > 0 }
}
