//! The VM's virtio devices: disks (a file served by the VMM's own
//! virtio-blk, or a socket to a vhost-user-blk backend: `staunch blk`,
//! qemu-storage-daemon, ...) and network devices (a socket to a
//! vhost-user-net backend, `staunch net`), the backends serving the queues
//! from their own processes. On the virtio-mmio bus in config order, the
//! disks first.

use crate::config::{NetConfig, VmConfig};
use crate::vm::VmmError;
use staunch_devices::virtio::VirtioDevice;
use staunch_devices::virtio::blk::Block;
use staunch_devices::virtio::mmio::MmioTransport;
use staunch_vhost::frontend::{Link, LinkRecord, LinkSpec, VhostUserDevice};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// What a predecessor knew about a vhost-user link, and its inflight region.
pub(crate) type Saved = Option<(LinkRecord, Option<std::fs::File>)>;

pub(crate) enum Dev {
    File(Block),
    /// A vhost-user-blk backend's socket.
    Blk(PathBuf, Saved),
    Net(NetConfig, Saved),
}

/// Open the VM's devices: file disks from descriptors a predecessor image
/// handed over (in order, with each vhost-user link's inflight region among
/// them), else by path. Done before KVM is touched, so a missing disk is
/// the error seen.
pub(crate) fn open(
    cfg: &VmConfig,
    inherited: &[std::os::fd::RawFd],
    links: &[LinkRecord],
) -> Result<Vec<Dev>, VmmError> {
    // One walk in bus order, as `handover` wrote them: a file disk's
    // descriptor, or a link's record and (if it has one) its region's.
    let mut fds = inherited.iter();
    let mut links = links.iter();
    let mut saved = |fds: &mut std::slice::Iter<'_, std::os::fd::RawFd>| -> Saved {
        links.next().cloned().map(|r| {
            // SAFETY: as for a file disk: the predecessor kept the
            // inflight region's descriptor open and recorded it.
            let f = r.inflight.and(fds.next()).map(|fd| unsafe { std::fs::File::from_raw_fd(*fd) });
            (r, f)
        })
    };
    let mut devs = Vec::new();
    for d in &cfg.disks {
        if d.vhost_user {
            devs.push(Dev::Blk(d.path.clone(), saved(&mut fds)));
            continue;
        }
        devs.push(Dev::File(match fds.next() {
            // SAFETY: the predecessor image kept this disk's descriptor open
            // across exec and recorded its number; we take it over once.
            Some(fd) => Block::from_file(unsafe { std::fs::File::from_raw_fd(*fd) }, &d.path, d.read_only)?,
            None => Block::open(&d.path, d.read_only)?,
        }));
    }
    for n in &cfg.nets {
        devs.push(Dev::Net(n.clone(), saved(&mut fds)));
    }
    Ok(devs)
}

/// virtio-net's configuration space as the VMM keeps it: the MAC, a link
/// that is up (and stays up whatever the backend does), one queue pair.
fn net_config(mac: [u8; 6]) -> Vec<u8> {
    let mut c = mac.to_vec();
    c.extend_from_slice(&NET_S_LINK_UP.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c
}
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
/// What of a net backend's offer reaches the guest: checksum and
/// segmentation offloads and mergeable buffers (bits 0-1, 7-15), which the
/// backend implements. Not a control queue, more queue pairs, an MTU or
/// announcements (the device has two queues and the configuration above).
const NET_PASSED: u64 = 0b11 | (0x1ff << 7);
const NET_S_LINK_UP: u16 = 1;

/// A vhost-user device: one kick ioeventfd per queue on the transport's
/// QueueNotify register, the device's irqfd as the call fd.
pub(crate) fn vhost_user(
    vm: &staunch_kvm::Vm,
    base: u64,
    dev: Dev,
    mem: vm_memory::GuestMemoryMmap,
    call: Arc<EventFd>,
    events: Option<PathBuf>,
) -> Result<(Box<dyn VirtioDevice>, Arc<Link>), VmmError> {
    let (socket, spec, device_type, own, passed, saved) = match dev {
        Dev::Blk(sock, saved) => (sock, LinkSpec { device: "blk", queues: 1, config: None }, 2, 0, u64::MAX, saved),
        Dev::Net(n, saved) => {
            let config = Some(net_config(n.mac()?));
            // Receive and transmit.
            let spec = LinkSpec { device: "net", queues: 2, config };
            (n.socket, spec, 1, NET_F_MAC | NET_F_STATUS, NET_PASSED, saved)
        }
        Dev::File(_) => return Err(VmmError::Device("a file disk has no vhost-user backend".into())),
    };
    let mut kicks = Vec::new();
    for q in 0..spec.queues as u32 {
        let ioerr = |e: String| VmmError::Irq { gsi: 0, err: format!("ioeventfd: {e}") };
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ioerr(e.to_string()))?);
        let addr = kvm_ioctls::IoEventAddress::Mmio(base + MmioTransport::QUEUE_NOTIFY);
        vm.fd.register_ioevent(&evt, &addr, q).map_err(|e| ioerr(e.to_string()))?;
        kicks.push(evt);
    }
    let link =
        Link::connect(&socket, spec, mem, kicks, call, events, saved).map_err(|e| VmmError::Device(e.to_string()))?;
    Ok((Box::new(VhostUserDevice::new(link.clone(), device_type, own, passed)), link))
}

/// What a device hands to a successor: a disk file's descriptor, or a
/// vhost-user link's record and inflight region.
pub(crate) enum Slot {
    File(std::fs::File),
    Link(Arc<Link>),
}

/// Duplicates of the descriptors to hand over, in config order, and the
/// links' records; taken together so the two always agree.
pub(crate) fn handover(slots: &[Slot]) -> Result<(Vec<std::fs::File>, Vec<LinkRecord>), VmmError> {
    let mut files = Vec::new();
    let mut links = Vec::new();
    for s in slots {
        match s {
            Slot::File(f) => files.push(f.try_clone().map_err(|e| VmmError::Device(format!("disk descriptor: {e}")))?),
            Slot::Link(l) => {
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

/// Each vhost-user link, for `status`: its device, socket, whether a
/// backend is connected now, and how many times one was lost.
pub(crate) fn status(slots: &[Slot]) -> serde_json::Value {
    slots
        .iter()
        .filter_map(|s| match s {
            Slot::Link(l) => Some(serde_json::json!({
                "device": l.device(), "socket": l.path(), "connected": l.connected(), "reconnects": l.reconnects(),
            })),
            Slot::File(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_net_backend_offers_only_what_the_device_can_honour() {
        for (bit, name) in [(0, "CSUM"), (1, "GUEST_CSUM"), (11, "HOST_TSO4"), (15, "MRG_RXBUF")] {
            assert_ne!(NET_PASSED & (1 << bit), 0, "{name}");
        }
        for (bit, name) in [(3, "MTU"), (5, "MAC"), (16, "STATUS"), (17, "CTRL_VQ"), (21, "GUEST_ANNOUNCE"), (22, "MQ")]
        {
            assert_eq!(NET_PASSED & (1 << bit), 0, "{name}");
        }
        let c = net_config([2, 0x53, 1, 2, 3, 4]);
        assert_eq!(c, [2, 0x53, 1, 2, 3, 4, 1, 0, 1, 0], "MAC, LINK_UP, one queue pair");
    }
}
