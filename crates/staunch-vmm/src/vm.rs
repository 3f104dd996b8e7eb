//! Assemble and run one VM: boot it from a kernel, or rebuild it from a
//! preserved record around the same guest memory (warm upgrade, recovery).

use crate::api::{self, ApiRequest, ApiResponse};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::devices::{self, Dev, Slot};
use crate::events;
use crate::handover::{HandoverError, Link, Msg, Successor};
use crate::record::{self, DevicesState, RamInfo, RecordError, VmRecord};
use crate::serial_out::{Stamped, StdoutNow, UnixConsole, pump};
use serde_json::json;
use staunch_boot::{BootError, layout};
use staunch_devices::legacy::{I8042, POWER_PORT, PowerPort};
use staunch_devices::serial::Serial;
use staunch_devices::virtio::blk::BlkError;
use staunch_devices::virtio::mmio::MmioTransport;
use staunch_devices::{Bus, BusError, DeviceAction, Interrupt};
use staunch_kvm::memory::RamRegion;
use staunch_kvm::state::{self, StateError};
use staunch_kvm::{ExitHandler, GuestRam, MemError, StopReason, VcpuControl, VcpuError, Vm, VmError};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Disk(#[from] BlkError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("device state: {0}")]
    Device(String),
    #[error("serial {what}: {err}")]
    Serial { what: String, err: std::io::Error },
    #[error("interrupt line {gsi}: {err}")]
    Irq { gsi: u32, err: String },
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("control socket {path}: {err}")]
    Api { path: String, err: std::io::Error },
    #[error("vCPU {0} did not answer while paused")]
    VcpuGone(u8),
    #[error("exec of {path} failed: {err}")]
    Exec { path: String, err: std::io::Error },
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error("successor does not match the VM: {0}")]
    Mismatch(String),
    #[error("{err} (successor {pid})")]
    Successor { pid: u32, err: Box<VmmError> },
}

/// How a VM ended, with what the VMM measured.
#[derive(Debug, Clone)]
pub struct VmExit {
    pub reason: StopReason,
    /// From VM creation to the guest's first serial byte.
    pub first_output: Option<Duration>,
    pub runtime: Duration,
    pub exits: u64,
}

/// What the VMM's main loop waits for.
pub enum VmEvent {
    Stopped(u8, StopReason),
    /// A request, where to answer, and word once the answer is written
    /// (a VMM about to hand over waits for that before it leaves).
    Api(ApiRequest, crate::api::Reply),
}

struct Exits {
    pio: Bus,
    mmio: Bus,
    observer: staunch_devices::Observer,
}

fn to_stop(a: DeviceAction) -> Option<StopReason> {
    match a {
        DeviceAction::Continue => None,
        DeviceAction::PowerOff(c) => Some(StopReason::PowerOff(c)),
        DeviceAction::Reset => Some(StopReason::Reset),
    }
}

