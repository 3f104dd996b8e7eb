//! The VM's disks: a file served by the VMM's own virtio-blk, or a socket
//! to a vhost-user-blk backend (`staunch blk`, qemu-storage-daemon, ...)
//! that serves the queues from its own process.

use crate::config::VmConfig;
use crate::vm::VmmError;
use staunch_devices::virtio::VirtioDevice;
use staunch_devices::virtio::blk::Block;
use staunch_devices::virtio::mmio::MmioTransport;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub(crate) enum Disk {
    File(Block),
    VhostUser(PathBuf),
}

impl Disk {
    pub fn file(&self) -> Option<&std::fs::File> {
        match self {
            Disk::File(b) => Some(b.file()),
            Disk::VhostUser(_) => None,
        }
    }
}

/// Open the VM's disks: file disks from descriptors a predecessor image
/// handed over (in order), else by path. Done before KVM is touched, so a
/// missing disk is the error seen.
pub(crate) fn open(cfg: &VmConfig, inherited: &[std::os::fd::RawFd]) -> Result<Vec<Disk>, VmmError> {
    let mut fds = inherited.iter();
    let mut disks = Vec::new();
    for d in &cfg.disks {
        if d.vhost_user {
            disks.push(Disk::VhostUser(d.path.clone()));
            continue;
        }
        disks.push(Disk::File(match fds.next() {
            // SAFETY: the predecessor image kept this disk's descriptor open
            // across exec and recorded its number; we take it over once.
            Some(fd) => Block::from_file(unsafe { std::fs::File::from_raw_fd(*fd) }, &d.path, d.read_only)?,
            None => Block::open(&d.path, d.read_only)?,
        }));
    }
    Ok(disks)
}

/// A vhost-user disk's device: one kick ioeventfd per queue on the
/// transport's QueueNotify register, the device's irqfd as the call fd.
pub(crate) fn vhost_user(
    vm: &staunch_kvm::Vm,
    base: u64,
    socket: &std::path::Path,
    mem: vm_memory::GuestMemoryMmap,
    call: Arc<EventFd>,
    events: Option<PathBuf>,
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    const QUEUES: usize = 1;
    let mut kicks = Vec::new();
    for q in 0..QUEUES as u32 {
        let ioerr = |e: String| VmmError::Irq { gsi: 0, err: format!("ioeventfd: {e}") };
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ioerr(e.to_string()))?);
        let addr = kvm_ioctls::IoEventAddress::Mmio(base + MmioTransport::QUEUE_NOTIFY);
        vm.fd.register_ioevent(&evt, &addr, q).map_err(|e| ioerr(e.to_string()))?;
        kicks.push(evt);
    }
    let link = staunch_vhost::frontend::Link::connect(socket, "blk", QUEUES, mem, kicks, call, events)
        .map_err(|e| VmmError::Device(e.to_string()))?;
    Ok(Box::new(staunch_vhost::frontend::VhostUserDevice::new(link, 2)))
}
