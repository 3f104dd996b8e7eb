//! The VM's disks: a file served by the VMM's own virtio-blk, or a socket
//! to a vhost-user-blk backend (`staunch blk`, qemu-storage-daemon, ...)
//! that serves the queues from its own process.

use crate::config::VmConfig;
use crate::vm::VmmError;
use staunch_devices::virtio::VirtioDevice;
use staunch_devices::virtio::blk::Block;
use staunch_devices::virtio::mmio::MmioTransport;
use staunch_vhost::frontend::{Link, LinkRecord};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub(crate) enum Disk {
    File(Block),
    /// A backend's socket, and what a predecessor knew about the link.
    VhostUser(PathBuf, Option<(LinkRecord, Option<std::fs::File>)>),
}

/// Open the VM's disks: file disks from descriptors a predecessor image
/// handed over (in order, with each vhost-user disk's inflight region among
/// them), else by path. Done before KVM is touched, so a missing disk is
/// the error seen.
pub(crate) fn open(
    cfg: &VmConfig,
    inherited: &[std::os::fd::RawFd],
    links: &[LinkRecord],
) -> Result<Vec<Disk>, VmmError> {
    let mut fds = inherited.iter();
    let mut links = links.iter();
    let mut disks = Vec::new();
    for d in &cfg.disks {
        if d.vhost_user {
            let saved = links.next().cloned();
            let saved = saved.map(|r| {
                // SAFETY: as for a file disk: the predecessor kept the
                // inflight region's descriptor open and recorded it.
                let f = r.inflight.and(fds.next()).map(|fd| unsafe { std::fs::File::from_raw_fd(*fd) });
                (r, f)
            });
            disks.push(Disk::VhostUser(d.path.clone(), saved));
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
    saved: Option<(LinkRecord, Option<std::fs::File>)>,
) -> Result<(Box<dyn VirtioDevice>, Arc<Link>), VmmError> {
    const QUEUES: usize = 1;
    let mut kicks = Vec::new();
    for q in 0..QUEUES as u32 {
        let ioerr = |e: String| VmmError::Irq { gsi: 0, err: format!("ioeventfd: {e}") };
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ioerr(e.to_string()))?);
        let addr = kvm_ioctls::IoEventAddress::Mmio(base + MmioTransport::QUEUE_NOTIFY);
        vm.fd.register_ioevent(&evt, &addr, q).map_err(|e| ioerr(e.to_string()))?;
        kicks.push(evt);
    }
    let link = Link::connect(socket, "blk", QUEUES, mem, kicks, call, events, saved)
        .map_err(|e| VmmError::Device(e.to_string()))?;
    Ok((Box::new(staunch_vhost::frontend::VhostUserDevice::new(link.clone(), 2)), link))
}

/// What a disk hands to a successor: the file's descriptor, or a vhost-user
/// link's record and inflight region.
pub(crate) enum DiskSlot {
    File(std::fs::File),
    Link(Arc<Link>),
}

/// Duplicates of the descriptors to hand over, in config order, and the
/// links' records; taken together so the two always agree.
pub(crate) fn handover(slots: &[DiskSlot]) -> Result<(Vec<std::fs::File>, Vec<LinkRecord>), VmmError> {
    let mut files = Vec::new();
    let mut links = Vec::new();
    for s in slots {
        match s {
            DiskSlot::File(f) => {
                files.push(f.try_clone().map_err(|e| VmmError::Device(format!("disk descriptor: {e}")))?)
            }
            DiskSlot::Link(l) => {
                let (mut rec, file) = l.record_and_file();
                match file {
                    Some(f) => files.push(f),
                    None => rec.inflight = None,
                }
                links.push(rec);
            }
        }
    }
    Ok((files, links))
}

/// Each vhost-user disk's link, for `status`: its socket, whether a backend
/// is connected now, and how many times one was lost.
pub(crate) fn status(slots: &[DiskSlot]) -> serde_json::Value {
    slots
        .iter()
        .filter_map(|s| match s {
            DiskSlot::Link(l) => Some(serde_json::json!({
                "socket": l.path(), "connected": l.connected(), "reconnects": l.reconnects(),
            })),
            DiskSlot::File(_) => None,
        })
        .collect()
}
