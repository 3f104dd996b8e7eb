//! Assemble and run one VM.

use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::serial_out::{Stamped, StdoutNow, UnixConsole, pump};
use staunch_boot::{BootError, layout};
use staunch_devices::legacy::{I8042, POWER_PORT, PowerPort};
use staunch_devices::serial::Serial;
use staunch_devices::virtio::blk::{BlkError, Block};
use staunch_devices::virtio::mmio::MmioTransport;
use staunch_devices::{Bus, BusError, DeviceAction, Interrupt};
use staunch_kvm::{
    ExitHandler, GuestRam, MemError, StopReason, VcpuControl, VcpuError, Vm, VmError,
};
use std::io::Write;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
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
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("serial {what}: {err}")]
    Serial { what: String, err: std::io::Error },
    #[error("interrupt line {gsi}: {err}")]
    Irq { gsi: u32, err: String },
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
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

struct Exits {
    pio: Bus,
    mmio: Bus,
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
        self.pio.write(port as u64, data).and_then(to_stop)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<StopReason> {
        self.mmio.write(addr, data).and_then(to_stop)
    }
}

const COM1: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;

pub struct RunningVm {
    vcpus: Vec<Arc<VcpuControl>>,
    threads: Vec<JoinHandle<StopReason>>,
    stopped: Receiver<(u8, StopReason)>,
    started: Instant,
    first_output: Arc<OnceLock<Instant>>,
    serial: Arc<Mutex<Serial>>,
    workers: Vec<QueueWorker>,
    // Kept alive for the VM's lifetime: memory slots point into `ram`.
    _vm: Vm,
    _ram: GuestRam,
    _irqs: Vec<Arc<EventFd>>,
}

/// Serves one virtio device's queue notifications off the vCPU thread: the
/// guest's QueueNotify write is caught in the kernel by an ioeventfd (no exit
/// to userspace) and this thread processes the queue while the vCPU runs on.
struct QueueWorker {
    evt: Arc<EventFd>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: JoinHandle<()>,
}

