//! Handing a live connection to the spare, so that a backend's death is no
//! hang-up for its frontend.
//!
//! After set-up a vhost-user connection's data path is shared memory and
//! eventfds; the socket is quiet. So the serving process sends its spare,
//! after every control message it handled, a snapshot of the session (the
//! negotiated features, the memory table, the inflight region, each ring's
//! addresses and eventfds) with duplicates of every descriptor in it,
//! including the connected socket itself. The spare maps the memory and the
//! region as they arrive. When the serving process dies the socket stays
//! open (the spare holds it), the frontend notices nothing, and the spare
//! starts the rings that were running, each from the inflight region, then
//! signals every call eventfd once (a completion the dead process published
//! may not have been signalled): no reconnect, no message replay.
//!
//! A process that dies while handling a control message may have read part
//! of it: the stream's position is then unknown. Before it reads a message
//! the serving process says so (`begin`); a spare that finds a `begin` with
//! no snapshot after it drops its duplicate, so the frontend sees the
//! hang-up and reconnects (the path without a handoff). So does a spare
//! whose session has a running ring without an inflight region (nothing
//! says where that ring was).

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// The snapshot format; a spare refuses another.
pub(crate) const VERSION: u32 = 1;
/// Descriptors in one message at most (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 200;
const MAX_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("handoff message: {0}")]
    Format(String),
    #[error("handoff message names {named} descriptors, {got} came with it")]
    Fds { named: usize, got: usize },
}

/// One memory region of the table: as SET_MEM_TABLE gave it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub(crate) struct MemRegion {
    pub gpa: u64,
    pub size: u64,
    pub user: u64,
    pub offset: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct MemSnap {
    /// Which table this is: a spare that has mapped it keeps its mapping.
    pub id: u64,
    pub regions: Vec<MemRegion>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub(crate) struct InflightSnap {
    pub id: u64,
    pub size: u64,
    pub offset: u64,
    pub queues: u16,
    pub queue_size: u16,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct VringSnap {
    pub size: u16,
    pub addrs: Option<(u64, u64, u64)>,
    pub base: u16,
    pub kick: bool,
    pub call: bool,
    pub disabled: bool,
    pub running: bool,
}

/// A session as the spare needs it. Descriptors travel beside it, in this
/// order: the connection, each memory region's, the inflight region's,
/// then each ring's kick and call (those marked present).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    pub version: u32,
    pub acked: u64,
    pub protocol: u64,
    pub owner: bool,
    pub mem: Option<MemSnap>,
    pub inflight: Option<InflightSnap>,
    pub vrings: Vec<VringSnap>,
}

impl Snapshot {
    /// How many descriptors travel with it (the connection's included).
    pub(crate) fn fds(&self) -> usize {
        let rings: usize = self.vrings.iter().map(|v| v.kick as usize + v.call as usize).sum();
        1 + self.mem.as_ref().map_or(0, |m| m.regions.len()) + self.inflight.is_some() as usize + rings
    }
}

/// What the serving process tells its spare.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Wire {
    /// A control message is about to be read.
    Begin,
    /// The session after the last message handled.
    State { snapshot: Snapshot },
    /// No frontend is connected.
    Idle,
    /// A planned upgrade: the serving process stopped its rings (nothing
    /// is in flight) and exits next; the spare, started from the new
    /// binary, takes over.
    Upgrade,
    /// Are you listening? (answered with `Ready` once everything sent
    /// before it has been read).
    Ping,
    /// From the spare: it is listening (it has everything sent so far).
    Ready,
}

/// A fresh identifier for a memory table or inflight region.
pub(crate) fn fresh_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40) ^ N.fetch_add(1, Ordering::Relaxed)
}

/// A connected SOCK_SEQPACKET pair, both ends close-on-exec: one message
/// is one record, its descriptors with it.
pub(crate) fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Send one message with its descriptors.
pub(crate) fn send(sock: &OwnedFd, msg: &Wire, fds: &[RawFd]) -> Result<(), HandoffError> {
    let body = serde_json::to_vec(msg).map_err(|e| HandoffError::Format(e.to_string()))?;
    if fds.len() > MAX_FDS || body.len() > MAX_BYTES {
        return Err(HandoffError::Format("message too large".into()));
    }
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    // SAFETY: CMSG_SPACE is a size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        mh.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, room for one header
        // and `fds`; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, fds.len());
        }
    }
    // SAFETY: mh describes live buffers; MSG_NOSIGNAL: a dead spare is an
    // error here, not a SIGPIPE.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Receive one message; `None` when the other end is closed (its process
