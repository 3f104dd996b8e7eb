//! Polling virtio-mmio (version 2) block driver: up to one request in
//! flight per slot, each slot a fixed descriptor chain. The transport's
//! set-up (features, one queue) is shared with the network driver.

use crate::io::{mmio_read32, mmio_write32};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use staunch_guestproto as proto;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEV_FEATURES: u64 = 0x010;
const DEV_FEATURES_SEL: u64 = 0x014;
const DRV_FEATURES: u64 = 0x020;
const DRV_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
pub(crate) const QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const INTERRUPT_ACK: u64 = 0x064;
pub(crate) const STATUS: u64 = 0x070;
const Q_DESC: u64 = 0x080;
const Q_DRIVER: u64 = 0x090;
const Q_DEVICE: u64 = 0x0a0;
pub(crate) const CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

const F_RO: u32 = 1 << 5;
const F_FLUSH: u32 = 1 << 9;
const F_VERSION_1_HI: u32 = 1; // bit 32

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Descriptors (and ring entries) this driver offers; fewer if the device
/// allows fewer.
pub(crate) const QSIZE: usize = 64;
/// Descriptors per request chain: header, data, status. Slot `i`'s chain is
/// descriptors `3i..3i+3`, so the used-ring id of its request is `3i`.
pub const STRIDE: usize = 3;
/// Slots (request chains) the largest queue holds.
pub const MAX_SLOTS: usize = QSIZE / STRIDE;
const D_NEXT: u16 = 1;
pub(crate) const D_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C, align(4096))]
pub(crate) struct DescTable(pub [Desc; QSIZE]);

#[repr(C, align(4096))]
pub(crate) struct Avail {
    pub flags: u16,
    pub idx: u16,
    pub ring: [u16; QSIZE],
    used_event: u16,
}

#[repr(C, align(4096))]
pub(crate) struct Used {
    flags: u16,
    pub idx: u16,
    pub ring: [(u32, u32); QSIZE],
    avail_event: u16,
}

impl DescTable {
    pub const EMPTY: DescTable = DescTable([Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE]);
}
impl Avail {
    pub const EMPTY: Avail = Avail { flags: 0, idx: 0, ring: [0; QSIZE], used_event: 0 };
}
impl Used {
    pub const EMPTY: Used = Used { flags: 0, idx: 0, ring: [(0, 0); QSIZE], avail_event: 0 };
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Header {
    kind: u32,
    _r: u32,
    sector: u64,
}

/// One status byte per slot, each in its own cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Status(u8);

static mut DESC: DescTable = DescTable::EMPTY;
static mut AVAIL: Avail = Avail::EMPTY;
static mut USED: Used = Used::EMPTY;
static mut HDRS: [Header; MAX_SLOTS] = [Header { kind: 0, _r: 0, sector: 0 }; MAX_SLOTS];
static mut STATUS_BYTES: [Status; MAX_SLOTS] = [Status(0); MAX_SLOTS];

#[derive(Debug)]
pub enum Error {
    NotFound,
    Features,
    QueueTooSmall,
}

pub struct Blk {
    base: u64,
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    /// Queue size in use (a power of two).
    pub qsize: usize,
    avail: u16,
    used: u16,
}

/// A used-ring entry.
#[derive(Clone, Copy)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
    /// The device's used index when this entry was taken, and the driver's
    /// (before taking it).
    pub device_idx: u16,
    pub driver_idx: u16,
}

/// Parse `virtio_mmio.device=<size>@<addr>:<irq>` entries from the command line.
pub fn devices(cmdline: &str) -> impl Iterator<Item = u64> + '_ {
    cmdline.split(' ').filter_map(|w| {
        let spec = w.strip_prefix("virtio_mmio.device=")?;
        let (_, rest) = spec.split_once('@')?;
        let addr = rest.split(':').next()?;
        crate::parse_u64(addr)
    })
}

/// The first virtio-mmio (version 2) device of type `id` (1 net, 2 block).
pub(crate) fn find(cmdline: &str, id: u32) -> Option<u64> {
    devices(cmdline).find(|&base| {
        mmio_read32(base + MAGIC) == 0x7472_6976
            && mmio_read32(base + VERSION) == 2
            && mmio_read32(base + DEVICE_ID) == id
    })
}

