//! A vhost-user backend server: the protocol on top of the `vhost` crate's
//! request parser, the inflight region, and one worker thread per queue.
//! Device models plug in through [`Device`] and stay small.
//!
//! A connection ends on hang-up or on any malformed message (the frontend
//! reconnects); queue workers are stopped before the next connection is
//! accepted, so two frontends never drive the same rings.

use crate::handoff::{self, InflightSnap, MemRegion, MemSnap, Sink};
use crate::inflight::{Recovery, Region};
use crate::memory::Memory;
use crate::queue::{Worker, WorkerSetup};
use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::*;
use vhost::vhost_user::{Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

mod resume;
pub(crate) use resume::Standby;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const MAX_QUEUES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("socket {path}: {err}")]
    Socket { path: String, err: std::io::Error },
    #[error("socket {0} is in use by a running backend")]
    InUse(String),
}

/// A device model served over vhost-user.
pub trait Device: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Device feature bits (VERSION_1 and PROTOCOL_FEATURES are added).
    fn features(&self) -> u64;
    /// The device's configuration space.
    fn config(&self) -> Vec<u8>;
    fn queues(&self) -> usize;
    fn queue_size(&self) -> u16;
    /// A handler for queue `queue` (each queue worker owns one).
    fn handler(&self, queue: usize) -> Result<Box<dyn QueueHandler>, String>;
    /// Descriptors a spare or an upgraded image inherits (their numbers are
    /// in the command line), such as a tap that only one process can open.
    fn inherited_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
}

/// Serves descriptor chains of one queue.
pub trait QueueHandler: Send {
    /// Serve one chain (already walked and bounds-checked against the
    /// queue); returns the used length.
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32;
    /// Whether to take a chain now. A receive queue takes a buffer only
    /// when a frame is waiting for it.
    fn ready(&mut self) -> bool {
        true
    }
    /// What to wait on, besides the kick, while `ready` says no (a tap).
    fn source(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// Where the backend reports what it does.
#[derive(Clone, Default)]
pub struct Options {
    pub events: Option<PathBuf>,
    /// The spare's channel: a snapshot after every control message, so a
    /// death of this process is no hang-up (`handoff`).
    pub handoff: Option<Arc<Sink>>,
}

#[derive(Default)]
struct Vring {
    size: u16,
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    /// Rings run once kicked unless the frontend disabled them: QEMU before
    /// 7.2 never sends SET_VRING_ENABLE for block, and libvhost-user starts
    /// rings on the kick as well.
    disabled: bool,
    worker: Option<Worker>,
}

/// One frontend connection's negotiated state.
pub(crate) struct Session {
    device: Arc<dyn Device>,
    opts: Options,
    acked: u64,
    protocol: u64,
    owner: bool,
    mem: Option<Memory>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<Region>>,
    /// What the memory table and the inflight region were made from, for
    /// the spare's snapshot.
    mem_src: Option<(MemSnap, Vec<File>)>,
    inflight_src: Option<InflightSnap>,
}

fn op(what: &'static str) -> VhostError {
    VhostError::InvalidOperation(what)
}

impl Session {
    fn new(device: Arc<dyn Device>, opts: Options) -> Session {
        let vrings = (0..device.queues().min(MAX_QUEUES)).map(|_| Vring::default()).collect();
        Session {
            device,
            opts,
            acked: 0,
            protocol: 0,
            owner: false,
            mem: None,
            vrings,
            inflight: None,
            mem_src: None,
            inflight_src: None,
        }
    }

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VhostError::InvalidParam)
    }

