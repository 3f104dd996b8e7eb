//! `staunch net`: virtio-net served over vhost-user, frames moved between
//! the guest's queues and a tap device.
//!
//! Queue 0 receives (tap to guest), queue 1 transmits (guest to tap). The
//! tap carries the 12-byte virtio-net header in front of every frame
//! (IFF_VNET_HDR), so a chain's bytes go to the tap and back unchanged:
//! no offloads are offered, the header says "no checksum, no GSO", and a
//! guest that lies in it gets its frame refused by the tap (counted), not a
//! corrupted host. The frontend owns the configuration space (MAC, link
//! status), so a backend restart can never show as a link event. One
//! receive buffer holds one frame (mergeable buffers
//! are offered; `num_buffers` is always 1, which Linux accepts).
//!
//! Across a backend restart: a transmit chain that was taken but not
//! completed is sent again (at least once); a receive buffer that was
//! taken but not filled is used for the next frame; a frame that was inside
//! the dead process is lost (TCP retransmits it).

use crate::backend::{Device, QueueHandler};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

const F_MRG_RXBUF: u64 = 1 << 15;
/// virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
pub const HDR_LEN: usize = 12;
/// The largest chain a transmit may be: a 64 KiB frame and its header.
const MAX_TX: u64 = 65_536 + HDR_LEN as u64;
const QUEUE_SIZE: u16 = 256;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap {name}: {err}")]
    Tap { name: String, err: std::io::Error },
    #[error("tap name {0:?}: 1 to 15 bytes, no '/' or whitespace")]
    TapName(String),
}

/// Frames moved and dropped, for the backend's events and tests.
#[derive(Default, Debug)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Chains refused: wrong direction, too long, too short for a header.
    pub bad_chains: AtomicU64,
    /// Frames the tap refused (a header that lies) or could not take.
    pub tx_errors: AtomicU64,
    /// Frames read from the tap but not given to the guest.
    pub rx_dropped: AtomicU64,
}

/// The frontend owns the device's configuration (MAC, link status: QEMU's
/// and Staunch's build it themselves), so none is offered here.
pub struct NetDevice {
    tap: Arc<File>,
    pub counters: Arc<Counters>,
}

/// Open (or attach to) tap `name` through /dev/net/tun, with the virtio-net
/// header on every frame and no offloads, non-blocking.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(NetError::TapName(name.into()));
    }
    let err = |err| NetError::Tap { name: name.into(), err };
    let f =
        std::fs::OpenOptions::new().read(true).write(true).custom_flags_nonblock().open("/dev/net/tun").map_err(err)?;
    // struct ifreq: the name, then the flags (a union of 24 bytes).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and may write) a struct ifreq we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let hdr: libc::c_int = HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int we own; TUNSETOFFLOAD takes a
    // plain value.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        if libc::ioctl(f.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

impl NetDevice {
    /// Serve tap `name`, or the tap descriptor a predecessor handed down.
    pub fn new(tap: File) -> NetDevice {
        NetDevice { tap: Arc::new(tap), counters: Arc::default() }
    }

    /// A tap descriptor inherited across exec (a spare, an upgrade): the
    /// same queue of the same tap, so nothing is reopened.
    ///
    /// # Safety
    /// `fd` must be an open tap descriptor this process owns.
    pub unsafe fn inherited(fd: RawFd) -> NetDevice {
        // SAFETY: the caller vouches for fd.
        NetDevice::new(unsafe { File::from_raw_fd(fd) })
    }
}

/// A chain's buffers as an iovec list, if every one has the direction
/// `device_writes`, the total holds a header and at most `max` bytes, and
/// each lies in guest memory; else the chain is counted as bad.
fn iovecs(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    device_writes: bool,
    max: u64,
    counters: &Counters,
) -> Option<Vec<libc::iovec>> {
    let total: u64 = descs.iter().map(|d| d.len() as u64).sum();
    let iov = if descs.iter().any(|d| d.is_write_only() != device_writes) || total < HDR_LEN as u64 || total > max {
        None
    } else {
        descs
            .iter()
            .map(|d| {
                let s = mem.get_slice(d.addr(), d.len() as usize).ok()?;
                let base = s.ptr_guard_mut().as_ptr() as *mut libc::c_void;
                Some(libc::iovec { iov_base: base, iov_len: d.len() as usize })
            })
            .collect()
    };
    if iov.is_none() {
        counters.bad_chains.fetch_add(1, Ordering::Relaxed);
    }
    iov
}

struct Rx {
    tap: Arc<File>,
    counters: Arc<Counters>,
}