impl ExitHandler for Exits {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(port as u64, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<StopReason> {
        if !staunch_devices::access::replaying() {
            staunch_devices::access::set_stamp(staunch_kvm::vcpu::current_stamp());
        }
        self.pio.write(port as u64, data).and_then(to_stop)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<StopReason> {
        if !staunch_devices::access::replaying() {
            staunch_devices::access::set_stamp(staunch_kvm::vcpu::current_stamp());
        }
        self.mmio.write(addr, data).and_then(to_stop)
    }
    fn contained(&self, component: &'static str, fault: String, latency: Duration) {
        (self.observer)(staunch_devices::FaultReport { device: component, fault, recovered: true, latency });
    }
}

const COM1: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;

/// Serves one virtio device's queue notifications off the vCPU thread: the
/// guest's QueueNotify write is caught in the kernel by an ioeventfd (no exit
/// to userspace) and this thread processes the queue while the vCPU runs on.
struct QueueWorker {
    evt: Arc<EventFd>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<()>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    served: Arc<std::sync::atomic::AtomicU64>,
    tid: Arc<std::sync::atomic::AtomicI32>,
}

impl QueueWorker {
    fn spawn(
        vm: &Vm,
        base: u64,
        dev: Arc<Mutex<MmioTransport>>,
        name: &str,
        observer: staunch_devices::Observer,
    ) -> Result<Self, VmmError> {
        let queues = dev.lock().unwrap_or_else(|p| p.into_inner()).queue_count();
        let ioerr = |e: String| VmmError::Irq { gsi: 0, err: format!("ioeventfd: {e}") };
        let evt = Arc::new(EventFd::new(0).map_err(|e| ioerr(e.to_string()))?);
        // One eventfd for every queue of the device; the worker scans them all.
        for q in 0..queues as u32 {
            let addr = kvm_ioctls::IoEventAddress::Mmio(base + MmioTransport::QUEUE_NOTIFY);
            vm.fd.register_ioevent(&evt, &addr, q).map_err(|e| ioerr(e.to_string()))?;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let (e, s, b, n, t) = (evt.clone(), stop.clone(), busy.clone(), served.clone(), tid.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                t.store(unsafe { libc::gettid() }, std::sync::atomic::Ordering::Release);
                staunch_kvm::vcpu::big_signal_stack();
                while e.read().is_ok() && !s.load(std::sync::atomic::Ordering::Acquire) {
                    b.store(true, std::sync::atomic::Ordering::Relaxed);
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // A panic in the device model is contained: microreset
                    // (serve again from the last completed request), retry.
                    staunch_devices::contained("virtio-blk", &*dev, Some(&observer), None, |d| {
                        for q in 0..queues as u32 {
                            d.notify(q);
                        }
                    });
                    b.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .map_err(VmmError::Thread)?;
        Ok(QueueWorker { evt, stop, thread, busy, served, tid })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.evt.write(1);
        let _ = self.thread.join();
    }
}

/// Tearing down the old VM costs ~15 ms (KVM drops its shadow pages when the
/// address space goes). Keep it off the guest's pause: a helper sharing this
/// address space (CLONE_VM) and holding copies of the fds (no CLONE_FILES)
/// keeps the old mm and VM alive across our exec, then exits a little later
/// and pays for the teardown itself.
fn defer_teardown() {
    const STACK: usize = 64 * 1024;
    extern "C" fn linger(_: *mut libc::c_void) -> libc::c_int {
        let ts = libc::timespec { tv_sec: 0, tv_nsec: 300_000_000 };
        // SAFETY: raw syscalls only: this thread shares memory with a process
        // that is about to exec.
        unsafe {
            libc::nanosleep(&ts, std::ptr::null_mut());
            libc::syscall(libc::SYS_exit, 0);
        }
        0
    }
    // SAFETY: a small leaked stack for the helper, which only sleeps and
    // exits with raw syscalls; it is reaped by init once we exec (no SIGCHLD
    // is requested).
    unsafe {
        let stack = libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return;
        }
        let top = (stack as *mut u8).add(STACK) as *mut libc::c_void;
        libc::clone(linger, top, libc::CLONE_VM, std::ptr::null_mut());
    }
}

/// Microresets become structured events.
fn microreset_observer(events: Option<PathBuf>) -> staunch_devices::Observer {
    Arc::new(move |f: staunch_devices::FaultReport| {
        events::emit(
            events.as_deref(),
            "microreset",
            json!({"component": f.device, "fault": f.fault, "rung": 1,
                   "recovery_us": f.latency.as_secs_f64() * 1e6,
                   "outcome": if f.recovered { "recovered" } else { "failed" }}),
        );
    })
}

/// Feed bytes to the UART, waiting while its FIFO is full (the guest drains it).
fn feed(serial: &Mutex<Serial>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = serial.lock().unwrap_or_else(|p| p.into_inner()).push_input(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The devices and buses of a VM, fresh or restored.
struct Devices {
    handler: Arc<Exits>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    workers: Vec<QueueWorker>,
    irqs: Vec<Arc<EventFd>>,
    first_output: Arc<OnceLock<Instant>>,
    acpi: staunch_boot::acpi::Devices,
    cmdline_extra: String,
    disk_files: Vec<Slot>,
    console: Console,
}

/// What a VM takes over from the one it replaces (nothing for a fresh boot).
#[derive(Default)]
struct Inherited<'a> {
    /// Saved device state, and whether in-flight requests must be replayed.
    devices: Option<(&'a DevicesState, bool)>,
    console_fds: &'a [std::os::fd::RawFd],
    /// Append to a file console instead of starting it afresh.
    continue_log: bool,
}

/// What a successor needs to keep the console attached.
#[derive(Clone)]
enum Console {
    None,
    File(Arc<std::fs::File>),
    Unix(UnixConsole),
}

fn serial_sink(
    cfg: &VmConfig,
    output: Option<Box<dyn Write + Send>>,
    reopen: bool,
    inherited: &[std::os::fd::RawFd],
    console: &mut Console,
) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match (&cfg.serial, output) {
        (_, Some(out)) => out,
        (SerialConfig::File(_), None) if !inherited.is_empty() => {
            // SAFETY: the predecessor kept its console file open across
            // exec and recorded the number; we take it over once.
            let f = unsafe { std::fs::File::from_raw_fd(inherited[0]) };
            let keep = f.try_clone().map_err(|err| VmmError::Serial { what: "console file".into(), err })?;
            *console = Console::File(Arc::new(keep));
            Box::new(f)
        }
        (SerialConfig::Stdio, None) => Box::new(StdoutNow),
        (SerialConfig::Null | SerialConfig::Unix(_), None) => Box::new(std::io::sink()),
        (SerialConfig::File(p), None) => {
            let mut o = std::fs::OpenOptions::new();
            // A rebuilt or rebooted VM continues the same log.
            if reopen {
                o.append(true).create(true);
            } else {
                o.write(true).create(true).truncate(true);
            }
            let f = o.open(p).map_err(|err| VmmError::Serial { what: format!("file {}", p.display()), err })?;
            let keep = f.try_clone().map_err(|err| VmmError::Serial { what: format!("file {}", p.display()), err })?;
            *console = Console::File(Arc::new(keep));
            Box::new(f)
        }
    })
}

fn assemble(
    cfg: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    output: Option<Box<dyn Write + Send>>,
    devs: Vec<Dev>,
    from: Inherited,
) -> Result<Devices, VmmError> {
    let Inherited { devices: saved, console_fds: inherited_console, continue_log } = from;
    let mut disk_files = Vec::new();
    if let Some((s, _)) = saved
        && s.virtio.len() != devs.len()
    {
        return Err(VmmError::Device(format!("record has {} virtio devices, config {}", s.virtio.len(), devs.len())));
    }

    let mut irqs = Vec::new();
    let mut irq = |gsi: u32| -> Result<Arc<EventFd>, VmmError> {
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Irq { gsi, err: e.to_string() })?;
        vm.fd.register_irqfd(&e, gsi).map_err(|e| VmmError::Irq { gsi, err: e.to_string() })?;
        let e = Arc::new(e);
        irqs.push(e.clone());
        Ok(e)
    };

    let mut console = Console::None;
    let stamped = Stamped::new(serial_sink(cfg, output, continue_log, inherited_console, &mut console)?);
    let first_output = stamped.first.clone();
    let com1 = irq(COM1_IRQ)?;
    let make_serial = |irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>| match saved {
        Some((s, _)) => Serial::restore(irq, out, &s.serial).map_err(VmmError::Device),
        None => Ok(Serial::new(irq, out)),
    };
    let serial = Arc::new(Mutex::new(make_serial(com1.clone(), Box::new(stamped))?));
    if let Console::File(f) = &console {
        // From here the log's length tells how much of the stream it holds
        // (a restored UART has already written what its predecessor owed).
        let len = f.metadata().map_err(|err| VmmError::Serial { what: "console file".into(), err })?.len();
        serial.lock().unwrap_or_else(|p| p.into_inner()).ledger().track_file(len);
    }
    match &cfg.serial {
        SerialConfig::Stdio => {
            let s = serial.clone();
            std::thread::Builder::new()
                .name("serial-stdin".into())
                .spawn(move || pump(std::io::stdin(), &move |b| feed(&s, b)))
                .map_err(VmmError::Thread)?;
        }
        SerialConfig::Unix(path) => {
            let s = serial.clone();
            let input = move |b: &[u8]| feed(&s, b);
            let serr = |err| VmmError::Serial { what: format!("socket {}", path.display()), err };
            let unix = match inherited_console {
                [l, rest @ ..] => {
                    // SAFETY: the predecessor kept the listener (and the
                    // attached client, if any) open across exec; we take
                    // them over once.
                    let (listener, client) = unsafe {
                        (
                            std::os::unix::net::UnixListener::from_raw_fd(*l),
                            rest.first().map(|c| std::os::unix::net::UnixStream::from_raw_fd(*c)),
                        )
                    };
                    UnixConsole::adopt(listener, client, input).map_err(serr)?
                }
                [] => UnixConsole::bind(path, input).map_err(serr)?,
            };
            console = Console::Unix(unix.clone());
            let stamped = Stamped { inner: unix, first: first_output.clone() };
            *serial.lock().unwrap_or_else(|p| p.into_inner()) = make_serial(com1.clone(), Box::new(stamped))?;
        }
        _ => {}
    }

    events::report_failpoints(cfg.events.clone());
    let observer = microreset_observer(cfg.events.clone());
    let i8042 = Arc::new(Mutex::new(match saved {
        Some((s, _)) => I8042::restore(&s.i8042).map_err(VmmError::Device)?,
        None => I8042::default(),
    }));
    let mut pio = Bus::with_points(&staunch_fault::PIO_READ, &staunch_fault::PIO_WRITE);
    pio.set_observer(observer.clone());
    pio.insert(COM1, 8, "serial", serial.clone())?;
    pio.insert(0x60, 5, "i8042", i8042.clone())?;
    pio.insert(POWER_PORT, 1, "power", Arc::new(Mutex::new(PowerPort)))?;

    let mut mmio = Bus::with_points(&staunch_fault::MMIO_READ, &staunch_fault::MMIO_WRITE);
    mmio.set_observer(observer.clone());
    let mut workers = Vec::new();
    let mut transports = Vec::new();
    let mut acpi = staunch_boot::acpi::Devices { vcpus: cfg.vcpus, ..Default::default() };
    acpi.serial.push((COM1 as u16, COM1_IRQ));
    let mut cmdline_extra = String::new();
    for (i, dev) in devs.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let gsi = layout::VIRTIO_IRQ_BASE + i as u32;
        let call = irq(gsi)?;
        let line: Arc<dyn Interrupt> = call.clone();
        let name = if matches!(dev, Dev::Net(..)) { "virtio-net" } else { "virtio-blk" };
        let (dev, local): (Box<dyn staunch_devices::virtio::VirtioDevice>, bool) = match dev {
            Dev::File(b) => {
                let f = b.file().try_clone().map_err(|e| VmmError::Device(format!("disk descriptor: {e}")))?;
                disk_files.push(Slot::File(f));
                (Box::new(b), true)
            }
            vhost => {
                let (dev, link) = devices::vhost_user(vm, base, vhost, ram.mem.clone(), call, cfg.events.clone())?;
                disk_files.push(Slot::Link(link));
                (dev, false)
            }
        };
        let t = match saved {
            Some((s, replay)) => {
                MmioTransport::restore(dev, ram.mem.clone(), line, &s.virtio[i], replay).map_err(VmmError::Device)?
            }
            None => MmioTransport::new(dev, ram.mem.clone(), line),
        };
        let mut t = t;
        t.set_observer(observer.clone());
        let t = Arc::new(Mutex::new(t));
        mmio.insert(base, layout::VIRTIO_MMIO_SIZE, name, t.clone())?;
        if local {
            workers.push(QueueWorker::spawn(vm, base, t.clone(), &format!("virtio-blk{i}"), observer.clone())?);
        }
        transports.push(t);
        cmdline_extra.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        acpi.virtio_mmio.push((base, layout::VIRTIO_MMIO_SIZE, gsi));
    }
    Ok(Devices {
        handler: Arc::new(Exits { pio, mmio, observer }),
        serial,
        i8042,
        transports,
        workers,
        irqs,
        first_output,
        acpi,
        cmdline_extra,
        disk_files,
        console,
    })
}

/// Start a spare successor in the background: it builds its VM around our
/// memory and waits. A crash or an upgrade then only hands the state over.
fn spawn_spare(core: &Arc<Core>) {
    if !core.cfg.spare || !staunch_fault::recovery_enabled() {
        return;
    }
    let core = core.clone();
    let _ = std::thread::Builder::new().name("spare".into()).spawn(move || {
        // After a boot, let the guest have the CPUs first (preparing a spare
        // costs ~15 ms of CPU); after a recovery, be ready again at once.
        if core.generation == 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let t = Instant::now();
        let succ = match Successor::spawn(std::path::Path::new("/proc/self/exe")) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("no spare successor: {e}"),
        };
        match core.prepare(&succ) {
            Ok(prepare_ms) => {
                let mut slot = core.spare.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    tracing::debug!(
                        pid = succ.pid(),
                        prepare_ms,
                        total_ms = t.elapsed().as_secs_f64() * 1e3,
                        "spare ready"
                    );
                    *slot = Some(succ);
                } else {
                    drop(slot);
                    succ.abort("a spare is ready already");
                }
            }
            Err(e) => {
                tracing::warn!("spare successor failed to prepare: {e}");
                succ.abort(&e.to_string());
            }
        }
    });
}

