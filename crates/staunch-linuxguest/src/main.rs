//! `staunch-linux-blk`: the test guest's `blk-verify`, as a Linux program.
//!
//! Writes sequence-numbered, checksummed 4 KiB blocks (the host's
//! `check_disk` format, from `staunch-guestproto`) to a block device with
//! O_DIRECT, reads each back and verifies it, with `qd` writer threads.
//! Thread `t` owns the seqs `s` with `s % qd == t`; as `qd` divides
//! `blocks`, it also owns the LBAs with `lba % qd == t`, so no two requests
//! for one block are ever in flight. Every `report` writes the threads meet,
//! the device is fdatasync'ed and one line is printed, in the test guest's
//! format:
//!
//! `STAUNCH blk written=W verified=V mismatches=M errors=E maxio_us=U`
//!
//! (`maxio_us`: the longest single pwrite or pread since the last report),
//! the last one with `final=1`. Arguments: the device (default /dev/vda)
//! and `key=value`s, with or without a `staunch.` prefix (so they can be
//! copied from the kernel command line): `writes`, `blocks`, `qd`, `report`.

use staunch_guestproto::{check_block, exit_code, fill_block, lba_for, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::Instant;

#[derive(Debug, PartialEq, Eq)]
struct Config {
    dev: String,
    writes: u64,
    blocks: u64,
    qd: u64,
    report: u64,
}

impl Config {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Config, String> {
        let mut c = Config { dev: "/dev/vda".into(), writes: 10_000, blocks: 256, qd: 4, report: 500 };
        for a in args {
            let Some((k, v)) = a.split_once('=') else {
                c.dev = a;
                continue;
            };
            let n: u64 = v.parse().map_err(|_| format!("{a}: not a number"))?;
            match k.strip_prefix("staunch.").unwrap_or(k) {
                "writes" => c.writes = n,
                "blocks" => c.blocks = n,
                "qd" => c.qd = n,
                "report" => c.report = n,
                _ => return Err(format!("unknown parameter {a}")),
            }
        }
        if !(1..=64).contains(&c.qd) || c.blocks < c.qd || !c.blocks.is_multiple_of(c.qd) || c.report == 0 {
            return Err(format!("need 1 <= qd <= 64, blocks a multiple of qd and report > 0: {c:?}"));
        }
        Ok(c)
    }
}

/// One block, aligned as O_DIRECT needs.
#[repr(C, align(4096))]
struct Block([u8; BLOCK_SIZE]);

#[derive(Default)]
struct Counts {
    written: AtomicU64,
    verified: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
    maxio_ns: AtomicU64,
    told_error: AtomicBool,
    told_mismatch: AtomicBool,
}

impl Counts {
    fn error(&self, what: std::fmt::Arguments) {
        self.errors.fetch_add(1, Relaxed);
        if !self.told_error.swap(true, Relaxed) {
            line(&format!("STAUNCH blk error {what}"));
        }
    }

    /// Run one pwrite or pread, noting how long it took; anything but a
    /// whole block is an error.
    fn io(&self, what: &str, seq: u64, lba: u64, f: impl FnOnce() -> std::io::Result<usize>) -> bool {
        let t = Instant::now();
        let r = f();
        self.maxio_ns.fetch_max(t.elapsed().as_nanos() as u64, Relaxed);
        match r {
            Ok(BLOCK_SIZE) => true,
            Ok(n) => {
                self.error(format_args!("{what} seq={seq} lba={lba}: {n} of {BLOCK_SIZE} bytes"));
                false
            }
            Err(e) => {
                self.error(format_args!("{what} seq={seq} lba={lba}: {e}"));
                false
            }
        }
    }
}

/// One line to the console in one write(2), so lines never interleave.
fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{s}\n").as_bytes());
    let _ = out.flush();
}

/// Write, read back and verify seq `seq`.
fn one(c: &Config, disk: &File, n: &Counts, seq: u64, w: &mut Block, r: &mut Block) {
    let lba = lba_for(seq, c.blocks);
    let off = lba * BLOCK_SIZE as u64;
    fill_block(&mut w.0, seq, lba);
    if !n.io("write", seq, lba, || disk.write_at(&w.0, off)) {
        return;
    }
    n.written.fetch_add(1, Relaxed);
    if !n.io("read", seq, lba, || disk.read_at(&mut r.0, off)) {
        return;
    }
    match check_block(&r.0, lba) {
        Ok(s) if s == seq => {
            n.verified.fetch_add(1, Relaxed);
        }
        got => {
            n.mismatches.fetch_add(1, Relaxed);
            if !n.told_mismatch.swap(true, Relaxed) {
                line(&format!("STAUNCH blk mismatch seq={seq} lba={lba} got={got:?}"));
            }
        }
    }
}

