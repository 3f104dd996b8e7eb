//! Polling virtio-mmio (version 2) block driver: one request in flight.

use crate::io::{mmio_read32, mmio_write32};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

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
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const Q_DESC: u64 = 0x080;
const Q_DRIVER: u64 = 0x090;
const Q_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

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

const QSIZE: usize = 16;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct Ring {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail: [u16; QSIZE],
    _pad: [u8; 256 - 4 - 2 * QSIZE],
    used_flags: u16,
    used_idx: u16,
    used: [(u32, u32); QSIZE],
}

#[repr(C, align(16))]
struct Header {
    kind: u32,
    _r: u32,
    sector: u64,
}

static mut RING: Ring = Ring {
    desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE],
    avail_flags: 0,
    avail_idx: 0,
    avail: [0; QSIZE],
    _pad: [0; 256 - 4 - 2 * QSIZE],
    used_flags: 0,
    used_idx: 0,
    used: [(0, 0); QSIZE],
};
static mut HDR: Header = Header { kind: 0, _r: 0, sector: 0 };
static mut STATUS_BYTE: u8 = 0;

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
    avail: u16,
    used: u16,
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

pub fn find_blk(cmdline: &str) -> Result<Blk, Error> {
    for base in devices(cmdline) {
        if mmio_read32(base + MAGIC) == 0x7472_6976
            && mmio_read32(base + VERSION) == 2
            && mmio_read32(base + DEVICE_ID) == 2
        {
            return Blk::init(base);
        }
    }
    Err(Error::NotFound)
}

pub fn first_device(cmdline: &str) -> Option<u64> {
    devices(cmdline).next()
}

impl Blk {
    fn init(base: u64) -> Result<Blk, Error> {
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
        let want_lo = lo & (F_RO | F_FLUSH);
        w(DRV_FEATURES_SEL, 0);
        w(DRV_FEATURES, want_lo);
        w(DRV_FEATURES_SEL, 1);
        w(DRV_FEATURES, F_VERSION_1_HI);
        w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if r(STATUS) & S_FEATURES_OK == 0 {
            return Err(Error::Features);
        }
        w(QUEUE_SEL, 0);
        if (r(QUEUE_NUM_MAX) as usize) < QSIZE {
            return Err(Error::QueueTooSmall);
        }
        w(QUEUE_NUM, QSIZE as u32);
        // SAFETY: only the boot CPU drives the device; the ring is static.
        let (d, a, u) = unsafe {
            (addr_of!(RING.desc) as u64, addr_of!(RING.avail_flags) as u64, addr_of!(RING.used_flags) as u64)
        };
        w(Q_DESC, d as u32);
        w(Q_DESC + 4, (d >> 32) as u32);
        w(Q_DRIVER, a as u32);
        w(Q_DRIVER + 4, (a >> 32) as u32);
        w(Q_DEVICE, u as u32);
        w(Q_DEVICE + 4, (u >> 32) as u32);
        w(QUEUE_READY, 1);
        w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let capacity = r(CONFIG) as u64 | ((r(CONFIG + 4) as u64) << 32);
        // SAFETY: as above.
        let used = unsafe { read_volatile(addr_of!(RING.used_idx)) };
        Ok(Blk { base, capacity, read_only: want_lo & F_RO != 0, flush: want_lo & F_FLUSH != 0, avail: 0, used })
    }

    /// Submit one request and poll for its completion; returns the status byte.
    pub fn request(&mut self, kind: u32, sector: u64, buf: Option<&mut [u8]>) -> u8 {
        // SAFETY: one request at a time, from one CPU; the device only touches
        // the buffers named by the descriptors until it bumps used_idx.
        unsafe {
            let hdr = addr_of_mut!(HDR);
            write_volatile(hdr, Header { kind, _r: 0, sector });
            write_volatile(addr_of_mut!(STATUS_BYTE), 0xff);
            let ring = addr_of_mut!(RING);
            let mut n = 0;
            (*ring).desc[0] = Desc { addr: hdr as u64, len: 16, flags: D_NEXT, next: 1 };
            n += 1;
            if let Some(b) = buf {
                let flags = if kind == T_OUT { D_NEXT } else { D_NEXT | D_WRITE };
                (*ring).desc[1] = Desc { addr: b.as_mut_ptr() as u64, len: b.len() as u32, flags, next: 2 };
                n += 1;
            }
            (*ring).desc[n] = Desc { addr: addr_of!(STATUS_BYTE) as u64, len: 1, flags: D_WRITE, next: 0 };
            if n == 1 {
                (*ring).desc[0].next = 1;
            }
            write_volatile(addr_of_mut!((*ring).avail[self.avail as usize % QSIZE]), 0);
            fence(Ordering::SeqCst);
            self.avail = self.avail.wrapping_add(1);
            write_volatile(addr_of_mut!((*ring).avail_idx), self.avail);
            fence(Ordering::SeqCst);
            mmio_write32(self.base + QUEUE_NOTIFY, 0);
            while read_volatile(addr_of!((*ring).used_idx)) == self.used {
                core::hint::spin_loop();
            }
            fence(Ordering::SeqCst);
            self.used = self.used.wrapping_add(1);
            read_volatile(addr_of!(STATUS_BYTE))
        }
    }
}