/// A device's lock: taken (poison ignored: the state is saved as it is, the
/// successor checks it), or after a crash only tried for a moment.
fn lock_device<T: ?Sized>(m: &Mutex<T>, crash: bool) -> Option<MutexGuard<'_, T>> {
    if crash { try_lock_for(m) } else { Some(m.lock().unwrap_or_else(|p| p.into_inner())) }
}

/// A lock after a crash: one held by a live thread is released within
/// microseconds; one held by the dead thread never is. Poison is ignored
/// (the state is saved as it is, the successor checks it).
fn try_lock_for<T: ?Sized>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + Duration::from_micros(500);
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(50))
            }
            Err(_) => return None,
        }
    }
}

impl WorkerWatch {
    /// Busy on this thread until the guard drops.
    fn watch(&self) -> impl Drop + '_ {
        use std::sync::atomic::Ordering;
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::Release);
        self.busy.store(true, Ordering::Release);
        struct Done<'a>(&'a WorkerWatch);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.busy.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        Done(self)
    }
}

/// What the save paths (planned and crash) need, shared with the crash
/// rescuer thread.
pub(crate) struct Core {
    pub(crate) cfg: VmConfig,
    pub(crate) vcpus: Vec<Arc<VcpuControl>>,
    serial: Arc<Mutex<Serial>>,
    /// The UART's transmit ledger and committed registers, readable after a
    /// crash without the UART's lock.
    serial_tx: Arc<staunch_devices::serial_tx::TxLedger>,
    serial_published: Arc<Mutex<staunch_devices::serial::SerialState>>,
    i8042: Arc<Mutex<I8042>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    shadows: Vec<Arc<Mutex<staunch_devices::virtio::mmio::MmioState>>>,
    pub(crate) workers: Vec<WorkerWatch>,
    /// The thread saving the VM for a planned handover, watched for hangs
    /// like the others: the guest is paused while it works.
    pub(crate) saver: WorkerWatch,
    /// The disks' descriptors and vhost-user links, handed to a successor.
    disk_files: Vec<Slot>,
    console: Console,
    msrs: Vec<u32>,
    generation: u64,
    /// A successor process with its VM already built around our memory,
    /// waiting to take over (crash or upgrade).
    spare: Mutex<Option<Successor>>,
    // Memory slots point into `ram`; both live as long as the VM.
    vm: Vm,
    ram: GuestRam,
}

/// A queue worker as the watchdog sees it.
#[derive(Default)]
pub(crate) struct WorkerWatch {
    pub(crate) busy: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) served: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) tid: Arc<std::sync::atomic::AtomicI32>,
}