/// Thread `t`'s share of the writes, meeting the others at each report.
fn worker(t: u64, c: &Config, disk: &File, n: &Counts, meet: &Barrier) {
    let (mut w, mut r) = (Box::new(Block([0; BLOCK_SIZE])), Box::new(Block([0; BLOCK_SIZE])));
    let mut seq = t;
    let mut stop = c.report.min(c.writes);
    loop {
        while seq < stop {
            one(c, disk, n, seq, &mut w, &mut r);
            seq += c.qd;
        }
        // Every write below `stop` is done: one thread syncs and reports
        // while the others wait, so the counts are exact.
        if meet.wait().is_leader() {
            if let Err(e) = disk.sync_data() {
                n.error(format_args!("fdatasync: {e}"));
            }
            let us = n.maxio_ns.swap(0, Relaxed) / 1000;
            let last = if stop == c.writes { " final=1" } else { "" };
            line(&format!(
                "STAUNCH blk written={} verified={} mismatches={} errors={}{last} maxio_us={us}",
                n.written.load(Relaxed),
                n.verified.load(Relaxed),
                n.mismatches.load(Relaxed),
                n.errors.load(Relaxed),
            ));
        }
        meet.wait();
        if stop == c.writes {
            return;
        }
        stop = (stop + c.report).min(c.writes);
    }
}

fn run(c: &Config) -> u8 {
    let disk = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&c.dev) {
        Ok(f) => f,
        Err(e) => {
            line(&format!("STAUNCH blk error open {}: {e}", c.dev));
            return exit_code::NO_DEVICE;
        }
    };
    let size = (&disk).seek(SeekFrom::End(0)).unwrap_or(0);
    if size < c.blocks * BLOCK_SIZE as u64 {
        line(&format!("STAUNCH blk error {} holds {size} bytes, fewer than {} blocks", c.dev, c.blocks));
        return exit_code::BAD_CONFIG;
    }
    line(&format!(
        "STAUNCH linux-blk dev={} writes={} blocks={} qd={} report={}",
        c.dev, c.writes, c.blocks, c.qd, c.report
    ));
    let n = Counts::default();
    let meet = Barrier::new(c.qd as usize);
    std::thread::scope(|s| {
        for t in 0..c.qd {
            let (disk, n, meet) = (&disk, &n, &meet);
            s.spawn(move || worker(t, c, disk, n, meet));
        }
    });
    let trimmed = trim(c, &disk);
    if n.mismatches.load(Relaxed) > 0 {
        exit_code::MISMATCH
    } else if n.errors.load(Relaxed) > 0 || n.verified.load(Relaxed) != c.writes || !trimmed {
        exit_code::FAULT
    } else {
        exit_code::OK
    }
}

/// After the run: discard the 16 blocks after the verified region and
/// zero out the 16 after those (the host's check covers only `blocks`),
/// through the kernel's BLKDISCARD and BLKZEROOUT, which send the device
/// VIRTIO_BLK_T_DISCARD and T_WRITE_ZEROES when it offers them; all 32 must
/// read back as zeros (this device punches or zeroes the range). One line:
/// `STAUNCH blk trim discard_max_bytes=D write_zeroes_max_bytes=Z zeroed=1 errors=E`.
fn trim(c: &Config, disk: &File) -> bool {
    const BLKDISCARD: libc::c_ulong = 0x1277;
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    const SPAN: u64 = 16 * BLOCK_SIZE as u64;
    let name = c.dev.rsplit('/').next().unwrap_or("vda");
    let queue = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/block/{name}/queue/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let base = c.blocks * BLOCK_SIZE as u64;
    let mut errors = 0;
    let mut b = Box::new(Block([0x5a; BLOCK_SIZE]));
    for i in 0..2 * SPAN / BLOCK_SIZE as u64 {
        if disk.write_at(&b.0, base + i * BLOCK_SIZE as u64).map_or(true, |n| n != BLOCK_SIZE) {
            errors += 1;
        }
    }
    for (req, at) in [(BLKDISCARD, base), (BLKZEROOUT, base + SPAN)] {
        let range: [u64; 2] = [at, SPAN];
        // SAFETY: both ioctls read a u64[2] (start, length) we own.
        if unsafe { libc::ioctl(disk.as_raw_fd(), req, range.as_ptr()) } != 0 {
            line(&format!("STAUNCH blk error ioctl {req:#x}: {}", std::io::Error::last_os_error()));
            errors += 1;
        }
    }
    let mut zeroed = true;
    for i in 0..2 * SPAN / BLOCK_SIZE as u64 {
        b.0.fill(0xff);
        if disk.read_at(&mut b.0, base + i * BLOCK_SIZE as u64).map_or(true, |n| n != BLOCK_SIZE) {
            errors += 1;
        }
        zeroed &= b.0.iter().all(|&x| x == 0);
    }
    line(&format!(
        "STAUNCH blk trim discard_max_bytes={} write_zeroes_max_bytes={} zeroed={} errors={errors}",
        queue("discard_max_bytes"),
        queue("write_zeroes_max_bytes"),
        zeroed as u8
    ));
    errors == 0 && zeroed
}

fn main() {
    let code = match Config::parse(std::env::args().skip(1)) {
        Ok(c) => run(&c),
        Err(e) => {
            line(&format!("STAUNCH blk error {e}"));
            exit_code::BAD_CONFIG
        }
    };
    std::process::exit(code.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn arguments() {
        let c = parse(&["/dev/vdb", "staunch.writes=7", "qd=2", "staunch.blocks=8", "report=3"]).unwrap();
        assert_eq!(c, Config { dev: "/dev/vdb".into(), writes: 7, blocks: 8, qd: 2, report: 3 });
        assert!(parse(&["staunch.work=blk-verify"]).is_err());
        assert!(parse(&["writes=x"]).is_err());
        assert!(parse(&["qd=3", "blocks=8"]).is_err(), "qd must divide blocks");
        assert!(parse(&["qd=0"]).is_err());
    }
}