    fn stop(&mut self, index: usize) -> Option<u16> {
        let w = self.vrings.get_mut(index)?.worker.take()?;
        Some(w.stop())
    }

    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Start queue `index` if it has everything a worker needs and is enabled.
    fn maybe_start(&mut self, index: usize) -> VhostResult<()> {
        let Some(mem) = self.mem.clone() else { return Ok(()) };
        let inflight = self.inflight.clone();
        let device = self.device.clone();
        let opts = self.opts.clone();
        let v = self.vrings.get_mut(index).ok_or(VhostError::InvalidParam)?;
        if v.worker.is_some() || v.disabled {
            return Ok(());
        }
        let (Some((desc, avail, used)), Some(kick)) = (v.addrs, v.kick.as_ref()) else { return Ok(()) };
        let size = v.size;
        if size == 0 || !size.is_power_of_two() || size > device.queue_size() {
            return Err(op("queue size must be a power of two within the device's maximum"));
        }
        let n = size as u64;
        let t = |va: u64, len: u64| mem.translate(va, len).ok_or(op("vring address outside guest memory"));
        let (desc, avail, used) = (t(desc, 16 * n)?, t(avail, 6 + 2 * n)?, t(used, 6 + 8 * n)?);
        let handler = device.handler(index).map_err(|_| VhostError::BackendInternalError)?;
        let setup = WorkerSetup {
            index,
            size,
            desc,
            avail,
            used,
            base: v.base,
            kick: kick.try_clone().map_err(VhostError::SocketError)?,
            call: v.call.as_ref().map(|c| c.try_clone()).transpose().map_err(VhostError::SocketError)?,
            mem,
            inflight,
            handler,
            events: opts.events.clone(),
            component: device.name(),
        };
        let (worker, rec): (Worker, Option<Recovery>) =
            Worker::start(setup).map_err(|_| op("queue worker could not start"))?;
        if let Some(r) = rec.filter(|r| !r.resubmit.is_empty() || r.fixed_last_batch) {
            staunch_events::emit(
                opts.events.as_deref(),
                "inflight-resubmit",
                serde_json::json!({"component": device.name(), "queue": index, "requests": r.resubmit.len(),
                                   "fixed_last_batch": r.fixed_last_batch, "next_avail": r.next_avail}),
            );
        }
        v.worker = Some(worker);
        Ok(())
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owner {
            return Err(op("owner already set"));
        }
        self.owner = true;
        Ok(())
    }
    fn reset_owner(&mut self) -> VhostResult<()> {
        self.stop_all();
        self.owner = false;
        self.acked = 0;
        Ok(())
    }
    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset_owner()
    }
    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.device.features() | VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        if features & !self.get_features()? != 0 {
            return Err(op("features that were never offered"));
        }
        self.acked = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let dups =
            files.iter().map(|f| f.try_clone()).collect::<Result<Vec<_>, _>>().map_err(VhostError::SocketError)?;
        let mem = Memory::map(ctx, files).map_err(|e| {
            tracing::warn!(error = %e, "memory table refused");
            VhostError::InvalidParam
        })?;
        let regions = ctx
            .iter()
            .map(|r| MemRegion {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user: r.user_addr,
                offset: r.mmap_offset,
            })
            .collect();
        self.mem_src = Some((MemSnap { id: handoff::fresh_id(), regions }, dups));
        // Running queues keep their old mapping until restarted on the new one.
        let running: Vec<usize> = (0..self.vrings.len()).filter(|&i| self.vrings[i].worker.is_some()).collect();
        for &i in &running {
            if let Some(b) = self.stop(i) {
                self.vrings[i].base = b;
            }
        }
        self.mem = Some(mem);
        for i in running {
            self.maybe_start(i)?;
        }
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let max = self.device.queue_size() as u32;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(VhostError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.vring(index)?.addrs = Some((descriptor, available, used));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.vring(index)?.base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        // The ring stops; its position is what the frontend keeps.
        let v = self.vring(index)?.base;
        let base = self.stop(index as usize).unwrap_or(v);
        let r = self.vring(index)?;
        r.base = base;
        r.kick = None;
        Ok(VhostUserVringState::new(index, base as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.stop(index as usize);
        self.vring(index as u32)?.kick = fd;
        self.maybe_start(index as usize)
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let running = self.vring(index as u32)?.worker.is_some();
        if running && let Some(b) = self.stop(index as usize) {
            self.vring(index as u32)?.base = b;
        }
        self.vring(index as u32)?.call = fd;
        if running { self.maybe_start(index as usize) } else { Ok(()) }
    }
    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.vring(index as u32).map(|_| ())
    }
    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        let mut f = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if !self.device.config().is_empty() {
            f |= VhostUserProtocolFeatures::CONFIG;
        }
        if self.device.queues() > 1 {
            f |= VhostUserProtocolFeatures::MQ;
        }
        Ok(f)
    }
    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        self.protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.vrings.len() as u64)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.vring(index)?.disabled = !enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            if let Some(b) = self.stop(index as usize) {
                self.vring(index)?.base = b;
            }
            Ok(())
        }
    }
    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        let cfg = self.device.config();
        let (o, n) = (offset as usize, size as usize);
        cfg.get(o..o.checked_add(n).ok_or(VhostError::InvalidParam)?)
            .map(|s| s.to_vec())
            .ok_or(VhostError::InvalidParam)
    }
    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VhostResult<()> {
        Err(op("configuration space is read-only"))
    }
    fn set_gpu_socket(&mut self, _gpu: vhost::vhost_user::GpuBackend) -> VhostResult<()> {
        Err(op("not a GPU"))
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(op("no shared objects"))
    }
    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VhostResult<(VhostUserInflight, File)> {
        let queues = msg.num_queues.min(self.vrings.len() as u16);
        let size = msg.queue_size;
        let r = Region::create(queues, size).map_err(|_| VhostError::InvalidParam)?;
        let file = r.file().try_clone().map_err(VhostError::SocketError)?;
        let reply = VhostUserInflight::new(r.size(), 0, queues, size);
        self.inflight_src =
            Some(InflightSnap { id: handoff::fresh_id(), size: r.size(), offset: 0, queues, queue_size: size });
        self.inflight = Some(Arc::new(r));
        Ok((reply, file))
    }
    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VhostResult<()> {
        use std::os::unix::fs::MetadataExt;
        // Which region this is (the same one across restarts, on either side).
        let inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
        let src = InflightSnap {
            id: handoff::fresh_id(),
            size: msg.mmap_size,
            offset: msg.mmap_offset,
            queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        let r = Region::map(file, msg.mmap_size, msg.mmap_offset, msg.num_queues, msg.queue_size).map_err(|e| {
            tracing::warn!(error = %e, "inflight region refused");
            VhostError::InvalidParam
        })?;
        staunch_events::emit(
            self.opts.events.as_deref(),
            "inflight-region",
            serde_json::json!({"component": self.device.name(), "inode": inode, "size": r.size(),
                               "queues": r.queues(), "queue_size": r.queue_size()}),
        );
        self.inflight_src = Some(src);
        self.inflight = Some(Arc::new(r));
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Err(op("memory slots not supported"))
    }
    fn add_mem_region(
        &mut self,
        _r: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        Err(op("memory slots not supported"))
    }
    fn remove_mem_region(&mut self, _r: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        Err(op("memory slots not supported"))
    }
    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(op("device state transfer not supported"))
    }
    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(op("device state transfer not supported"))
    }
    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(op("no shared memory regions"))
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(op("dirty logging not supported"))
    }
}

