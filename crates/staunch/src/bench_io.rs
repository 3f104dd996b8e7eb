//! `staunch bench io`: the I/O engines a block backend could serve 4 KiB
//! requests with, on this host's disk, side by side in one run: what
//! `staunch blk` does (pread/pwrite on the queue's thread, one request at a
//! time), a thread pool, io_uring, and each of those with O_DIRECT. The
//! choice of engine is made from this table: an engine only helps if it
//! saves a real fraction of what one request costs end to end (`bench blk`).

use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

const BLOCK: usize = 4096;
/// Large enough to spread the offsets, small enough to stay in the page
/// cache (as a guest's disk image does under `bench blk`).
const FILE_BYTES: u64 = 256 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    /// pread/pwrite on one thread: `staunch blk` today.
    Sync,
    /// One thread per request in flight.
    Pool,
    Uring,
    SyncDirect,
    UringDirect,
}

impl Engine {
    const ALL: [Engine; 5] = [Engine::Sync, Engine::Pool, Engine::Uring, Engine::SyncDirect, Engine::UringDirect];
    fn name(self) -> &'static str {
        match self {
            Engine::Sync => "pread/pwrite, queue thread (staunch blk)",
            Engine::Pool => "thread pool (one thread per request in flight)",
            Engine::Uring => "io_uring",
            Engine::SyncDirect => "pread/pwrite, O_DIRECT",
            Engine::UringDirect => "io_uring, O_DIRECT",
        }
    }
    fn direct(self) -> bool {
        matches!(self, Engine::SyncDirect | Engine::UringDirect)
    }
}

/// A 4 KiB-aligned buffer (O_DIRECT needs one).
struct Buf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buf {
    fn new(fill: u8) -> Buf {
        let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("layout");
        // SAFETY: a non-zero-sized layout; the result is checked.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null(), "out of memory");
        // SAFETY: ptr points at BLOCK bytes we own.
        unsafe { std::ptr::write_bytes(ptr, fill, BLOCK) };
        Buf { ptr, layout }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: BLOCK bytes we own, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, BLOCK) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: a plain heap buffer, used by one thread at a time.
unsafe impl Send for Buf {}

/// Random block-aligned offsets in the file.
struct Offsets(crate::campaign::Rng);

impl Offsets {
    fn new(seed: u64) -> Offsets {
        Offsets(crate::campaign::Rng(seed | 1))
    }
    fn next(&mut self) -> u64 {
        (self.0.next() % (FILE_BYTES / BLOCK as u64)) * BLOCK as u64
    }
}

fn open(path: &Path, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).with_context(|| format!("open {} (O_DIRECT: {direct})", path.display()))
}

/// Requests per second for `ops` random 4 KiB requests, `qd` in flight.
fn measure(engine: Engine, path: &Path, write: bool, qd: usize, ops: u64, seed: u64) -> Result<f64> {
    let f = open(path, engine.direct())?;
    let t = Instant::now();
    match engine {
        Engine::Sync | Engine::SyncDirect => serial(&f, write, ops, seed)?,
        Engine::Pool => std::thread::scope(|s| -> Result<()> {
            let per = ops / qd as u64;
            let f = &f;
            let hs: Vec<_> = (0..qd).map(|i| s.spawn(move || serial(f, write, per, seed + i as u64))).collect();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("a pool thread panicked"))??;
            }
            Ok(())
        })?,
        Engine::Uring | Engine::UringDirect => uring(&f, write, qd, ops, seed)?,
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

fn serial(f: &File, write: bool, ops: u64, seed: u64) -> Result<()> {
    let mut b = Buf::new(0x5a);
    let mut o = Offsets::new(seed);
    for _ in 0..ops {
        let off = o.next();
        let n = if write { f.write_at(b.slice(), off)? } else { f.read_at(b.slice(), off)? };
        if n != BLOCK {
            bail!("short {} at {off}: {n}", if write { "write" } else { "read" });
        }
    }
    Ok(())
}

fn uring(f: &File, write: bool, qd: usize, ops: u64, seed: u64) -> Result<()> {
    use io_uring::{opcode, types, IoUring};
    let mut ring = IoUring::new(qd.next_power_of_two() as u32).context("io_uring_setup")?;
    let fd = types::Fd(f.as_raw_fd());
    let mut bufs: Vec<Buf> = (0..qd).map(|_| Buf::new(0x5a)).collect();
    let mut o = Offsets::new(seed);
    let (mut issued, mut done) = (0u64, 0u64);
    let mut push = |ring: &mut IoUring, slot: usize, bufs: &mut [Buf]| -> Result<()> {
        let p = bufs[slot].ptr;
        let off = o.next();
        let e = if write {
            opcode::Write::new(fd, p, BLOCK as u32).offset(off).build()
        } else {
            opcode::Read::new(fd, p, BLOCK as u32).offset(off).build()
        };
        // SAFETY: the buffer lives in `bufs` until its completion is reaped
        // (it is reused only for the slot's next request).
        unsafe { ring.submission().push(&e.user_data(slot as u64)) }.map_err(|_| anyhow::anyhow!("ring full"))?;
        Ok(())
    };
    for slot in 0..qd.min(ops as usize) {
        push(&mut ring, slot, &mut bufs)?;
        issued += 1;
    }
    while done < ops {
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let cqes: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, res) in cqes {
            if res != BLOCK as i32 {
                bail!("io_uring request: {res}");
            }
            done += 1;
            if issued < ops {
                push(&mut ring, slot as usize, &mut bufs)?;
                issued += 1;
            }
        }
    }
    Ok(())
}

