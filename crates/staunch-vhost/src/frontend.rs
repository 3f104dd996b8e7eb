//! The VMM's side of vhost-user: a link to one backend that survives the
//! backend. Kicks go from the guest to the backend through ioeventfds and
//! interrupts come back through the irqfd, so the VMM is not on the data
//! path. A monitor thread waits on the socket; when the backend hangs up it
//! reconnects at once, forever with a backoff, and replays the device's
//! set-up (features, memory table, the same inflight region, rings from
//! the used index the guest was told), so the guest sees a pause, never an
//! error or a device reset.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Set while this process hands its VM over to a successor: links stop
/// reconnecting, so the successor's connection (which supersedes ours at
/// the backend) is not taken back. Cleared if the handover rolls back.
/// An atomic store only: safe on a crash path.
static FROZEN: AtomicBool = AtomicBool::new(false);

pub fn freeze() {
    FROZEN.store(true, Ordering::SeqCst);
}

pub fn thaw() {
    FROZEN.store(false, Ordering::SeqCst);
}

/// The longest a backend may take to answer a set-up message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest ring the inflight region is sized for (the transport's maximum).
pub const QUEUE_MAX: u16 = 256;
const CONFIG_LEN: u32 = 0x3c;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user backend {path}: {what}")]
    Backend { path: String, what: String },
    #[error("vhost-user backend {path} offers {offered} queues, {wanted} needed")]
    Queues { path: String, offered: u64, wanted: usize },
}

pub const LINK_RECORD_VERSION: u32 = 1;

/// What a VMM's successor needs to take a link over without asking the
/// backend first (it may be down at that moment): the device it offered,
/// and the inflight region's geometry (the region itself travels as a
/// descriptor beside the record).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkRecord {
    pub version: u32,
    pub features: u64,
    pub config: Vec<u8>,
    /// mmap_size, mmap_offset, num_queues, queue_size.
    pub inflight: Option<(u64, u64, u16, u16)>,
}

/// What kind of device a link serves.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    /// For threads and events: "blk", "net".
    pub device: &'static str,
    pub queues: usize,
    /// The configuration space, when the VMM owns it (virtio-net: the MAC
    /// and a link that is always up, so no backend event can show as a
    /// link flap); None asks the backend for its own (CONFIG).
    pub config: Option<Vec<u8>>,
}

/// One queue as the driver configured it (guest physical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What the frontend negotiated and must replay on every connection.
struct Setup {
    acked: u64,
    rings: Vec<RingAddrs>,
}

struct State {
    conn: Option<Frontend>,
    /// Bumped on every new connection, so the monitor knows which one it watches.
    generation: u64,
    protocol: VhostUserProtocolFeatures,
    started: Option<Setup>,
    /// Backend outages so far, for status and events.
    reconnects: u64,
}

/// A reconnecting link to one vhost-user backend.
pub struct Link {
    path: PathBuf,
    queues: usize,
    /// The configuration space when the VMM owns it ([`LinkSpec::config`]).
    own_config: Option<Vec<u8>>,
    mem: GuestMemoryMmap,
    kicks: Vec<Arc<EventFd>>,
    call: Arc<EventFd>,
    events: Option<PathBuf>,
    device: &'static str,
    state: Mutex<State>,
    changed: Condvar,
    /// The device the backend offered (features, configuration), fixed at
    /// the first connection: a backend that comes back must offer the same.
    /// Lock-free, so a crash path can save it whoever holds the state lock.
    device_info: OnceLock<(u64, Vec<u8>)>,
    /// The inflight region, kept for every backend that follows.
    inflight: OnceLock<(VhostUserInflight, File)>,
    /// The device is gone (its VM was torn down): stop watching.
    closed: AtomicBool,
}

fn fail(path: &Path, what: impl std::fmt::Display) -> FrontendError {
    FrontendError::Backend { path: path.display().to_string(), what: what.to_string() }
}