/// Bind the backend's socket. A socket file left by a dead backend is
/// replaced; one a live backend still answers on is refused.
pub fn bind(path: &Path) -> Result<UnixListener, BackendError> {
    let p = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(BackendError::InUse(p));
        }
        std::fs::remove_file(path).map_err(|err| BackendError::Socket { path: p.clone(), err })?;
    }
    UnixListener::bind(path).map_err(|err| BackendError::Socket { path: p, err })
}

/// The connection being served: its socket, session and thread.
type Connection = (UnixStream, Arc<Mutex<Session>>, std::thread::JoinHandle<()>);

/// Serve frontends on `listener` until `stop` is signalled; the current
/// connection's rings are then stopped (every request taken is finished and
/// published) and it is closed. The newest connection wins: a frontend that
/// reconnects (a VMM's successor, or one whose old socket is still held by
/// a process that hangs) supersedes the one before, whose rings are stopped
/// before the new one can start any.
pub fn serve_until(listener: &UnixListener, device: Arc<dyn Device>, opts: &Options, stop: &EventFd) {
    if let Some(live) = serve_from(listener, device, opts, stop, None) {
        live.end();
    }
}

/// The connection being served when `serve_from` was told to stop.
pub(crate) struct Live(Connection);

impl Live {
    /// Rings first (a request in progress completes and is published),
    /// then the socket is shut and its thread joined.
    pub(crate) fn end(self) {
        let (old, session, thread) = self.0;
        session.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
        let _ = old.shutdown(std::net::Shutdown::Both);
        let _ = thread.join();
    }

    /// Leave it to the spare: the rings stop (nothing stays in flight) but
    /// the connection stays open, and the session stays locked until this
    /// process exits, so no further message is handled or described to the
    /// spare (one that arrives meanwhile is marked begun: the spare then
    /// lets the connection go).
    pub(crate) fn park(self) {
        let (stream, session, thread) = self.0;
        let mut guard = session.lock().unwrap_or_else(|p| p.into_inner());
        guard.stop_all();
        std::mem::forget(guard);
        std::mem::forget((stream, session, thread));
    }
}