/// is gone). Descriptors arrive close-on-exec.
pub(crate) fn recv(sock: &OwnedFd) -> Result<Option<(Wire, Vec<File>)>, HandoffError> {
    let mut body = vec![0u8; MAX_BYTES];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr() as *mut libc::c_void, iov_len: body.len() };
    // SAFETY: a size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    mh.msg_controllen = space;
    let n = loop {
        // SAFETY: mh describes live buffers we own.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let mut files = Vec::new();
    // SAFETY: the kernel filled msg_control; the CMSG_* walk stays inside
    // msg_controllen, and every descriptor in an SCM_RIGHTS record is ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    files.push(File::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if n == 0 && files.is_empty() {
        return Ok(None);
    }
    if mh.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(HandoffError::Format("truncated".into()));
    }
    let msg: Wire = serde_json::from_slice(&body[..n]).map_err(|e| HandoffError::Format(e.to_string()))?;
    if let Wire::State { snapshot } = &msg {
        if snapshot.version != VERSION {
            return Err(HandoffError::Format(format!("snapshot version {} (this is {VERSION})", snapshot.version)));
        }
        if snapshot.fds() != files.len() {
            return Err(HandoffError::Fds { named: snapshot.fds(), got: files.len() });
        }
    }
    Ok(Some((msg, files)))
}

/// The raw numbers of `files`, for a message that carries them.
fn raw(files: &[File]) -> Vec<RawFd> {
    files.iter().map(|f| f.as_raw_fd()).collect()
}

/// The serving process's side: where snapshots go, and the last one (for
/// a spare that starts later).
#[derive(Default)]
pub struct Sink {
    inner: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    spare: Option<OwnedFd>,
    last: Option<(Snapshot, Vec<File>)>,
    busy: bool,
    /// Spares attached so far (a renewed spare is a new one).
    attached: u64,
}

impl SinkState {
    fn push(&mut self, msg: &Wire, fds: &[RawFd]) {
        if let Some(s) = &self.spare
            && let Err(e) = send(s, msg, fds)
        {
            // A spare that cannot hear us is as good as none; its keeper
            // starts another.
            tracing::debug!(error = %e, "spare unreachable");
            self.spare = None;
        }
    }
}

impl Sink {
    /// A control message is about to be read from the connection.
    pub(crate) fn begin(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = true;
        s.push(&Wire::Begin, &[]);
    }

    /// The session after a message (`files` in [`Snapshot`]'s order).
    pub(crate) fn state(&self, snapshot: Snapshot, files: Vec<File>) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = false;
        s.push(&Wire::State { snapshot: snapshot.clone() }, &raw(&files));
        s.last = Some((snapshot, files));
    }

    /// The connection ended.
    pub(crate) fn idle(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = false;
        s.last = None;
        s.push(&Wire::Idle, &[]);
    }

    /// A new spare listens on `sock`: it gets the current state first.
    pub(crate) fn attach(&self, sock: OwnedFd) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.spare = Some(sock);
        s.attached += 1;
        if let Some((snap, files)) = s.last.take() {
            s.push(&Wire::State { snapshot: snap.clone() }, &raw(&files));
            s.last = Some((snap, files));
        }
        if s.busy {
            s.push(&Wire::Begin, &[]);
        }
    }
}

impl Sink {
    pub(crate) fn attached(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).attached
    }

    /// Wait until a spare attached after the `after`th has read everything
    /// (asked once it is attached; only then does it answer, so it never
    /// leaves a message unread in our end, which would make our exit a
    /// reset instead of an end for it).
    pub(crate) fn wait_ready(&self, after: u64, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        let mut asked = false;
        while std::time::Instant::now() < deadline {
            {
                let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                if s.attached > after && s.spare.is_some() && !asked {
                    s.push(&Wire::Ping, &[]);
                    asked = true;
                }
                if let (true, Some(fd)) = (asked, &s.spare) {
                    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 10) } > 0 && matches!(recv(fd), Ok(Some((Wire::Ready, _)))) {
                        return true;
                    }
                    continue;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    /// Tell the spare this is a planned upgrade (see [`Wire::Upgrade`]).
    pub(crate) fn upgrade(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).push(&Wire::Upgrade, &[]);
    }
}

/// What a spare has heard when its serving process dies.
pub(crate) struct Heard {
    /// The last snapshot and its descriptors, unless a message was being
    /// handled (or nothing is connected).
    pub state: Option<(Snapshot, Vec<File>)>,
    pub busy: bool,
    /// The serving process announced a planned upgrade.
    pub upgrade: bool,
}