impl Link {
    /// Connect to the backend at `path` (waiting for it if it is not there
    /// yet) and learn its features and configuration. `kicks` are the
    /// queues' ioeventfds, `call` the device's irqfd. With `saved` (a VMM's
    /// successor) the device is known already: the link comes up at once
    /// and connects in the background, the same inflight region in hand.
    pub fn connect(
        path: &Path,
        spec: LinkSpec,
        mem: GuestMemoryMmap,
        kicks: Vec<Arc<EventFd>>,
        call: Arc<EventFd>,
        events: Option<PathBuf>,
        saved: Option<(LinkRecord, Option<File>)>,
    ) -> Result<Arc<Link>, FrontendError> {
        let LinkSpec { device, queues, config } = spec;
        let link = Arc::new(Link {
            path: path.to_path_buf(),
            queues,
            own_config: config,
            mem,
            kicks,
            call,
            events,
            device,
            state: Mutex::new(State {
                conn: None,
                generation: 0,
                protocol: VhostUserProtocolFeatures::empty(),
                started: None,
                reconnects: 0,
            }),
            changed: Condvar::new(),
            device_info: OnceLock::new(),
            inflight: OnceLock::new(),
            closed: AtomicBool::new(false),
        });
        if let Some((rec, file)) = saved {
            if rec.version != LINK_RECORD_VERSION {
                return Err(fail(path, format!("link record version {} is not supported", rec.version)));
            }
            let _ = link.device_info.set((rec.features, rec.config));
            if let (Some((size, off, n, qs)), Some(f)) = (rec.inflight, file) {
                let _ = link.inflight.set((VhostUserInflight::new(size, off, n, qs), f));
            }
        } else {
            let mut st = link.lock();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match link.establish(&mut st) {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        let l = link.clone();
        std::thread::Builder::new()
            .name(format!("vhost-{device}"))
            .spawn(move || l.monitor())
            .map_err(|e| fail(path, e))?;
        Ok(link)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Device features the backend offers (without PROTOCOL_FEATURES).
    pub fn features(&self) -> u64 {
        self.device_info.get().map_or(0, |d| d.0) & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    pub fn config(&self) -> Vec<u8> {
        if let Some(c) = &self.own_config {
            return c.clone();
        }
        self.device_info.get().map(|d| d.1.clone()).unwrap_or_default()
    }

    /// What a successor needs, and a duplicate of the inflight region's
    /// descriptor if there is one (lock-free: a crash path may call it).
    pub fn record_and_file(&self) -> (LinkRecord, Option<File>) {
        let (features, config) = self.device_info.get().cloned().unwrap_or_default();
        let inflight = self.inflight.get();
        let file = inflight.and_then(|(_, f)| f.try_clone().ok());
        let geometry = inflight.map(|(m, _)| (m.mmap_size, m.mmap_offset, m.num_queues, m.queue_size));
        (LinkRecord { version: LINK_RECORD_VERSION, features, config, inflight: geometry }, file)
    }

    /// Backend outages so far; None while a connection is being set up.
    pub fn reconnects(&self) -> Option<u64> {
        self.state.try_lock().ok().map(|s| s.reconnects)
    }

    /// None while a connection is being set up (the state is busy).
    pub fn connected(&self) -> Option<bool> {
        self.state.try_lock().ok().map(|s| s.conn.is_some())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &'static str {
        self.device
    }

    /// The driver set DRIVER_OK: hand the rings to the backend.
    pub fn start(&self, acked: u64, rings: Vec<RingAddrs>) -> Result<(), FrontendError> {
        let mut st = self.lock();
        st.started = Some(Setup { acked, rings });
        let r = self.replay(&mut st);
        if let Err(e) = &r {
            // The monitor sees the hang-up (or the failed set-up) and retries.
            tracing::warn!(error = %e, "vhost-user start failed; will retry on reconnect");
            if let Some(c) = &st.conn {
                nix_shutdown(c.as_raw_fd());
            }
        }
        Ok(())
    }

    /// The driver reset the device: the backend stops its rings.
    pub fn stop(&self) {
        let mut st = self.lock();
        if st.started.take().is_some()
            && let Some(c) = &st.conn
        {
            for i in 0..self.queues {
                let _ = c.get_vring_base(i);
            }
        }
    }

    /// The device is gone: end the connection and stop reconnecting.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = &self.lock().conn {
            nix_shutdown(c.as_raw_fd());
        }
    }

    /// Connect and negotiate; the device's set-up is replayed if it runs.
    fn establish(&self, st: &mut State) -> Result<(), FrontendError> {
        let p = &self.path;
        let sock = UnixStream::connect(p).map_err(|e| fail(p, e))?;
        // A backend that accepted but does not answer (stopped, hung) must
        // not hold the link, and the vCPU waiting on it, for good: a reply
        // that takes this long fails the attempt, which is retried.
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| fail(p, e))?;
        let mut f = Frontend::from_stream(sock, self.queues as u64);
        f.set_owner().map_err(|e| fail(p, e))?;
        let features = f.get_features().map_err(|e| fail(p, e))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(fail(p, "backend does not offer vhost-user protocol features"));
        }
        let offered = f.get_protocol_features().map_err(|e| fail(p, e))?;
        // No REPLY_ACK: the set-up messages are sent back to back, not one
        // round trip each (on a busy host each costs a scheduling delay of
        // the backend, and a reconnect sends a dozen). A backend that
        // refuses one closes the connection, which is retried.
        let mut want = VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::MQ;
        if self.own_config.is_none() {
            want |= VhostUserProtocolFeatures::CONFIG;
        }
        let protocol = offered & want;
        f.set_protocol_features(protocol).map_err(|e| fail(p, e))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = f.get_queue_num().map_err(|e| fail(p, e))?;
            if n < self.queues as u64 {
                return Err(FrontendError::Queues { path: p.display().to_string(), offered: n, wanted: self.queues });
            }
        } else if self.queues > 1 {
            return Err(FrontendError::Queues { path: p.display().to_string(), offered: 1, wanted: self.queues });
        }
        let config = if self.own_config.is_some() {
            Vec::new()
        } else if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(fail(p, "backend has no configuration space (CONFIG)"));
        } else {
            f.get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &[0u8; CONFIG_LEN as usize])
                .map_err(|e| fail(p, e))?
                .1
        };
        if let Some((f0, c0)) = self.device_info.get()
            && (features != *f0 || config != *c0)
        {
            // A different device behind the same socket: the guest must not
            // see it change under it. Refuse and keep retrying.
            return Err(fail(p, "the backend that came back offers other features or another configuration"));
        }
        let _ = self.device_info.set((features, config));
        if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) && self.inflight.get().is_none() {
            // Asked for at once, not at the driver's start: the region then
            // exists before anything can be in flight, and travels with the
            // VM's record from the start.
            let ask = VhostUserInflight::new(0, 0, self.queues as u16, QUEUE_MAX);
            let (msg, file) = f.get_inflight_fd(&ask).map_err(|e| fail(p, e))?;
            if msg.mmap_size > 0 {
                let _ = self.inflight.set((msg, file));
            }
        }
        st.protocol = protocol;
        st.conn = Some(f);
        st.generation += 1;
        if st.started.is_some() {
            self.replay(st)?;
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Send the running device's set-up over the current connection.
    fn replay(&self, st: &mut State) -> Result<(), FrontendError> {
        let p = &self.path;
        let Some(setup) = &st.started else { return Ok(()) };
        let Some(f) = st.conn.clone() else { return Err(fail(p, "not connected")) };
        let mut f = f;
        f.set_features(setup.acked | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).map_err(|e| fail(p, e))?;
        let regions = self.regions().map_err(|e| fail(p, e))?;
        f.set_mem_table(&regions).map_err(|e| fail(p, e))?;
        if st.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            && let Some((msg, file)) = self.inflight.get()
        {
            f.set_inflight_fd(msg, file.as_raw_fd()).map_err(|e| fail(p, e))?;
        }
        for (i, r) in setup.rings.iter().enumerate() {
            if r.size == 0 {
                continue;
            }
            let va = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).map(|h| h as u64).map_err(|e| fail(p, e));
            // What the guest was told: a restarted backend continues there
            // (and from its inflight region, with what was in flight).
            let used_idx: u16 = vm_memory::Bytes::read_obj(&self.mem, GuestAddress(r.used + 2)).unwrap_or(0);
            let cfg = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: va(r.desc)?,
                used_ring_addr: va(r.used)?,
                avail_ring_addr: va(r.avail)?,
                log_addr: None,
            };
            f.set_vring_num(i, r.size).map_err(|e| fail(p, e))?;
            f.set_vring_base(i, u16::from_le(used_idx)).map_err(|e| fail(p, e))?;
            f.set_vring_addr(i, &cfg).map_err(|e| fail(p, e))?;
            f.set_vring_call(i, &self.call).map_err(|e| fail(p, e))?;
            f.set_vring_kick(i, &self.kicks[i]).map_err(|e| fail(p, e))?;
            f.set_vring_enable(i, true).map_err(|e| fail(p, e))?;
        }
        // A completion the dead backend published may not have interrupted
        // the guest: one spurious interrupt is harmless, a lost one is not.
        let _ = self.call.write(1);
        Ok(())
    }

    fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
        let mut out = Vec::new();
        for r in self.mem.iter() {
            let fo = r.file_offset().ok_or("guest memory is not backed by a file (memfd)")?;
            out.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        Ok(out)
    }

    /// Wait on the socket; on a hang-up reconnect at once and forever.
    fn monitor(self: Arc<Self>) {
        loop {
            let (fd, generation) = {
                let st = self.lock();
                (st.conn.as_ref().map(|c| c.as_raw_fd()), st.generation)
            };
            if let Some(fd) = fd {
                wait_hangup(fd);
            }
            let lost = Instant::now();
            // Handing over: the successor owns the backend now (or the
            // handover rolls back and we go on).
            while FROZEN.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            // A successor's link starts unconnected: attaching, not a loss.
            let attach = fd.is_none() && generation == 0;
            {
                let mut st = self.lock();
                if st.generation != generation {
                    continue;
                }
                st.conn = None;
                if !attach {
                    st.reconnects += 1;
                }
            }
            if !attach {
                staunch_events::emit(
                    self.events.as_deref(),
                    "backend-lost",
                    serde_json::json!({"component": self.device, "socket": self.path}),
                );
            }
            let mut delay = Duration::from_micros(50);
            let mut attempts = 0u64;
            let mut last_report = Instant::now();
            loop {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                attempts += 1;
                let r = {
                    let mut st = self.lock();
                    self.establish(&mut st)
                };
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        if last_report.elapsed() > Duration::from_secs(5) {
                            last_report = Instant::now();
                            staunch_events::emit(
                                self.events.as_deref(),
                                "backend-waiting",
                                serde_json::json!({"component": self.device, "socket": self.path,
                                                   "error": e.to_string(), "attempts": attempts,
                                                   "outage_ms": lost.elapsed().as_millis() as u64}),
                            );
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(20));
                    }
                }
            }
            staunch_events::emit(
                self.events.as_deref(),
                if attach { "backend-attached" } else { "backend-reconnected" },
                serde_json::json!({"component": self.device, "socket": self.path, "attempts": attempts,
                                   "outage_us": lost.elapsed().as_micros() as u64}),
            );
        }
    }
}