impl QueueWorker {
    fn spawn(
        vm: &Vm,
        base: u64,
        dev: Arc<Mutex<MmioTransport>>,
        name: &str,
    ) -> Result<Self, VmmError> {
        let queues = dev.lock().unwrap_or_else(|p| p.into_inner()).queue_count();
        let ioerr = |e: String| VmmError::Irq {
            gsi: 0,
            err: format!("ioeventfd: {e}"),
        };
        let evt = Arc::new(EventFd::new(0).map_err(|e| ioerr(e.to_string()))?);
        // One eventfd for every queue of the device; the worker scans them all.
        for q in 0..queues as u32 {
            let addr = kvm_ioctls::IoEventAddress::Mmio(base + MmioTransport::QUEUE_NOTIFY);
            vm.fd
                .register_ioevent(&evt, &addr, q)
                .map_err(|e| ioerr(e.to_string()))?;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (e, s) = (evt.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while e.read().is_ok() && !s.load(std::sync::atomic::Ordering::Acquire) {
                    let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                    for q in 0..queues as u32 {
                        d.notify(q);
                    }
                }
            })
            .map_err(VmmError::Thread)?;
        Ok(QueueWorker { evt, stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.evt.write(1);
        let _ = self.thread.join();
    }
}

/// Feed bytes to the UART, waiting while its FIFO is full (the guest drains it).
fn feed(serial: &Mutex<Serial>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_input(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl RunningVm {
    /// Build the VM from `cfg` and start its vCPUs.
    pub fn start(cfg: &VmConfig) -> Result<Self, VmmError> {
        Self::start_with_output(cfg, None)
    }

    /// Like [`start`](Self::start), but serial output goes to `output`
    /// (overriding `cfg.serial`); for embedding the VMM in tools.
    pub fn start_with_output(
        cfg: &VmConfig,
        output: Option<Box<dyn Write + Send>>,
    ) -> Result<Self, VmmError> {
        cfg.validate()?;
        let started = Instant::now();
        staunch_boot::detect(&cfg.kernel)?;
        let mut disks = Vec::new();
        for d in &cfg.disks {
            disks.push(Block::open(&d.path, d.read_only)?);
        }
        let ram = GuestRam::new(cfg.mem_mib)?;
        let vm = Vm::new(&cfg.kvm_device, &ram)?;

        let mut irqs = Vec::new();
        let mut irq = |gsi: u32| -> Result<Arc<EventFd>, VmmError> {
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Irq {
                gsi,
                err: e.to_string(),
            })?;
            vm.fd.register_irqfd(&e, gsi).map_err(|e| VmmError::Irq {
                gsi,
                err: e.to_string(),
            })?;
            let e = Arc::new(e);
            irqs.push(e.clone());
            Ok(e)
        };

        // Serial: output sink first, then the UART, then input sources.
        let sink: Box<dyn Write + Send> = match (&cfg.serial, output) {
            (_, Some(out)) => out,
            (serial, None) => match serial {
                SerialConfig::Stdio => Box::new(StdoutNow),
                SerialConfig::Null => Box::new(std::io::sink()),
                SerialConfig::File(p) => {
                    Box::new(std::fs::File::create(p).map_err(|err| VmmError::Serial {
                        what: format!("file {}", p.display()),
                        err,
                    })?)
                }
                SerialConfig::Unix(_) => Box::new(std::io::sink()),
            },
        };
        let stamped = Stamped::new(sink);
        let first_output = stamped.first.clone();
        let com1 = irq(COM1_IRQ)?;
        let com1_irq: Arc<dyn Interrupt> = com1.clone();
        let serial = Arc::new(Mutex::new(Serial::new(com1_irq, Box::new(stamped))));
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
                let console = UnixConsole::bind(path, move |b| feed(&s, b)).map_err(|err| {
                    VmmError::Serial {
                        what: format!("socket {}", path.display()),
                        err,
                    }
                })?;
                let stamped = Stamped {
                    inner: console,
                    first: first_output.clone(),
                };
                let irq: Arc<dyn Interrupt> = com1.clone();
                *serial.lock().unwrap_or_else(|p| p.into_inner()) =
                    Serial::new(irq, Box::new(stamped));
            }
            _ => {}
        }

        let mut pio = Bus::new();
        pio.insert(COM1, 8, serial.clone())?;
        pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::default())))?;
        pio.insert(POWER_PORT, 1, Arc::new(Mutex::new(PowerPort)))?;

        let mut mmio = Bus::new();
        let mut workers = Vec::new();
        let mut acpi_devices = staunch_boot::acpi::Devices::default();
        let mut cmdline = cfg.cmdline.trim().to_string();
        for (i, disk) in disks.into_iter().enumerate() {
            let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let gsi = layout::VIRTIO_IRQ_BASE + i as u32;
            let line: Arc<dyn Interrupt> = irq(gsi)?;
            let t = Arc::new(Mutex::new(MmioTransport::new(
                Box::new(disk),
                ram.mem.clone(),
                line,
            )));
            mmio.insert(base, layout::VIRTIO_MMIO_SIZE, t.clone())?;
            workers.push(QueueWorker::spawn(&vm, base, t, &format!("virtio-blk{i}"))?);
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
            acpi_devices
                .virtio_mmio
                .push((base, layout::VIRTIO_MMIO_SIZE, gsi));
        }

        acpi_devices.vcpus = cfg.vcpus;
        acpi_devices.serial.push((COM1 as u16, COM1_IRQ));
        let boot = staunch_boot::load(
            &ram.mem,
            ram.bytes,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            cmdline.trim(),
            &acpi_devices,
        )?;
        let handler = Arc::new(Exits { pio, mmio });
        let (tx, stopped) = channel();
        let mut vcpus = Vec::new();
        let mut threads = Vec::new();
        let mut fds = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = vm.create_vcpu(i, cfg.vcpus)?;
            let state = staunch_boot::cpu_boot_state(boot.entry, i as u64);
            staunch_kvm::vcpu::configure(&fd, i, &state, i == 0 || boot.smp_direct)?;
            fds.push(fd);
        }
        for (i, fd) in fds.into_iter().enumerate() {
            let ctl = VcpuControl::new(i as u8);
            let (h, tx, c) = (handler.clone(), tx.clone(), ctl.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let r = staunch_kvm::vcpu::run(fd, &c, &*h);
                    let _ = tx.send((c.index, r.clone()));
                    r
                })
                .map_err(VmmError::Thread)?;
            vcpus.push(ctl);
            threads.push(t);
        }
        tracing::info!(vcpus = cfg.vcpus, mem_mib = cfg.mem_mib, entry = format_args!("{:#x}", boot.entry), format = ?boot.format, "VM started");
        Ok(RunningVm {
            vcpus,
            threads,
            stopped,
            started,
            first_output,
            serial,
            workers,
            _vm: vm,
            _ram: ram,
            _irqs: irqs,
        })
    }

    pub fn pause(&self) {
        for v in &self.vcpus {
            v.pause();
        }
    }

    pub fn resume(&self) {
        for v in &self.vcpus {
            v.resume();
        }
    }

    pub fn vcpu_states(&self) -> Vec<staunch_kvm::VcpuState> {
        self.vcpus.iter().map(|v| v.state()).collect()
    }

    /// Send bytes to the guest's serial port.
    pub fn send_input(&self, bytes: &[u8]) {
        feed(&self.serial, bytes);
    }

    /// Wait until a vCPU stops the VM (power off, reset, fault) or `timeout`.
    pub fn wait(self, timeout: Option<Duration>) -> VmExit {
        let first = match timeout {
            Some(t) => self.stopped.recv_timeout(t).ok(),
            None => self.stopped.recv().ok(),
        };
        let reason = first.map(|(_, r)| r).unwrap_or(StopReason::Requested);
        self.finish(reason)
    }

    /// Stop every vCPU now.
    pub fn stop(self) -> VmExit {
        self.finish(StopReason::Requested)
    }

    fn finish(self, reason: StopReason) -> VmExit {
        for v in &self.vcpus {
            v.stop();
        }
        for t in self.threads {
            let _ = t.join();
        }
        for w in self.workers {
            w.stop();
        }
        let exits = self
            .vcpus
            .iter()
            .map(|v| v.exits.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        VmExit {
            reason,
            first_output: self
                .first_output
                .get()
                .map(|t| t.duration_since(self.started)),
            runtime: self.started.elapsed(),
            exits,
        }
    }
}