/// [`serve_until`], starting with a connection a spare resumed; what was
/// being served when `stop` came is returned, still open.
pub(crate) fn serve_from(
    listener: &UnixListener,
    device: Arc<dyn Device>,
    opts: &Options,
    stop: &EventFd,
    resumed: Option<(UnixStream, Session)>,
) -> Option<Live> {
    use std::os::fd::AsRawFd;
    let mut current: Option<Connection> = None;
    let end = |c: &mut Option<Connection>| {
        if let Some(c) = c.take() {
            Live(c).end();
        }
    };
    let start = |stream: UnixStream, session: Session, resumed: bool| -> Option<Connection> {
        let keep = stream.try_clone().ok()?;
        let session = Arc::new(Mutex::new(session));
        let (s, d, o) = (session.clone(), device.clone(), opts.clone());
        let spawned = std::thread::Builder::new()
            .name("vhost-conn".into())
            .spawn(move || serve_connection(stream, s, d, &o, resumed));
        match spawned {
            Ok(t) => Some((keep, session, t)),
            Err(e) => {
                tracing::warn!(error = %e, "connection thread");
                None
            }
        }
    };
    if let Some((stream, session)) = resumed {
        current = start(stream, session, true);
    }
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd entries.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return current.map(Live);
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        end(&mut current);
        current = start(stream, Session::new(device.clone(), opts.clone()), false);
    }
}

/// Serve one frontend on `stream` until it hangs up or sends something
/// malformed (a fresh session; its rings are stopped at the end).
pub fn serve_one_connection(stream: UnixStream, device: Arc<dyn Device>, opts: &Options) {
    let session = Arc::new(Mutex::new(Session::new(device.clone(), opts.clone())));
    serve_connection(stream, session, device, opts, false);
}

/// Block until `stream` has something to read (a message or a hang-up).
fn readable(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; EINTR just returns early.
    unsafe { libc::poll(&mut p, 1, -1) };
}

/// Tell the spare about the session as it is now.
fn tell_spare(sink: &Sink, session: &Mutex<Session>, conn: &UnixStream) {
    match session.lock().unwrap_or_else(|p| p.into_inner()).snapshot(conn) {
        Ok((snap, files)) => sink.state(snap, files),
        // Without a snapshot the spare's last one is stale: it must not
        // resume from it, so the message stays marked as in progress.
        Err(e) => tracing::warn!(error = %e, "session snapshot"),
    }
}

/// Serve one frontend until it hangs up or sends something malformed.
/// With a spare, every control message is bracketed for it: `begin`
/// before a byte of it is read, the session's snapshot after its reply.
fn serve_connection(
    stream: UnixStream,
    session: Arc<Mutex<Session>>,
    device: Arc<dyn Device>,
    opts: &Options,
    resumed: bool,
) {
    let conn = stream.try_clone().ok();
    let sink = opts.handoff.as_deref().zip(conn.as_ref());
    let (acked, protocol) = if resumed {
        let s = session.lock().unwrap_or_else(|p| p.into_inner());
        (s.acked, s.protocol)
    } else {
        (VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0)
    };
    let mut handler = match resume::handler(stream, &session, acked, protocol) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "connection handler");
            session.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
            return;
        }
    };
    let event = if resumed { "connection-resumed" } else { "frontend-connected" };
    staunch_events::emit(opts.events.as_deref(), event, serde_json::json!({"component": device.name()}));
    if let Some((sink, conn)) = sink {
        tell_spare(sink, &session, conn);
    }
    let why = loop {
        if let Some((sink, conn)) = sink {
            readable(conn);
            sink.begin();
        }
        if let Err(e) = handler.handle_request() {
            break e;
        }
        if let Some((sink, conn)) = sink {
            // An injected error is a death or a hang here; "error" leaves
            // the message marked in progress, as a death would.
            if staunch_fault::hit(&staunch_fault::VHOST_MESSAGE).is_ok() {
                tell_spare(sink, &session, conn);
            }
        }
    };
    let hangup = matches!(why, VhostError::Disconnected | VhostError::PartialMessage | VhostError::SocketBroken(_));
    session.lock().unwrap_or_else(|p| p.into_inner()).stop_all();
    if let Some((sink, _)) = sink {
        sink.idle();
    }
    staunch_events::emit(
        opts.events.as_deref(),
        "frontend-disconnected",
        serde_json::json!({"component": device.name(), "reason": why.to_string(), "hangup": hangup}),
    );
}

/// An EventFd over a descriptor that arrived on the socket.
pub(crate) fn eventfd(f: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the frontend sent this descriptor as an eventfd; we own it. A
    // descriptor of another kind only makes reads and writes fail.
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}