/// Read the serving process's messages until it is gone, handing each
/// snapshot to `apply` (which maps what is new, ahead of need).
pub(crate) fn listen(sock: OwnedFd, mut apply: impl FnMut(&Snapshot, &[File])) -> Heard {
    let mut heard = Heard { state: None, busy: false, upgrade: false };
    loop {
        match recv(&sock) {
            Ok(Some((Wire::Begin, _))) => heard.busy = true,
            Ok(Some((Wire::State { snapshot }, files))) => {
                apply(&snapshot, &files);
                heard.busy = false;
                heard.state = Some((snapshot, files));
            }
            Ok(Some((Wire::Idle, _))) => {
                heard.busy = false;
                heard.state = None;
            }
            Ok(Some((Wire::Upgrade, _))) => heard.upgrade = true,
            Ok(Some((Wire::Ping, _))) => {
                let _ = send(&sock, &Wire::Ready, &[]);
            }
            Ok(Some((Wire::Ready, _))) => {}
            // The serving process died with our answer unread: the rest of
            // what it sent is still queued for us, then the end.
            Err(HandoffError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(None) => return heard,
            Err(e) => {
                // A message we cannot read: what we hold may be stale.
                tracing::warn!(error = %e, "handoff channel");
                heard.busy = true;
                if matches!(e, HandoffError::Io(_)) {
                    return heard;
                }
            }
        }
    }
}

/// The connection from a snapshot's first descriptor.
pub(crate) fn connection(f: File) -> UnixStream {
    UnixStream::from(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            version: VERSION,
            acked: 1 << 32,
            protocol: 0x200,
            owner: true,
            mem: Some(MemSnap { id: 7, regions: vec![MemRegion { gpa: 0, size: 4096, user: 0x7000, offset: 0 }] }),
            inflight: None,
            vrings: vec![VringSnap { size: 256, kick: true, running: true, ..Default::default() }],
        }
    }

    /// As many descriptors as `s` names (any will do for the channel).
    fn null_files(s: &Snapshot) -> Vec<File> {
        (0..s.fds()).map(|_| File::open("/dev/null").unwrap()).collect()
    }

    #[test]
    fn snapshots_and_descriptors_cross_and_a_closed_end_is_the_end() {
        let (a, b) = pair().unwrap();
        let s = snap();
        let files = null_files(&s);
        send(&a, &Wire::Begin, &[]).unwrap();
        send(&a, &Wire::State { snapshot: s.clone() }, &raw(&files)).unwrap();
        drop(a);
        let mut applied = 0;
        let heard = listen(b, |got, fds| {
            assert_eq!(got, &s);
            assert_eq!(fds.len(), 3);
            applied += 1;
        });
        assert_eq!(applied, 1);
        assert!(!heard.busy);
        let (_, fds) = heard.state.unwrap();
        // SAFETY: reading the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "received descriptors must not leak into spares");
    }

    #[test]
    fn a_begin_without_a_snapshot_after_it_is_busy() {
        let (a, b) = pair().unwrap();
        let s = snap();
        let files = null_files(&s);
        send(&a, &Wire::State { snapshot: s }, &raw(&files)).unwrap();
        send(&a, &Wire::Begin, &[]).unwrap();
        drop(a);
        assert!(listen(b, |_, _| {}).busy);
    }

    #[test]
    fn a_snapshot_with_the_wrong_descriptor_count_or_version_is_refused() {
        let (a, b) = pair().unwrap();
        let s = snap();
        send(&a, &Wire::State { snapshot: s.clone() }, &[]).unwrap();
        assert!(matches!(recv(&b), Err(HandoffError::Fds { named: 3, got: 0 })));
        let null = File::open("/dev/null").unwrap();
        let raw = [null.as_raw_fd(); 3];
        send(&a, &Wire::State { snapshot: Snapshot { version: 99, ..s } }, &raw).unwrap();
        assert!(matches!(recv(&b), Err(HandoffError::Format(_))));
        // Garbage bytes are an error, not a panic.
        // SAFETY: a plain write of a few bytes to a descriptor we own.
        unsafe { libc::write(a.as_raw_fd(), b"{nope".as_ptr() as *const libc::c_void, 5) };
        assert!(matches!(recv(&b), Err(HandoffError::Format(_))));
    }

    #[test]
    fn a_late_spare_gets_the_current_state_and_the_busy_mark() {
        let sink = Sink::default();
        let s = snap();
        sink.state(s.clone(), null_files(&s));
        sink.begin();
        let (a, b) = pair().unwrap();
        sink.attach(a);
        drop(sink);
        let heard = listen(b, |_, _| {});
        assert!(heard.busy);
        assert_eq!(heard.state.unwrap().0, s);
    }
}