pub struct RunningVm {
    core: Arc<Core>,
    threads: Vec<JoinHandle<StopReason>>,
    events_tx: Sender<VmEvent>,
    events: Receiver<VmEvent>,
    started: Instant,
    first_output: Arc<OnceLock<Instant>>,
    workers: Vec<QueueWorker>,
    last_recovery: Option<serde_json::Value>,
    upgrade_failures: u64,
    last_upgrade_error: Option<String>,
    snapshotted: bool,
    _irqs: Vec<Arc<EventFd>>,
    api: Option<api::Server>,
}

impl Core {
    /// Capture the whole VM. The vCPUs must be paused.
    /// Also returns duplicates of the descriptors the record names, which
    /// must stay open until the successor has them.
    pub(crate) fn save(
        &self,
        cause: &str,
        paused_at_ns: u64,
        crash: bool,
    ) -> Result<(VmRecord, Vec<std::fs::File>), VmmError> {
        let devices = self.devices(&self.hold_transports(crash), crash);
        self.save_with(cause, paused_at_ns, crash, devices)
    }

    fn save_with(
        &self,
        cause: &str,
        paused_at_ns: u64,
        crash: bool,
        devices: DevicesState,
    ) -> Result<(VmRecord, Vec<std::fs::File>), VmmError> {
        let (files, links) = devices::handover(&self.disk_files)?;
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let (msrs, index) = (self.msrs.clone(), v.index);
            let snap = v.call(move |fd| state::save_vcpu(fd, index, &msrs)).ok_or(VmmError::VcpuGone(index))??;
            vcpus.push(snap);
        }
        let vm = state::save_vm(&self.vm.fd)?;
        let ram =
            self.ram.regions.iter().map(|r| RamInfo { gpa: r.gpa, size: r.size, fd: r.file.as_raw_fd() }).collect();
        let rec = VmRecord {
            version: record::VERSION,
            cause: cause.into(),
            config: self.cfg.clone(),
            ram,
            vcpus,
            vm,
            devices,
            paused_at_ns,
            replay_in_flight: crash,
            generation: self.generation,
            disk_fds: files.iter().map(|f| f.as_raw_fd()).collect(),
            vhost: links,
            console_fds: Vec::new(),
            pending_writes: if crash {
                self.vcpus.iter().filter_map(|v| v.pending_write()).collect()
            } else {
                Vec::new()
            },
            vcpu_runs: self.vcpus.iter().map(|v| v.runs()).collect(),
        };
        Ok((rec, files))
    }

    /// The virtio transports' locks: held while their state is read (and,
    /// by a handover, until the process ends, so queue workers can no longer
    /// touch the guest). After a crash a lock may belong to the dead thread:
    /// it is only tried for a moment, and `None` means "use the copy the
    /// transport published".
    fn hold_transports(&self, crash: bool) -> Vec<Option<MutexGuard<'_, MmioTransport>>> {
        self.transports.iter().map(|t| lock_device(t, crash)).collect()
    }

    /// Every device's state, the transports' from `held`. After a crash a
    /// device whose lock cannot be had is saved from its published copy
    /// (transports) or as at power-on (UART, i8042).
    fn devices(&self, held: &[Option<MutexGuard<'_, MmioTransport>>], crash: bool) -> DevicesState {
        DevicesState {
            serial: self.serial_state(crash),
            i8042: lock_device(&self.i8042, crash).map(|k| k.state()).unwrap_or_default(),
            virtio: held
                .iter()
                .zip(&self.shadows)
                .map(|(g, sh)| match g {
                    Some(g) => g.state(),
                    None => sh.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                })
                .collect(),
        }
    }

    /// The UART's state. After a crash its lock may be the dead thread's:
    /// the published registers and the lock-free transmit ledger then, with
    /// the count of bytes the console file holds read from the file itself.
    fn serial_state(&self, crash: bool) -> staunch_devices::serial::SerialState {
        if crash
            && let Console::File(f) = &self.console
            && let Ok(m) = f.metadata()
        {
            self.serial_tx.sunk_from_len(m.len());
        }
        match lock_device(&self.serial, crash) {
            Some(s) => s.state(),
            None => Serial::state_after_crash(&self.serial_published, &self.serial_tx),
        }
    }

    pub(crate) fn take_spare(&self) -> Option<Successor> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Phase 1 of a handover, while the guest runs: the successor maps our
    /// memory and builds its VM. Returns its preparation time.
    fn prepare(&self, succ: &Successor) -> Result<f64, VmmError> {
        let ram = self.ram.regions.iter().map(|r| (r.gpa, r.size)).collect();
        let fds: Vec<RawFd> = self.ram.regions.iter().map(|r| r.file.as_raw_fd()).collect();
        succ.link.send(&Msg::Prepare { config: Box::new(self.cfg.clone()), ram }, &fds)?;
        match succ.link.recv(Some(Duration::from_secs(30)))? {
            (Msg::Ready { prepare_ms, .. }, _) => Ok(prepare_ms),
            (m, _) => Err(HandoverError::Unexpected(format!("{m:?}")).into()),
        }
    }

    /// Phase 2, the vCPUs are paused: take the queue workers out for good
    /// (their devices' locks stay held until this process ends), save, send
    /// the record with the disk and console descriptors, wait until the
    /// successor has restored everything, commit. On an error nothing was
    /// committed; the locks are released again and the caller rolls back.
    /// After a crash a lock may belong to the dead thread: such a device is
    /// saved from the copy it published.
    pub(crate) fn hand_over(&self, succ: &Successor, cause: &str, t0: u64, crash: bool) -> Result<(), VmmError> {
        // The successor connects to our vhost-user backends (superseding
        // our connections): ours must not take them back.
        staunch_vhost::frontend::freeze();
        let held = self.hold_transports(crash);
        let devices = self.devices(&held, crash);
        let sent = (|| -> Result<(), VmmError> {
            let (rec, files) = self.save_with(cause, t0, crash, devices)?;
            let (memfd, console) = {
                // Watched for hangs while it works on its own (not while it
                // waits for vCPU threads, which a busy host may delay).
                let _watched = (!crash).then(|| self.saver.watch());
                let (memfd, console, _) = self.preserve(rec)?;
                (memfd, console)
            };
            let mut fds = vec![memfd.as_raw_fd()];
            fds.extend(files.iter().map(|f| f.as_raw_fd()));
            fds.extend(console.iter().map(|f| f.as_raw_fd()));
            let msg = Msg::Record { disks: files.len() as u32, consoles: console.len() as u32 };
            succ.link.send(&msg, &fds)?;
            match succ.link.recv(Some(Duration::from_secs(10)))? {
                (Msg::Restored, _) => {}
                (m, _) => return Err(HandoverError::Unexpected(format!("{m:?}")).into()),
            }
            if !crash {
                // From the commit on the successor owns the guest: the crash
                // path must not revive this copy. Before it, a fault here is
                // an ordinary crash, recovered like any other.
                crate::crash::disarm();
            }
            succ.link.send(&Msg::Commit, &[])?;
            Ok(())
        })();
        if sent.is_ok() {
            std::mem::forget(held);
        } else {
            staunch_vhost::frontend::thaw();
        }
        sent
    }

    /// Encode `rec` into a memfd for a successor, with duplicates of the
    /// console's descriptors (alive as long as the returned handles are).
    fn preserve(&self, mut rec: VmRecord) -> Result<(std::fs::File, Vec<OwnedFd>, usize), VmmError> {
        let console: Vec<OwnedFd> = match &self.console {
            Console::None => Vec::new(),
            Console::File(f) => f.try_clone().map(|f| vec![f.into()]).unwrap_or_default(),
            Console::Unix(u) => match u.handover() {
                Ok((l, c)) => std::iter::once(OwnedFd::from(l)).chain(c.map(Into::into)).collect(),
                Err(_) => Vec::new(),
            },
        };
        rec.console_fds = console.iter().map(|f| f.as_raw_fd()).collect();
        let mut bytes = record::encode(&rec)?;
        if staunch_fault::hit(&staunch_fault::RECORD_SAVE).map_err(|e| VmmError::Device(e.to_string()))? {
            // Injected corruption after the CRC: the successor must refuse it.
            let n = bytes.len();
            bytes[n / 2] ^= 0x5a;
        }
        Ok((record::to_memfd(&bytes)?, console, bytes.len()))
    }

    /// The crash path: exec a fresh image of this binary, which rebuilds the
    /// VM from the record around the same memfds.
    pub(crate) fn exec_successor(
        &self,
        cause: &str,
        t0: u64,
        crash: bool,
    ) -> Result<std::convert::Infallible, VmmError> {
        use std::os::unix::process::CommandExt;
        let (rec, files) = self.save(cause, t0, crash)?;
        let (memfd, console, len) = self.preserve(rec)?;
        for fd in &console {
            record::keep_across_exec(fd).map_err(RecordError::Io)?;
        }
        for r in &self.ram.regions {
            record::keep_across_exec(&r.file).map_err(RecordError::Io)?;
        }
        record::keep_across_exec(&memfd).map_err(RecordError::Io)?;
        for f in &files {
            record::keep_across_exec(f).map_err(RecordError::Io)?;
        }
        // The very image that runs now, even if its file was replaced or
        // deleted since (the magic link keeps the inode).
        let bin = PathBuf::from("/proc/self/exe");
        let save_ms = (record::monotonic_ns() - t0) as f64 / 1e6;
        tracing::info!(save_ms, bytes = len, "record saved; exec {}", bin.display());
        events::emit(
            self.cfg.events.as_deref(),
            "exec",
            json!({"cause": cause, "save_ms": save_ms, "record_bytes": len, "binary": bin}),
        );
        defer_teardown();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["vmm", "resume", "--preserved-fd", &memfd.as_raw_fd().to_string()]);
        // Failpoints armed from the environment were for this image only.
        cmd.env_remove("STAUNCH_FAILPOINTS");
        // Where to report if the record turns out unusable.
        if let Some(ev) = &self.cfg.events {
            cmd.arg("--events").arg(ev);
        }
        staunch_vhost::frontend::freeze();
        let err = cmd.exec();
        staunch_vhost::frontend::thaw();
        Err(VmmError::Exec { path: bin.display().to_string(), err })
    }
}

