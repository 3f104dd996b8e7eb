//! virtio-blk behind virtio-mmio, driven the way a hostile guest would:
//! every malformed request gets an error status or a device reset, never a
//! panic, a hang or an access outside guest memory.

use staunch_devices::virtio::blk::{Block, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES};
use staunch_devices::virtio::mmio::MmioTransport;
use staunch_devices::{BusDevice, Interrupt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x8000;
const QSZ: u16 = 16;

#[derive(Default)]
struct Count(AtomicU32);
impl Interrupt for Count {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: MmioTransport,
    avail: u16,
    disk: std::path::PathBuf,
}

fn w(dev: &mut MmioTransport, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}
fn r(dev: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Rig {
    fn new(name: &str, read_only: bool) -> Rig {
        let disk = std::env::temp_dir().join(format!("staunch-hostile-{}-{name}.img", std::process::id()));
        std::fs::write(&disk, vec![0u8; 64 * 1024]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let blk = Block::open(&disk, read_only).unwrap();
        let mut dev = MmioTransport::new(Box::new(blk), mem.clone(), Arc::new(Count::default()));
        w(&mut dev, 0x70, 1);
        w(&mut dev, 0x70, 3);
        w(&mut dev, 0x24, 1);
        w(&mut dev, 0x20, 1); // VERSION_1
        w(&mut dev, 0x70, 3 | 8);
        assert_eq!(r(&mut dev, 0x70) & 8, 8, "features accepted");
        w(&mut dev, 0x30, 0);
        w(&mut dev, 0x38, QSZ as u32);
        for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            w(&mut dev, off, addr as u32);
            w(&mut dev, off + 4, 0);
        }
        w(&mut dev, 0x44, 1);
        w(&mut dev, 0x70, 3 | 8 | 4);
        assert_eq!(r(&mut dev, 0x70), 15, "driver ok");
        Rig { mem, dev, avail: 0, disk }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + 16 * i as u64);
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Publish head 0 and notify; returns (used entries, status byte).
    fn kick(&mut self) -> (u16, u8) {
        self.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * (self.avail % QSZ) as u64)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
        w(&mut self.dev, 0x50, 0);
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u16, u8) {
        self.header(kind, sector);
        self.desc(0, HDR, 16, 1, 1);
        match data {
            Some((addr, len, dev_writes)) => {
                self.desc(1, addr, len, 1 | if dev_writes { 2 } else { 0 }, 2);
                self.desc(2, STATUS, 1, 2, 0);
            }
            None => self.desc(1, STATUS, 1, 2, 0),
        }
        self.kick()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

#[test]
fn good_requests_round_trip() {
    let mut rig = Rig::new("good", false);
    rig.mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(T_OUT, 2, Some((DATA, 1024, false))), (1, S_OK));
    rig.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(T_IN, 2, Some((DATA, 1024, true))), (2, S_OK));
    let mut back = [0u8; 1024];
    rig.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|b| *b == 0xab));
    assert_eq!(rig.request(T_FLUSH, 0, None), (3, S_OK));
    let disk = std::fs::read(&rig.disk).unwrap();
    assert!(disk[1024..2048].iter().all(|b| *b == 0xab) && disk[..1024].iter().all(|b| *b == 0));
}

#[test]
fn malformed_requests_get_error_status() {
    let mut rig = Rig::new("bad", false);
    // Data outside guest memory.
    assert_eq!(rig.request(T_IN, 0, Some((MEM as u64 - 256, 512, true))).1, S_IOERR);
    assert_eq!(rig.request(T_IN, 0, Some((u64::MAX - 100, 512, true))).1, S_IOERR);
    // Wrong direction: device asked to write into a read-only buffer.
    assert_eq!(rig.request(T_IN, 0, Some((DATA, 512, false))).1, S_IOERR);
    assert_eq!(rig.request(T_OUT, 0, Some((DATA, 512, true))).1, S_IOERR);
    // Not a whole sector; past the end; sector arithmetic overflow.
    assert_eq!(rig.request(T_IN, 0, Some((DATA, 100, true))).1, S_IOERR);
    assert_eq!(rig.request(T_IN, 128, Some((DATA, 512, true))).1, S_IOERR);
    assert_eq!(rig.request(T_IN, u64::MAX / 2, Some((DATA, 512, true))).1, S_IOERR);
    // Unknown request type.
    assert_eq!(rig.request(77, 0, Some((DATA, 512, true))).1, S_UNSUPP);
    // Header too short.
    rig.header(T_IN, 0);
    rig.desc(0, HDR, 8, 1, 1);
    rig.desc(1, DATA, 512, 3, 2);
    rig.desc(2, STATUS, 1, 2, 0);
    assert_eq!(rig.kick().1, S_IOERR);
    // Every request above completed (used index advanced once per kick).
    let used: u16 = rig.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, rig.avail);
}