/// Block until the peer of `fd` hangs up.
fn wait_hangup(fd: RawFd) {
    loop {
        // Not POLLIN: a reply to the set-up running on another thread is
        // readable data, not a hang-up.
        let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 && p.revents != 0 {
            return;
        }
    }
}

fn nix_shutdown(fd: RawFd) {
    // SAFETY: shutdown on a socket we own; it only ends the connection.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// A virtio device whose queues a vhost-user backend serves; the transport
/// (virtio-mmio) stays in the VMM and keeps the driver's view.
pub struct VhostUserDevice {
    link: Arc<Link>,
    device_type: u32,
    sizes: Vec<u16>,
    /// Features the VMM implements itself (virtio-net's MAC and STATUS:
    /// the configuration space is the VMM's); never passed to the backend.
    own_features: u64,
    /// The backend's features the guest may see: those the device as the
    /// VMM builds it can honour (no control queue or queue pairs it does
    /// not have, whatever the backend offers).
    passed: u64,
}

impl VhostUserDevice {
    pub fn new(link: Arc<Link>, device_type: u32, own_features: u64, passed: u64) -> VhostUserDevice {
        let sizes = vec![QUEUE_MAX; link.queues];
        VhostUserDevice { link, device_type, sizes, own_features, passed }
    }
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.link.close();
    }
}

impl staunch_devices::virtio::VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn features(&self) -> u64 {
        // No ring features the transport does not know; the backend's
        // device features pass through.
        ((self.link.features() & self.passed) | self.own_features) & 0xffff_ffff
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.link.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| cfg.get(o + i)).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, acked_features: u64) {
        let _ = self.link.start(acked_features & !self.own_features, Vec::new());
    }
    fn start(&mut self, acked_features: u64, queues: &[virtio_queue::Queue]) {
        use virtio_queue::QueueT;
        let rings = queues
            .iter()
            .map(|q| RingAddrs {
                size: if q.ready() { q.size() } else { 0 },
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            })
            .collect();
        if let Err(e) = self.link.start(acked_features & !self.own_features, rings) {
            tracing::warn!(error = %e, "vhost-user device start failed");
        }
    }
    fn signals_directly(&self) -> bool {
        true
    }
    fn process_queue(
        &mut self,
        _index: usize,
        _queue: &mut virtio_queue::Queue,
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, String> {
        // Kicks go to the backend through ioeventfds; nothing reaches here.
        Ok(false)
    }
    fn reset(&mut self) {
        self.link.stop();
    }
}