/// A new VM over (inherited) guest memory with its vCPUs created: the slow
/// part of a rebuild, which a standby successor does before the guest pauses.
struct Prepared {
    vm: Vm,
    ram: GuestRam,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
}

impl Prepared {
    fn new(cfg: &VmConfig, regions: Vec<RamRegion>) -> Result<Self, VmmError> {
        let ram = GuestRam::from_regions(regions)?;
        let vm = Vm::new(&cfg.kvm_device, &ram)?;
        let vcpus = (0..cfg.vcpus).map(|i| vm.create_vcpu(i, cfg.vcpus)).collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared { vm, ram, vcpus })
    }

    /// Devices and vCPU state from `rec`; nothing runs yet.
    fn restore(
        &self,
        rec: &VmRecord,
        disks: Vec<Dev>,
        output: Option<Box<dyn Write + Send>>,
    ) -> Result<Devices, VmmError> {
        if rec.vcpus.len() != self.vcpus.len() {
            return Err(VmmError::Mismatch(format!("record has {} vCPUs, VM {}", rec.vcpus.len(), self.vcpus.len())));
        }
        let want: Vec<(u64, u64)> = rec.ram.iter().map(|r| (r.gpa, r.size)).collect();
        let have: Vec<(u64, u64)> = self.ram.regions.iter().map(|r| (r.gpa, r.size)).collect();
        if want != have {
            return Err(VmmError::Mismatch(format!("record's memory {want:x?}, VM's {have:x?}")));
        }
        let from = Inherited {
            devices: Some((&rec.devices, rec.replay_in_flight)),
            console_fds: &rec.console_fds,
            continue_log: true,
        };
        let devs = assemble(&rec.config, &self.vm, &self.ram, output, disks, from)?;
        // The guest's clocks run on through the pause: it sees the time it
        // lost (and can measure it), as with a vCPU that simply did not run.
        let paused_ns = record::monotonic_ns().saturating_sub(rec.paused_at_ns);
        let khz = self.vcpus.first().and_then(|fd| fd.get_tsc_khz().ok()).unwrap_or(0) as u128;
        let ticks = (paused_ns as u128 * khz / 1_000_000) as u64;
        state::restore_vm(&self.vm.fd, &rec.vm, paused_ns)?;
        for s in &rec.vcpus {
            let fd = self.vcpus.get(s.index as usize).ok_or(VmmError::VcpuGone(s.index))?;
            state::restore_vcpu(fd, s, ticks)?;
        }
        Ok(devs)
    }
}

impl RunningVm {
    /// Build the VM from `cfg` and start its vCPUs.
    pub fn start(cfg: &VmConfig) -> Result<Self, VmmError> {
        Self::start_with_output(cfg, None)
    }

    /// Like [`start`](Self::start), but serial output goes to `output`
    /// (overriding `cfg.serial`); for embedding the VMM in tools.
    pub fn start_with_output(cfg: &VmConfig, output: Option<Box<dyn Write + Send>>) -> Result<Self, VmmError> {
        Self::boot(cfg, output, false)
    }

    /// Cold reboot: a new VM from the kernel, the guest's state discarded;
    /// a file console continues the same log.
    pub fn reboot(cfg: &VmConfig) -> Result<Self, VmmError> {
        Self::boot(cfg, None, true)
    }