/// One discard / write-zeroes segment at DATA + 16 * i.
fn segment(rig: &Rig, i: u64, sector: u64, sectors: u32, flags: u32) {
    let at = GuestAddress(DATA + 16 * i);
    rig.mem.write_obj(sector, at).unwrap();
    rig.mem.write_obj(sectors, at.unchecked_add(8)).unwrap();
    rig.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
}

fn fill_and_read(rig: &mut Rig, sector: u64, byte: u8) -> Vec<u8> {
    rig.mem.write_slice(&[byte; 4096], GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(rig.request(T_OUT, sector, Some((DATA + 0x1000, 4096, false))), (rig.avail, S_OK));
    read(rig, sector)
}

fn read(rig: &mut Rig, sector: u64) -> Vec<u8> {
    assert_eq!(rig.request(T_IN, sector, Some((DATA + 0x1000, 4096, true))).1, S_OK);
    let mut back = vec![0u8; 4096];
    rig.mem.read_slice(&mut back, GuestAddress(DATA + 0x1000)).unwrap();
    back
}

#[test]
fn discard_and_write_zeroes_leave_zeros_and_refuse_bad_segments() {
    let mut rig = Rig::new("discard", false);
    // Discard: the range reads as zeros, its neighbour keeps its data.
    assert_eq!(fill_and_read(&mut rig, 8, 0xab), vec![0xab; 4096]);
    assert_eq!(fill_and_read(&mut rig, 16, 0xcd), vec![0xcd; 4096]);
    segment(&rig, 0, 8, 8, 0);
    assert_eq!(rig.request(T_DISCARD, 0, Some((DATA, 16, false))).1, S_OK);
    assert_eq!(read(&mut rig, 8), vec![0; 4096]);
    assert_eq!(read(&mut rig, 16), vec![0xcd; 4096]);
    // Write-zeroes, in place and with unmap allowed; two segments at once.
    fill_and_read(&mut rig, 8, 0x11);
    fill_and_read(&mut rig, 24, 0x22);
    segment(&rig, 0, 8, 8, 0);
    segment(&rig, 1, 24, 8, 1);
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, Some((DATA, 32, false))).1, S_OK);
    assert_eq!(read(&mut rig, 8), vec![0; 4096]);
    assert_eq!(read(&mut rig, 24), vec![0; 4096]);
    assert_eq!(read(&mut rig, 16), vec![0xcd; 4096]);
    // Served twice (a resubmission after a restart): the same result.
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, Some((DATA, 32, false))).1, S_OK);
    assert_eq!(read(&mut rig, 24), vec![0; 4096]);

    // Hostile segments fail the whole request and change nothing.
    fill_and_read(&mut rig, 16, 0x33);
    // (what, kind, sector, sectors, flags, buffer length, device-writable, status)
    type Bad = (&'static str, u32, u64, u32, u32, u32, bool, u8);
    let bad: [Bad; 6] = [
        ("discard with the unmap flag", T_DISCARD, 16, 8, 1, 16, false, S_UNSUPP),
        ("unknown flag bits", T_WRITE_ZEROES, 16, 8, 4, 16, false, S_UNSUPP),
        ("past the end of the disk", T_DISCARD, 120, 16, 0, 16, false, S_IOERR),
        ("a sector count that wraps", T_DISCARD, u64::MAX - 2, 8, 0, 16, false, S_IOERR),
        ("a segment buffer that is not whole segments", T_DISCARD, 16, 8, 0, 10, false, S_IOERR),
        ("a device-writable segment buffer", T_DISCARD, 16, 8, 0, 16, true, S_IOERR),
    ];
    for (what, kind, sector, n, flags, len, dev_writes, want) in bad {
        segment(&rig, 0, sector, n, flags);
        assert_eq!(rig.request(kind, 0, Some((DATA, len, dev_writes))).1, want, "{what}");
        assert_eq!(read(&mut rig, 16), vec![0x33; 4096], "{what} changed the disk");
    }
    // A second segment past the end: the first one is not done either.
    segment(&rig, 0, 16, 8, 0);
    segment(&rig, 1, 1 << 40, 8, 0);
    assert_eq!(rig.request(T_DISCARD, 0, Some((DATA, 32, false))).1, S_IOERR);
    assert_eq!(read(&mut rig, 16), vec![0x33; 4096]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut rig = Rig::new("ro", true);
    segment(&rig, 0, 0, 8, 0);
    assert_eq!(rig.request(T_DISCARD, 0, Some((DATA, 16, false))).1, S_IOERR, "discard on a read-only disk");
    assert_eq!(rig.request(T_WRITE_ZEROES, 0, Some((DATA, 16, false))).1, S_IOERR, "write-zeroes on a read-only disk");
    assert_eq!(rig.request(T_OUT, 0, Some((DATA, 512, false))).1, S_IOERR);
    assert_eq!(rig.request(T_IN, 0, Some((DATA, 512, true))).1, S_OK);
}

#[test]
fn loops_and_bad_indices_terminate() {
    let mut rig = Rig::new("loop", false);
    rig.header(T_IN, 0);
    rig.desc(0, HDR, 16, 1, 1);
    rig.desc(1, DATA, 512, 3, 0); // loops back to 0
    let (used, _) = rig.kick();
    assert_eq!(used, 1, "looping chain still completes");
    rig.desc(1, DATA, 512, 3, 999); // next out of range
    let (used, _) = rig.kick();
    assert_eq!(used, 2);
}

#[test]
fn runaway_avail_index_needs_reset() {
    let mut rig = Rig::new("runaway", false);
    rig.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    w(&mut rig.dev, 0x50, 0);
    assert_ne!(r(&mut rig.dev, 0x70) & 0x40, 0, "NEEDS_RESET set");
    // Reset brings it back.
    w(&mut rig.dev, 0x70, 0);
    assert_eq!(r(&mut rig.dev, 0x70), 0);
}

#[test]
fn random_descriptor_tables_never_panic() {
    let mut rig = Rig::new("fuzz", false);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        for i in 0..QSZ {
            let v = next();
            let addr = match v % 4 {
                0 => next(),
                1 => HDR,
                2 => DATA + (next() % 0x3000),
                _ => MEM as u64 - (next() % 1024),
            };
            rig.desc(i, addr, (next() % 0x2000) as u32, (next() % 8) as u16, (next() % 20) as u16);
        }
        rig.mem.write_obj(next(), GuestAddress(HDR)).unwrap();
        rig.mem.write_obj(next() % 256, GuestAddress(HDR + 8)).unwrap();
        let head = (next() % 20) as u16;
        rig.mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * (rig.avail % QSZ) as u64)).unwrap();
        rig.avail = rig.avail.wrapping_add(1);
        rig.mem.write_obj(rig.avail, GuestAddress(AVAIL + 2)).unwrap();
        w(&mut rig.dev, 0x50, 0);
        if r(&mut rig.dev, 0x70) & 0x40 != 0 {
            // A reset is a legitimate answer; start over like a driver would.
            rig = Rig::new("fuzz", false);
        }
    }
}

/// A VMM saved between the driver's "select feature word 1" and its write
/// must resume with the selector intact (a campaign found this).
#[test]
fn state_restored_mid_feature_negotiation() {
    let disk = std::env::temp_dir().join(format!("staunch-negotiation-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 64 * 1024]).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut dev =
        MmioTransport::new(Box::new(Block::open(&disk, false).unwrap()), mem.clone(), Arc::new(Count::default()));
    w(&mut dev, 0x70, 1);
    w(&mut dev, 0x70, 3);
    w(&mut dev, 0x24, 1); // select the high feature word...
    let saved = dev.state();
    let mut dev = MmioTransport::restore(
        Box::new(Block::open(&disk, false).unwrap()),
        mem,
        Arc::new(Count::default()),
        &saved,
        true,
    )
    .unwrap();
    w(&mut dev, 0x20, 1); // ...and write VERSION_1 into it, after the restore
    w(&mut dev, 0x70, 3 | 8);
    assert_eq!(r(&mut dev, 0x70) & 8, 8, "FEATURES_OK accepted after restore");
    let _ = std::fs::remove_file(&disk);
}