pub fn find_blk(cmdline: &str) -> Result<Blk, Error> {
    Blk::init(find(cmdline, 2).ok_or(Error::NotFound)?)
}

/// Reset the device and negotiate VERSION_1 and what of `want` (low 32
/// bits) it offers; returns the features agreed.
pub(crate) fn negotiate(base: u64, want: u32) -> Result<u32, Error> {
    let w = |off, v| mmio_write32(base + off, v);
    let r = |off| mmio_read32(base + off);
    w(STATUS, 0);
    w(STATUS, S_ACK);
    w(STATUS, S_ACK | S_DRIVER);
    w(DEV_FEATURES_SEL, 0);
    let lo = r(DEV_FEATURES);
    w(DEV_FEATURES_SEL, 1);
    let hi = r(DEV_FEATURES);
    if hi & F_VERSION_1_HI == 0 {
        return Err(Error::Features);
    }
    let agreed = lo & want;
    w(DRV_FEATURES_SEL, 0);
    w(DRV_FEATURES, agreed);
    w(DRV_FEATURES_SEL, 1);
    w(DRV_FEATURES, F_VERSION_1_HI);
    w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if r(STATUS) & S_FEATURES_OK == 0 {
        return Err(Error::Features);
    }
    Ok(agreed)
}

/// Give queue `q` its rings, as large as the device allows up to
/// [`QSIZE`] (a power of two, at least `min`); returns the size.
pub(crate) fn setup_queue(base: u64, q: u32, min: usize, rings: (u64, u64, u64)) -> Result<usize, Error> {
    let w = |off, v| mmio_write32(base + off, v);
    w(QUEUE_SEL, q);
    let max = (mmio_read32(base + QUEUE_NUM_MAX) as usize).min(QSIZE);
    if max < min {
        return Err(Error::QueueTooSmall);
    }
    let qsize = 1usize << (usize::BITS - 1 - max.leading_zeros());
    w(QUEUE_NUM, qsize as u32);
    let (d, a, u) = rings;
    w(Q_DESC, d as u32);
    w(Q_DESC + 4, (d >> 32) as u32);
    w(Q_DRIVER, a as u32);
    w(Q_DRIVER + 4, (a >> 32) as u32);
    w(Q_DEVICE, u as u32);
    w(Q_DEVICE + 4, (u >> 32) as u32);
    w(QUEUE_READY, 1);
    Ok(qsize)
}