    fn boot(cfg: &VmConfig, output: Option<Box<dyn Write + Send>>, continue_log: bool) -> Result<Self, VmmError> {
        cfg.validate()?;
        let started = Instant::now();
        staunch_boot::detect(&cfg.kernel)?;
        let disks = devices::open(cfg, &[], &[])?;
        let ram = GuestRam::new(cfg.mem_mib)?;
        let vm = Vm::new(&cfg.kvm_device, &ram)?;
        let devs = assemble(cfg, &vm, &ram, output, disks, Inherited { continue_log, ..Default::default() })?;
        let cmdline = format!("{}{}", cfg.cmdline.trim(), devs.cmdline_extra);
        let boot =
            staunch_boot::load(&ram.mem, ram.bytes, &cfg.kernel, cfg.initrd.as_deref(), cmdline.trim(), &devs.acpi)?;
        let mut fds = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = vm.create_vcpu(i, cfg.vcpus)?;
            let st = staunch_boot::cpu_boot_state(boot.entry, i as u64);
            staunch_kvm::vcpu::configure(&fd, i, &st, i == 0 || boot.smp_direct)?;
            fds.push(fd);
        }
        let msrs = state::msr_list(&vm.kvm, &fds[0])?;
        tracing::info!(vcpus = cfg.vcpus, mem_mib = cfg.mem_mib, entry = format_args!("{:#x}", boot.entry), format = ?boot.format, "VM started");
        Self::launch(cfg.clone(), vm, ram, devs, fds, msrs, started, 0, &[])
    }

    /// Rebuild a VM from a preserved record, mapping the same memfds.
    pub fn restore(rec: VmRecord, output: Option<Box<dyn Write + Send>>) -> Result<Self, VmmError> {
        let started = Instant::now();
        let t0 = record::monotonic_ns();
        let regions = rec
            .ram
            .iter()
            .map(|r: &RamInfo| {
                // SAFETY: the record names memfds this process inherited; we
                // take ownership of each exactly once.
                let file = unsafe { std::fs::File::from_raw_fd(r.fd) };
                RamRegion { gpa: r.gpa, size: r.size, file }
            })
            .collect();
        let lap = |what: &str| tracing::debug!(ms = (record::monotonic_ns() - t0) as f64 / 1e6, "restore: {what}");
        let disks = devices::open(&rec.config, &rec.disk_fds, &rec.vhost)?;
        let p = Prepared::new(&rec.config, regions)?;
        lap("VM created, memory slots registered");
        let devs = p.restore(&rec, disks, output)?;
        lap("devices and vCPUs restored");
        let restore_ms = (record::monotonic_ns() - t0) as f64 / 1e6;
        Self::resume_restored(rec, p, devs, started, json!({"restore_ms": restore_ms}))
    }

    /// Start a restored VM's vCPUs and report the recovery.
    fn resume_restored(
        rec: VmRecord,
        p: Prepared,
        devs: Devices,
        started: Instant,
        mut report: serde_json::Value,
    ) -> Result<Self, VmmError> {
        // The saved MSRs are exactly those this host let us read.
        let msrs: Vec<u32> = rec.vcpus.first().map(|v| v.msrs.iter().map(|e| e.index).collect()).unwrap_or_default();
        // The guest is past the writes a crash cut short (the crash path
        // completed them in KVM): the devices see them now, after the commit
        // and before any vCPU runs, and skip what they had already done.
        let mut stop = None;
        for w in &rec.pending_writes {
            let data = &w.data[..(w.len as usize).min(8)];
            let r = staunch_devices::access::replay(w.stamp, || {
                if w.mmio { devs.handler.mmio_write(w.addr, data) } else { devs.handler.pio_write(w.addr as u16, data) }
            });
            stop = stop.or(r.map(|r| (w.vcpu, r)));
        }
        let replayed = rec.pending_writes.len();
        let mut me =
            Self::launch(rec.config, p.vm, p.ram, devs, p.vcpus, msrs, started, rec.generation + 1, &rec.vcpu_runs)?;
        if let Some((vcpu, r)) = stop {
            // A replayed power-off or reset: the guest asked for it.
            let _ = me.events_tx.send(VmEvent::Stopped(vcpu, r));
        }
        report["replayed_writes"] = json!(replayed);
        // A restored device may have had work queued when it was saved.
        for w in &me.workers {
            let _ = w.evt.write(1);
        }
        let pause_ms = record::monotonic_ns().saturating_sub(rec.paused_at_ns) as f64 / 1e6;
        report["cause"] = json!(rec.cause);
        report["generation"] = json!(me.core.generation);
        report["guest_pause_ms"] = json!(pause_ms);
        report["vcpus"] = json!(me.core.vcpus.len());
        report["outcome"] = json!("recovered");
        events::emit(me.core.cfg.events.as_deref(), "resumed", report.clone());
        me.last_recovery = Some(report);
        Ok(me)
    }

    /// The successor's side of a warm upgrade (see [`crate::handover`]):
    /// prepare while the guest runs, restore once it is paused, run on
    /// `Commit`. Any failure before `Commit` is reported over the link, and
    /// the old VMM resumes the guest.
    pub fn standby(link: &Link) -> Result<Self, VmmError> {
        let r = Self::standby_inner(link);
        if let Err(e) = &r {
            let _ = link.send(&Msg::Failed { error: e.to_string() }, &[]);
        }
        r
    }

    fn standby_inner(link: &Link) -> Result<Self, VmmError> {
        let started = Instant::now();
        let unexpected = |m: Msg| VmmError::Handover(HandoverError::Unexpected(format!("{m:?}")));
        let (msg, fds) = link.recv(Some(Duration::from_secs(30)))?;
        let Msg::Prepare { config, ram } = msg else { return Err(unexpected(msg)) };
        if fds.len() != ram.len() {
            return Err(VmmError::Mismatch(format!("{} memory regions, {} descriptors", ram.len(), fds.len())));
        }
        let regions = ram
            .iter()
            .zip(fds)
            .map(|(&(gpa, size), fd)| RamRegion { gpa, size, file: std::fs::File::from(fd) })
            .collect();
        let p = Prepared::new(&config, regions)?;
        let prepare_ms = started.elapsed().as_secs_f64() * 1e3;
        link.send(&Msg::Ready { pid: std::process::id(), prepare_ms }, &[])?;

        // The old VMM pauses the guest now and sends its state.
        let (msg, fds) = link.recv(None)?;
        let t0 = record::monotonic_ns();
        let Msg::Record { disks, consoles } = msg else { return Err(unexpected(msg)) };
        let (disks, consoles) = (disks as usize, consoles as usize);
        if fds.len() != 1 + disks + consoles {
            return Err(VmmError::Mismatch(format!("{} descriptors with the record", fds.len())));
        }
        let mut fds = fds.into_iter();
        let mut memfd = std::fs::File::from(fds.next().ok_or(VmmError::Mismatch("no record".into()))?);
        let mut rec = record::decode(&record::read_fd(&mut memfd)?)?;
        // Descriptor numbers in the record are the old process's; ours differ.
        let mut raw = fds.map(IntoRawFd::into_raw_fd);
        rec.disk_fds = raw.by_ref().take(disks).collect();
        rec.console_fds = raw.collect();
        for (info, region) in rec.ram.iter_mut().zip(&p.ram.regions) {
            info.fd = region.file.as_raw_fd();
        }
        let disks = devices::open(&rec.config, &rec.disk_fds, &rec.vhost)?;
        let devs = p.restore(&rec, disks, None)?;
        let restore_ms = (record::monotonic_ns() - t0) as f64 / 1e6;
        link.send(&Msg::Restored, &[])?;
        match link.recv(Some(Duration::from_secs(10)))? {
            (Msg::Commit, _) => {}
            (m, _) => return Err(unexpected(m)),
        }
        let report = json!({"restore_ms": restore_ms, "prepare_ms": prepare_ms, "mode": "standby"});
        Self::resume_restored(rec, p, devs, started, report)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        cfg: VmConfig,
        vm: Vm,
        ram: GuestRam,
        devs: Devices,
        fds: Vec<kvm_ioctls::VcpuFd>,
        msrs: Vec<u32>,
        started: Instant,
        generation: u64,
        runs: &[u64],
    ) -> Result<Self, VmmError> {
        let (events_tx, events) = channel();
        let mut vcpus = Vec::new();
        let mut threads = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let ctl = VcpuControl::continuing(i as u8, runs.get(i).copied().unwrap_or(0));
            let (h, tx, c) = (devs.handler.clone(), events_tx.clone(), ctl.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let r = staunch_kvm::vcpu::run(fd, &c, &*h);
                    let _ = tx.send(VmEvent::Stopped(c.index, r.clone()));
                    r
                })
                .map_err(VmmError::Thread)?;
            vcpus.push(ctl);
            threads.push(t);
        }
        let api = match &cfg.api_socket {
            Some(p) => Some(
                api::serve(p, events_tx.clone()).map_err(|err| VmmError::Api { path: p.display().to_string(), err })?,
            ),
            None => None,
        };
        let shadows = devs.transports.iter().map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).shadow()).collect();
        let watches = devs
            .workers
            .iter()
            .map(|w| WorkerWatch { busy: w.busy.clone(), served: w.served.clone(), tid: w.tid.clone() })
            .collect();
        let (serial_tx, serial_published) = {
            let s = devs.serial.lock().unwrap_or_else(|p| p.into_inner());
            (s.ledger(), s.published())
        };
        let core = Arc::new(Core {
            cfg,
            vcpus,
            serial: devs.serial,
            serial_tx,
            serial_published,
            i8042: devs.i8042,
            transports: devs.transports,
            shadows,
            workers: watches,
            saver: WorkerWatch::default(),
            disk_files: devs.disk_files,
            console: devs.console,
            msrs,
            generation,
            spare: Mutex::new(None),
            vm,
            ram,
        });
        crate::crash::arm(core.clone()).map_err(VmmError::Thread)?;
        spawn_spare(&core);
        Ok(RunningVm {
            core,
            threads,
            events_tx,
            events,
            started,
            first_output: devs.first_output,
            workers: devs.workers,
            last_recovery: None,
            upgrade_failures: 0,
            last_upgrade_error: None,
            snapshotted: false,
            _irqs: devs.irqs,
            api,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.core.cfg
    }

    pub fn generation(&self) -> u64 {
        self.core.generation
    }

    /// A handle other threads can use to send control requests.
    pub fn control(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    pub fn pause(&self) {
        for v in &self.core.vcpus {
            v.pause();
        }
    }

    pub fn resume(&self) {
        for v in &self.core.vcpus {
            v.resume();
        }
    }

    pub fn vcpu_states(&self) -> Vec<staunch_kvm::VcpuState> {
        self.core.vcpus.iter().map(|v| v.state()).collect()
    }

    /// Send bytes to the guest's serial port.
    pub fn send_input(&self, bytes: &[u8]) {
        feed(&self.core.serial, bytes);
    }

    /// Warm upgrade (RootHammer's warm-VM reboot) through a standby
    /// successor running `binary` (default: this very image): it builds its
    /// VM around the same memfds while the guest runs; the guest pauses only
    /// for the state to cross over. On success the VM runs in the successor
    /// (its pid is returned) and this process must leave without touching
    /// the guest; on failure the guest runs on here, unharmed.
    pub fn upgrade(&self, binary: Option<PathBuf>) -> Result<u32, VmmError> {
        let r = self.upgrade_inner(binary);
        if let Err(e) = &r {
            events::emit(
                self.core.cfg.events.as_deref(),
                "upgrade-failed",
                json!({"error": e.to_string(), "outcome": "VM continues"}),
            );
        }
        r
    }

    fn upgrade_inner(&self, binary: Option<PathBuf>) -> Result<u32, VmmError> {
        let started = Instant::now();
        // The ready spare runs this very image; a different binary needs its
        // own successor, prepared now while the guest runs.
        let spare = if binary.is_none() { self.core.take_spare() } else { None };
        let (succ, prepare_ms) = match spare {
            Some(spare) => (spare, 0.0),
            None => {
                let bin = binary.clone().unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
                let succ = Successor::spawn(&bin)?;
                match self.core.prepare(&succ) {
                    Ok(ms) => (succ, ms),
                    Err(e) => {
                        succ.abort(&e.to_string());
                        return Err(e);
                    }
                }
            }
        };
        let ready_ms = started.elapsed().as_secs_f64() * 1e3;
        let t0 = record::monotonic_ns();
        self.pause();
        match self.core.hand_over(&succ, "upgrade", t0, false) {
            Ok(()) => {
                let pid = succ.pid();
                let commit_ms = (record::monotonic_ns() - t0) as f64 / 1e6;
                events::emit(
                    self.core.cfg.events.as_deref(),
                    "handover",
                    json!({"successor_pid": pid, "binary": binary, "prepare_ms": prepare_ms, "ready_ms": ready_ms,
                           "paused_to_commit_ms": commit_ms}),
                );
                Ok(pid)
            }
            Err(e) => {
                let pid = succ.pid();
                succ.abort(&e.to_string());
                self.resume();
                crate::crash::arm(self.core.clone()).map_err(VmmError::Thread)?;
                spawn_spare(&self.core);
                Err(VmmError::Successor { pid, err: Box::new(e) })
            }
        }
    }

    fn handle_api(&mut self, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::Pause {} => {
                self.pause();
                ApiResponse::ok(json!({}))
            }
            ApiRequest::Resume {} => {
                self.resume();
                ApiResponse::ok(json!({}))
            }
            ApiRequest::Status {} => ApiResponse::ok(json!({
                "generation": self.core.generation,
                "pid": std::process::id(),
                "vcpus": self.vcpu_states().iter().map(|s| format!("{s:?}")).collect::<Vec<_>>(),
                "exits": self.core.vcpus.iter().map(|v| v.exits.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>(),
                "last_recovery": self.last_recovery,
                "upgrade_failures": self.upgrade_failures,
                "spare": self.core.spare.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.pid()),
                "last_upgrade_error": self.last_upgrade_error,
                "vhost_user": devices::status(&self.core.disk_files),
            })),
            ApiRequest::Reboot {} => ApiResponse::ok(json!({"rebooting": true})),
            ApiRequest::Snapshot { path } => match self.snapshot(&path) {
                Ok(v) => v,
                Err(e) => {
                    self.resume();
                    ApiResponse::err(e.to_string())
                }
            },
            // The main loop runs these itself.
            ApiRequest::Upgrade { .. } | ApiRequest::Failpoint { .. } => ApiResponse::err("run by the VM's main loop"),
        }
    }

    /// The saved-VM path: pause, write state and memory to `path`. The VM
    /// stays paused; `wait` then stops it.
    fn snapshot(&mut self, path: &std::path::Path) -> Result<ApiResponse, VmmError> {
        let t0 = record::monotonic_ns();
        self.pause();
        let (rec, _) = self.core.save("snapshot", t0, false)?;
        let files: Vec<&std::fs::File> = self.core.ram.regions.iter().map(|r| &r.file).collect();
        let bytes = record::write_snapshot(path, &rec, &files)?;
        let ms = (record::monotonic_ns() - t0) as f64 / 1e6;
        events::emit(self.core.cfg.events.as_deref(), "snapshot", json!({"path": path, "bytes": bytes, "save_ms": ms}));
        self.snapshotted = true;
        Ok(ApiResponse::ok(json!({"path": path, "bytes": bytes, "save_ms": ms})))
    }

    /// Rebuild a VM saved by a snapshot.
    pub fn restore_snapshot(path: &std::path::Path) -> Result<Self, VmmError> {
        let t0 = record::monotonic_ns();
        let (mut rec, files) = record::read_snapshot(path)?;
        // The memfds are owned by the restored VM from here on.
        for f in files {
            std::mem::forget(f);
        }
        rec.paused_at_ns = t0;
        rec.cause = "snapshot restore".into();
        let me = Self::restore(rec, None)?;
        Ok(me)
    }

    /// Serve control requests until a vCPU stops the VM (or `timeout`).
    pub fn wait(mut self, timeout: Option<Duration>) -> VmExit {
        let deadline = timeout.map(|t| Instant::now() + t);
        let reason = loop {
            let ev = match deadline {
                Some(d) => match self.events.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                        break StopReason::Requested;
                    }
                },
                None => match self.events.recv() {
                    Ok(ev) => ev,
                    Err(_) => break StopReason::Requested,
                },
            };
            match ev {
                VmEvent::Stopped(_, r) => break r,
                VmEvent::Api(ApiRequest::Upgrade { binary }, reply) => {
                    // Answered at once; clients poll `status` for the new
                    // generation (or for `upgrade_failures`). The reply is on
                    // the socket before this process may leave.
                    reply.send_and_wait(ApiResponse::ok(json!({"upgrading": true})));
                    match self.upgrade(binary) {
                        Ok(pid) => {
                            // Nothing here may touch the guest any more: no
                            // joins, no teardown; the process ends next.
                            self.refuse_pending(&format!("the VM moved to process {pid}: ask again"));
                            let exit = VmExit {
                                reason: StopReason::HandedOver(pid),
                                first_output: self.first_output.get().map(|t| t.duration_since(self.started)),
                                runtime: self.started.elapsed(),
                                exits: 0,
                            };
                            std::mem::forget(self);
                            return exit;
                        }
                        Err(e) => {
                            tracing::warn!("upgrade failed; VM continues: {e}");
                            self.upgrade_failures += 1;
                            self.last_upgrade_error = Some(e.to_string());
                        }
                    }
                }
                VmEvent::Api(ApiRequest::Failpoint { spec }, reply) => match staunch_fault::parse(&spec) {
                    // Answered before arming: the fault may end this process
                    // at once, and the client must have its reply first.
                    Ok(items) => {
                        reply.send_and_wait(ApiResponse::ok(json!({"armed": spec})));
                        for (p, a, n) in items {
                            staunch_fault::arm(p, a, n);
                        }
                    }
                    Err(e) => reply.send(ApiResponse::err(e.to_string())),
                },
                VmEvent::Api(req, reply) => {
                    if matches!(req, ApiRequest::Reboot {}) {
                        reply.send_and_wait(ApiResponse::ok(json!({"rebooting": true})));
                        break StopReason::ColdReboot;
                    }
                    let resp = self.handle_api(req);
                    if self.snapshotted {
                        // The VM stops next: the reply must be out first.
                        reply.send_and_wait(resp);
                        break StopReason::Requested;
                    }
                    reply.send(resp);
                }
            }
        };
        self.finish(reason)
    }

    /// Stop every vCPU now.
    pub fn stop(self) -> VmExit {
        self.finish(StopReason::Requested)
    }

    /// Answer every request still queued, so no client of a VMM that is
    /// leaving reads a truncated reply or none.
    fn refuse_pending(&self, why: &str) {
        if let Some(api) = &self.api {
            api.close(why);
        }
        while let Ok(ev) = self.events.try_recv() {
            if let VmEvent::Api(_, reply) = ev {
                reply.send_and_wait(ApiResponse::err(why));
            }
        }
    }

    fn finish(self, reason: StopReason) -> VmExit {
        self.refuse_pending("the VM stopped");
        crate::crash::disarm();
        if let Some(s) = self.core.take_spare() {
            s.abort("the VM stopped");
        }
        for v in &self.core.vcpus {
            v.stop();
        }
        for t in self.threads {
            let _ = t.join();
        }
        for w in self.workers {
            w.stop();
        }
        if let Some(p) = &self.core.cfg.api_socket {
            let _ = std::fs::remove_file(p);
        }
        let exits = self.core.vcpus.iter().map(|v| v.exits.load(std::sync::atomic::Ordering::Relaxed)).sum();
        VmExit {
            reason,
            first_output: self.first_output.get().map(|t| t.duration_since(self.started)),
            runtime: self.started.elapsed(),
            exits,
        }
    }
}