/// Microseconds per 4 KiB write followed by fdatasync (a guest's flush).
fn flush_us(path: &Path, n: u32) -> Result<f64> {
    let f = open(path, false)?;
    let mut b = Buf::new(0x33);
    let mut o = Offsets::new(99);
    let t = Instant::now();
    for _ in 0..n {
        f.write_at(b.slice(), o.next())?;
        f.sync_data()?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(quick: bool, rounds: usize, machine: &Machine) -> Result<i32> {
    let dir = crate::guestrun::cache_dir().join("bench-io");
    std::fs::create_dir_all(&dir)?;
    // O_DIRECT writes drop the pages they cover from the page cache: the
    // direct engines get a file of their own, so the buffered ones keep
    // reading a cached image.
    let (path, direct) = (dir.join("buffered.img"), dir.join("direct.img"));
    for p in [&path, &direct] {
        // Real blocks, not a sparse file's holes.
        let f = File::create(p)?;
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..FILE_BYTES / chunk.len() as u64 {
            f.write_at(&chunk, i * chunk.len() as u64)?;
        }
        f.sync_all()?;
    }
    let ops = if quick { 2_000 } else { 40_000 };
    let rounds = if quick { 1 } else { rounds.max(1) };
    let cells = [(false, 1usize), (true, 1), (false, 16), (true, 16)];
    let mut table: Vec<(Engine, [Vec<f64>; 4])> = Engine::ALL.iter().map(|&e| (e, Default::default())).collect();
    // Every page in the page cache before the first cell.
    measure(Engine::Sync, &path, false, 1, FILE_BYTES / BLOCK as u64, 3)?;
    let settle = File::open(&path)?;
    for r in 0..rounds {
        eprintln!("round {}/{rounds} ...", r + 1);
        // A different engine goes first in each round.
        for k in 0..table.len() {
            let n = table.len();
            let (e, vals) = &mut table[(k + r) % n];
            for (i, (write, qd)) in cells.into_iter().enumerate() {
                // The queue thread and O_DIRECT sync serve one at a time.
                let qd = if matches!(e, Engine::Sync | Engine::SyncDirect) { 1 } else { qd };
                // Each cell starts from clean cached pages: a write to a
                // page already dirty costs a fraction of one to a clean page.
                settle.sync_all()?;
                let p = if e.direct() { &direct } else { &path };
                vals[i].push(measure(*e, p, write, qd, ops, 7 + r as u64 * 31 + i as u64)?);
            }
        }
    }
    let mut flush = Vec::new();
    for _ in 0..rounds {
        flush.push(flush_us(&path, if quick { 20 } else { 200 })?);
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&direct);
    println!("{}", machine.head("I/O engines for 4 KiB block requests"));
    println!();
    println!("| engine | randread qd1 | randwrite qd1 | randread qd16 | randwrite qd16 |");
    println!("|---|---:|---:|---:|---:|");
    let base: Vec<f64> = table[0].1.clone().iter_mut().map(|v| median(v)).collect();
    for (e, vals) in table.iter_mut() {
        let cells: Vec<String> = vals
            .iter_mut()
            .zip(&base)
            .map(|(v, b)| {
                let m = median(v);
                format!("{:.0}/s ({:.2} µs, {:.2}x)", m, 1e6 / m, m / b)
            })
            .collect();
        println!("| {} | {} |", e.name(), cells.join(" | "));
    }
    println!();
    println!("4 KiB write + fdatasync (a guest flush): {:.0} µs median of {rounds}", median(&mut flush));
    println!(
        "files: {} MiB each on the cache directory's filesystem (one for the buffered rows, one for O_DIRECT, which \
         evicts what it writes), written and read before the run, synced before each cell (buffered rows hit the \
         page cache, as a guest's image does under bench blk); {ops} requests per cell, median of {rounds}; ratios to the \
         first row; the queue thread serves one request at a time, so its qd16 cells are its qd1",
        FILE_BYTES >> 20
    );
    Ok(0)
}