/// All queues are set up: the driver is running.
pub(crate) fn driver_ok(base: u64) {
    mmio_write32(base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

pub fn first_device(cmdline: &str) -> Option<u64> {
    devices(cmdline).next()
}

impl Blk {
    fn init(base: u64) -> Result<Blk, Error> {
        let r = |off| mmio_read32(base + off);
        let want_lo = negotiate(base, F_RO | F_FLUSH)?;
        // Only the boot CPU drives the device; the rings are static.
        let rings = (addr_of!(DESC) as u64, addr_of!(AVAIL) as u64, addr_of!(USED) as u64);
        let qsize = setup_queue(base, 0, 2 * STRIDE, rings)?;
        driver_ok(base);
        let capacity = r(CONFIG) as u64 | ((r(CONFIG + 4) as u64) << 32);
        // SAFETY: as above.
        let (avail, used) = unsafe { (read_volatile(addr_of!(AVAIL.idx)), read_volatile(addr_of!(USED.idx))) };
        Ok(Blk { base, capacity, read_only: want_lo & F_RO != 0, flush: want_lo & F_FLUSH != 0, qsize, avail, used })
    }

    /// Request chains the queue holds.
    pub fn slots(&self) -> usize {
        self.qsize / STRIDE
    }

    /// Post a request in `slot`'s chain (the caller keeps the slot free
    /// until its completion): header, `buf` (device-writable unless `kind`
    /// is a write) and a status byte set to [`proto::blk::STATUS_UNSET`].
    /// The device sees it at the next [`Blk::kick`]. The caller must not
    /// touch `buf` until the request completes.
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, buf: Option<(u64, u32)>) {
        let head = slot * STRIDE;
        // SAFETY: one CPU drives the queue; the descriptors of a free slot
        // are the driver's until it publishes them in the avail ring.
        unsafe {
            let hdr = addr_of_mut!(HDRS[slot]);
            write_volatile(hdr, Header { kind, _r: 0, sector });
            let st = addr_of_mut!(STATUS_BYTES[slot].0);
            write_volatile(st, proto::blk::STATUS_UNSET);
            let desc = addr_of_mut!(DESC.0);
            let status_at = match buf {
                Some(_) => head + 2,
                None => head + 1,
            };
            write_volatile(
                addr_of_mut!((*desc)[head]),
                Desc { addr: hdr as u64, len: 16, flags: D_NEXT, next: (head + 1) as u16 },
            );
            if let Some((addr, len)) = buf {
                let flags = if kind == T_OUT { D_NEXT } else { D_NEXT | D_WRITE };
                write_volatile(addr_of_mut!((*desc)[head + 1]), Desc { addr, len, flags, next: status_at as u16 });
            }
            write_volatile(addr_of_mut!((*desc)[status_at]), Desc { addr: st as u64, len: 1, flags: D_WRITE, next: 0 });
            write_volatile(addr_of_mut!(AVAIL.ring[self.avail as usize % self.qsize]), head as u16);
            fence(Ordering::SeqCst);
            self.avail = self.avail.wrapping_add(1);
            write_volatile(addr_of_mut!(AVAIL.idx), self.avail);
        }
    }

    /// Tell the device about the requests submitted.
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        mmio_write32(self.base + QUEUE_NOTIFY, 0);
    }

    /// Read the interrupt status and acknowledge it, as a driver's
    /// interrupt handler does (this one polls, so it does it once per
    /// report): the device's registers are then used while the guest runs,
    /// not only at set-up. Returns the status read.
    pub fn ack_interrupt(&mut self) -> u32 {
        let st = mmio_read32(self.base + INTERRUPT_STATUS);
        if st != 0 {
            mmio_write32(self.base + INTERRUPT_ACK, st);
        }
        st
    }

    /// The next used-ring entry, if the device posted one. Calls the pause
    /// meter's tick, as every poll loop does.
    pub fn poll(&mut self) -> Option<UsedElem> {
        crate::clock::tick();
        // SAFETY: the used ring is written by the device and only read here.
        unsafe {
            let device_idx = read_volatile(addr_of!(USED.idx));
            if device_idx == self.used {
                return None;
            }
            fence(Ordering::SeqCst);
            let (id, len) = read_volatile(addr_of!(USED.ring[self.used as usize % self.qsize]));
            let driver_idx = self.used;
            self.used = self.used.wrapping_add(1);
            Some(UsedElem { id, len, device_idx, driver_idx })
        }
    }

    /// Take the driver's used index to the device's (after a used index
    /// that made no sense).
    pub fn resync(&mut self) {
        // SAFETY: as in poll.
        self.used = unsafe { read_volatile(addr_of!(USED.idx)) };
    }

    /// The status byte of `slot`'s last request.
    pub fn status(&self, slot: usize) -> u8 {
        // SAFETY: a byte the device writes; reading it is always defined.
        unsafe { read_volatile(addr_of!(STATUS_BYTES[slot % MAX_SLOTS].0)) }
    }

    /// Submit one request in slot 0 and poll for its completion, with
    /// nothing else in flight; returns the status byte, or
    /// [`BAD_COMPLETION`] if the device completed something else.
    pub fn request(&mut self, kind: u32, sector: u64, buf: Option<&mut [u8]>) -> u8 {
        self.submit(0, kind, sector, buf.map(|b| (b.as_mut_ptr() as u64, b.len() as u32)));
        self.kick();
        loop {
            if let Some(u) = self.poll() {
                fence(Ordering::SeqCst);
                return if u.id == 0 && u.device_idx.wrapping_sub(u.driver_idx) == 1 {
                    self.status(0)
                } else {
                    BAD_COMPLETION
                };
            }
            core::hint::spin_loop();
        }
    }
}

/// What [`Blk::request`] returns for a completion of another request.
pub const BAD_COMPLETION: u8 = 0xfe;