impl QueueHandler for Rx {
    fn ready(&mut self) -> bool {
        let mut p = libc::pollfd { fd: self.tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
    }
    fn source(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let Some(iov) = iovecs(descs, mem, true, u32::MAX as u64, &self.counters) else { return 0 };
        // SAFETY: every iovec is a checked slice of guest memory, written
        // only by the kernel; the guest may race on it, which changes
        // bytes, never memory safety.
        let n = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < HDR_LEN as isize {
            return 0;
        }
        // num_buffers (bytes 10-11 of the header): one buffer per frame.
        if let Some(at) = offset(descs, 10) {
            let _ = mem.write_obj(1u16.to_le(), at);
        }
        if staunch_fault::hit(&staunch_fault::NET_RX).is_err() {
            // An injected error: the frame is dropped, the buffer reused.
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        n as u32
    }
}

/// The guest address of byte `at` of a chain.
fn offset(descs: &[Descriptor], mut at: u64) -> Option<vm_memory::GuestAddress> {
    use vm_memory::Address;
    for d in descs {
        if at + 2 <= d.len() as u64 {
            return d.addr().checked_add(at);
        }
        at = at.checked_sub(d.len() as u64)?;
    }
    None
}

struct Tx {
    tap: Arc<File>,
    counters: Arc<Counters>,
}

impl QueueHandler for Tx {
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let Some(iov) = iovecs(descs, mem, false, MAX_TX, &self.counters) else { return 0 };
        // SAFETY: every iovec is a checked slice of guest memory, only read.
        let n = unsafe { libc::writev(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 || staunch_fault::hit(&staunch_fault::NET_TX).is_err() {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        }
        0
    }
}

impl Device for NetDevice {
    fn name(&self) -> &'static str {
        "net"
    }
    fn features(&self) -> u64 {
        F_MRG_RXBUF
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn queues(&self) -> usize {
        2
    }
    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn handler(&self, queue: usize) -> Result<Box<dyn QueueHandler>, String> {
        let (tap, counters) = (self.tap.clone(), self.counters.clone());
        Ok(match queue {
            0 => Box::new(Rx { tap, counters }),
            _ => Box::new(Tx { tap, counters }),
        })
    }
    fn inherited_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked() {
        for bad in ["", "a/b", "has space", "sixteen-bytes-xx"] {
            assert!(matches!(open_tap(bad), Err(NetError::TapName(_))), "{bad}");
        }
    }

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// A queue handler over a SOCK_SEQPACKET pair standing in for the tap's
    /// file (one record per frame, as a tap reads and writes them); the
    /// other end is what the host side of the tap would see.
    fn rig() -> (NetDevice, std::os::unix::net::UnixDatagram, GuestMemoryMmap) {
        let (a, b) = crate::handoff::pair().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (NetDevice::new(File::from(a)), std::os::unix::net::UnixDatagram::from(b), mem)
    }

    fn d(addr: u64, len: u32, device_writes: bool) -> Descriptor {
        Descriptor::new(addr, len, if device_writes { 2 } else { 0 }, 0)
    }

    #[test]
    fn frames_cross_unchanged_and_num_buffers_is_set() {
        let (dev, host, mem) = rig();
        let (mut rx, mut tx) = (dev.handler(0).unwrap(), dev.handler(1).unwrap());
        // Transmit: header and frame in two buffers, one record on the tap.
        let frame: Vec<u8> = (0..200u8).collect();
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&frame, GuestAddress(0x2000)).unwrap();
        assert_eq!(tx.serve(&[d(0x1000, HDR_LEN as u32, false), d(0x2000, 200, false)], &mem), 0);
        let mut got = vec![0u8; 512];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[HDR_LEN..n], &frame[..]);
        // Receive: only when a frame waits; then it fills one buffer.
        assert!(!rx.ready());
        let mut incoming = vec![0u8; HDR_LEN];
        incoming.extend_from_slice(b"hello, guest");
        host.send(&incoming).unwrap();
        assert!(rx.ready());
        let used = rx.serve(&[d(0x3000, 4, true), d(0x4000, 2048, true)], &mem);
        assert_eq!(used as usize, incoming.len());
        let nb: u16 = mem.read_obj(GuestAddress(0x4000 + 6)).unwrap();
        assert_eq!(nb, 1, "num_buffers");
        let mut body = [0u8; 12];
        mem.read_slice(&mut body, GuestAddress(0x4000 + 8)).unwrap();
        assert_eq!(&body, b"hello, guest");
        assert_eq!(dev.counters.rx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(dev.counters.tx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hostile_chains_are_dropped_and_counted() {
        let (dev, host, mem) = rig();
        let (mut rx, mut tx) = (dev.handler(0).unwrap(), dev.handler(1).unwrap());
        host.set_nonblocking(true).unwrap();
        let bad_tx: [&[Descriptor]; 4] = [
            &[d(0x1000, 100, true)],                                // the device would write
            &[d(0x1000, 4, false)],                                 // shorter than a header
            &[d(0x1000, 40_000, false), d(0x20000, 40_000, false)], // longer than 64 KiB
            &[d(0xff_f000, 0x2000, false)],                         // past guest memory
        ];
        for (i, chain) in bad_tx.into_iter().enumerate() {
            assert_eq!(tx.serve(chain, &mem), 0, "chain {i}");
        }
        assert!(host.recv(&mut [0u8; 64]).is_err(), "nothing reached the tap");
        let bad_rx: [&[Descriptor]; 3] =
            [&[d(0x1000, 100, false)], &[d(0x1000, 8, true)], &[d(0xff_ff00, 0x1000, true)]];
        for (i, chain) in bad_rx.into_iter().enumerate() {
            assert_eq!(rx.serve(chain, &mem), 0, "chain {i}");
        }
        assert_eq!(dev.counters.bad_chains.load(Ordering::Relaxed), 7);
        // A frame longer than the buffer is cut to it, never written past.
        host.send(&vec![7u8; 3000]).unwrap();
        mem.write_slice(&[0u8; 64], GuestAddress(0x5000 + 1500)).unwrap();
        assert_eq!(rx.serve(&[d(0x5000, 1500, true)], &mem), 1500);
        let mut after = [0xffu8; 64];
        mem.read_slice(&mut after, GuestAddress(0x5000 + 1500)).unwrap();
        assert_eq!(after, [0u8; 64]);
    }

    #[test]
    fn a_byte_offset_is_found_across_descriptors() {
        let chain = [d(0x1000, 4, true), d(0x2000, 8, true), d(0x3000, 100, true)];
        assert_eq!(offset(&chain, 10), Some(GuestAddress(0x2006)));
        assert_eq!(offset(&chain, 2), Some(GuestAddress(0x1002)));
        assert_eq!(offset(&[d(0x1000, 11, true)], 10), None, "num_buffers split across the end");
    }
}
