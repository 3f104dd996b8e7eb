//! Staunch test guest: a freestanding x86-64 program that proves a VM's state
//! survives. Workloads are chosen on the kernel command line
//! (`staunch.work=counter|blk-verify|console|exits|blk-bench|spin|echo|net-ping|net-echo`) and
//! report over COM1 in lines starting with `STAUNCH `. Every CPU but the
//! boot CPU runs a counter in every workload (`staunch.aps=idle`: they
//! halt), and the boot CPU checks them at each report (`cpus=`). Report
//! lines carry `maxgap_us=`, the longest pause the guest saw since the
//! previous report (see `clock`).
#![no_std]
#![no_main]
#![no_builtins]

mod boot;
mod clock;
mod io;
mod net;
mod virtio;

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};
use proto::blk::{Bad, InFlight, Request, SeqWindow};
use staunch_guestproto::{self as proto, exit_code, BLOCK_SIZE, SECTORS_PER_BLOCK};

#[derive(Clone, Copy, PartialEq)]
enum Work {
    Counter,
    BlkVerify,
    Exits,
    BlkBench,
    BlkRand,
    Spin,
    Echo,
    Reset,
    Console,
    NetPing,
    NetEcho,
}

#[derive(Clone, Copy)]
struct Config {
    work: Work,
    ring: u8,
    chunk: u64,
    reports: u64,
    blocks: u64,
    writes: u64,
    iters: u64,
    report_every: u64,
    touch_mib: u64,
    /// Requests `blk-verify` keeps in flight.
    qd: u64,
    /// The other CPUs halt instead of counting.
    aps_idle: bool,
    /// Calibrate the TSC against the PIT even if the hypervisor tells its rate.
    tsc_pit: bool,
    /// The network workloads: seconds to run, bytes per frame, report
    /// interval, a reply's deadline.
    secs: u64,
    frame: u64,
    report_ms: u64,
    timeout_ms: u64,
}

static mut CONFIG: Config = Config {
    work: Work::Counter,
    ring: 3,
    chunk: 1 << 22,
    reports: 0,
    blocks: 64,
    writes: 0,
    iters: 100_000,
    report_every: 64,
    touch_mib: 0,
    qd: 4,
    aps_idle: false,
    tsc_pit: false,
    secs: 0,
    frame: 128,
    report_ms: 500,
    timeout_ms: 1000,
};
static mut CMDLINE: [u8; 2048] = [0; 2048];
static mut CMDLINE_LEN: usize = 0;
/// Boot CPU has built page tables and the IDT: the others may proceed.
static RELEASED: AtomicU64 = AtomicU64::new(0);
/// One counter per CPU, incremented in guest memory: the APs' in every
/// workload, the boot CPU's by the `counter` workload.
static mut COUNTERS: [u64; boot::MAX_CPUS] = [0; boot::MAX_CPUS];
/// Where the boot CPU's clock came from.
static mut TSC_SOURCE: clock::Source = clock::Source::None;

pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    let (digits, mult) = match digits.as_bytes().last() {
        Some(b'K' | b'k') if radix == 10 => (&digits[..digits.len() - 1], 1 << 10),
        Some(b'M' | b'm') if radix == 10 => (&digits[..digits.len() - 1], 1 << 20),
        _ => (digits, 1),
    };
    u64::from_str_radix(digits, radix).ok()?.checked_mul(mult)
}

/// Copy the command line out of the zero page (Staunch) or PVH start info (QEMU).
fn read_cmdline(info: u64, kind: u64) {
    // SAFETY: the boot protocols put these structures in identity-mapped RAM.
    unsafe {
        let ptr = if kind == boot::BOOT_PVH {
            read_volatile((info + 24) as *const u64)
        } else {
            read_volatile((info + 0x228) as *const u32) as u64
        };
        let buf = &mut *addr_of_mut!(CMDLINE);
        let mut n = 0;
        if ptr != 0 {
            while n < buf.len() - 1 {
                let c = read_volatile((ptr + n as u64) as *const u8);
                if c == 0 {
                    break;
                }
                buf[n] = c;
                n += 1;
            }
        }
        CMDLINE_LEN = n;
    }
}

fn cmdline() -> &'static str {
    // SAFETY: written once by the boot CPU before anyone reads it.
    unsafe {
        let b = &(&*addr_of!(CMDLINE))[..CMDLINE_LEN];
        core::str::from_utf8(b).unwrap_or("")
    }
}

fn parse_config() -> Result<Config, &'static str> {
    // SAFETY: boot CPU only, before release.
    let mut c = unsafe { CONFIG };
    for w in cmdline().split(' ') {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let Some(k) = k.strip_prefix("staunch.") else {
            continue;
        };
        let num = || parse_u64(v).ok_or("bad number");
        match k {
            "work" => {
                c.work = match v {
                    "counter" => Work::Counter,
                    "blk-verify" => Work::BlkVerify,
                    "exits" => Work::Exits,
                    "blk-bench" => Work::BlkBench,
                    "blk-rand" => Work::BlkRand,
                    "spin" => Work::Spin,
                    "echo" => Work::Echo,
                    "reset" => Work::Reset,
                    "console" => Work::Console,
                    "net-ping" => Work::NetPing,
                    "net-echo" => Work::NetEcho,
                    _ => return Err("unknown workload"),
                }
            }
            "ring" => c.ring = if num()? == 0 { 0 } else { 3 },
            "chunk" => c.chunk = num()?.max(1),
            "reports" => c.reports = num()?,
            "blocks" => c.blocks = num()?.max(1),
            "writes" => c.writes = num()?,
            "iters" => c.iters = num()?,
            "report" => c.report_every = num()?.max(1),
            "touch" => c.touch_mib = num()?,
            "qd" => c.qd = num()?.max(1),
            "secs" => c.secs = num()?,
            "frame" => c.frame = num()?,
            "report_ms" => c.report_ms = num()?.max(1),
            "timeout_ms" => c.timeout_ms = num()?.max(1),
            "aps" => {
                c.aps_idle = match v {
                    "idle" => true,
                    "counter" => false,
                    _ => return Err("staunch.aps is idle or counter"),
                }
            }
            "tsc" => {
                c.tsc_pit = match v {
                    "pit" => true,
                    "auto" => false,
                    _ => return Err("staunch.tsc is auto or pit"),
                }
            }
            _ => return Err("unknown staunch.* option"),
        }
    }
    Ok(c)
}

#[no_mangle]
extern "C" fn kmain(cpu: u64, info: u64, kind: u64) -> ! {
    let cpu = cpu as usize;
    if cpu >= boot::MAX_CPUS {
        loop {
            // SAFETY: park CPUs this image has no room for.
            unsafe { asm!("hlt") };
        }
    }
    if cpu == 0 {
        boot::setup_paging();
        boot::setup_cpu(0);
        io::serial_init();
        read_cmdline(info, kind);
        match parse_config() {
            // SAFETY: boot CPU, before release.
            Ok(c) => unsafe { CONFIG = c },
            Err(e) => {
                say!("error config {} cmdline=\"{}\"", e, cmdline());
                io::power_off(exit_code::BAD_CONFIG);
            }
        }
        // SAFETY: boot CPU, before release.
        unsafe { TSC_SOURCE = clock::calibrate(CONFIG.tsc_pit) };
        RELEASED.store(1, Ordering::Release);
    } else {
        while RELEASED.load(Ordering::Acquire) == 0 {
            core::hint::spin_loop();
        }
        boot::load_paging();
        boot::setup_cpu(cpu);
    }
    // SAFETY: CONFIG is read-only after release.
    let (ring, aps_idle) = unsafe { (CONFIG.ring, CONFIG.aps_idle) };
    if cpu != 0 && aps_idle {
        // Told to stay out of the way: halt with interrupts off, so its vCPU
        // thread sleeps in the hypervisor instead of spinning.
        loop {
            // SAFETY: ring 0, interrupts disabled: the CPU just stops.
            unsafe { asm!("cli", "hlt") };
        }
    }
    if ring == 3 {
        boot::enter_user(user_main, boot::user_stack(cpu), cpu as u64);
    }
    user_main(cpu as u64)
}

pub fn fault_frame(vector: u64, err: u64, rip: u64, cs: u64) -> ! {
    say!("fault vector={} err={:#x} rip={:#x} cs={:#x}", vector, err, rip, cs);
    io::power_off(exit_code::FAULT)
}

#[no_mangle]
extern "C" fn fault(vector: u64, frame: *const u64) -> ! {
    // SAFETY: the frame is the CPU's exception frame on our stack.
    let f = |i| unsafe { read_volatile(frame.add(i)) };
    say!("fault vector={} w0={:#x} w1={:#x} w2={:#x}", vector, f(0), f(1), f(2));
    io::power_off(exit_code::FAULT)
}

extern "C" fn user_main(cpu: u64) -> ! {
    // SAFETY: read-only after release.
    let c = unsafe { CONFIG };
    if cpu != 0 {
        count_forever(cpu as usize);
    }
    // SAFETY: written by the boot CPU before release.
    let src = unsafe { TSC_SOURCE };
    say!("ready ring={} tsc_khz={} tsc_src={} cmdline=\"{}\"", c.ring, clock::tsc_khz(), src.name(), cmdline());
    if c.touch_mib > 0 {
        touch(c.touch_mib);
    }
    check_cpus();
    clock::take_maxgap_us();
    let code = match c.work {
        Work::Counter => counter(&c),
        Work::BlkVerify => blk_verify(&c),
        Work::Console => console(&c),
        Work::Exits => exits(&c),
        Work::BlkBench => blk_bench(&c),
        Work::BlkRand => blk_rand(&c),
        Work::Spin => spin(&c),
        Work::Echo => echo(),
        Work::NetPing => net::ping(cmdline(), &net_params(&c)),
        Work::NetEcho => net::echo(cmdline(), &net_params(&c)),
        Work::Reset => {
            // Pulse the CPU reset line through the i8042, as Linux's reboot=k does.
            say!("resetting");
            io::outb(0x64, 0xfe);
            exit_code::FAULT
        }
    };
    say!("done code={}", code);
    io::power_off(code)
}

fn net_params(c: &Config) -> net::Params {
    // `staunch.qd` is the window of requests awaiting replies.
    net::Params { secs: c.secs, window: c.qd, frame: c.frame, report_ms: c.report_ms, timeout_ms: c.timeout_ms }
}

/// Dirty `mib` MiB of RAM from 16 MiB up (one pattern word per 512 bytes), so
/// the guest's memory holds real data (snapshots then carry it).
fn touch(mib: u64) {
    let start = 16u64 << 20;
    let end = start + (mib.min(2900) << 20);
    let mut a = start;
    while a < end {
        // SAFETY: identity-mapped guest RAM above this image, below the MMIO
        // hole; the VMM gave the guest at least this much (else it faults and
        // reports it).
        unsafe { write_volatile(a as *mut u64, a ^ 0x5354_4e43) };
        a += 512;
    }
    say!("touched mib={}", mib);
}

/// Increments between two ticks of the boot CPU's pause meter: ~30 us in
/// ring 3 here. (A tick's `rdtsc` costs ~0.7 us under KVM-PVM, which
/// emulates it: every 4096 increments it slowed the counter by 12%; now 2%.)
const TICK_EVERY: u64 = 1 << 15;

fn bump(cpu: usize, n: u64) -> u64 {
    // SAFETY: each CPU writes only its own slot; volatile keeps every increment
    // a real store to guest memory.
    unsafe {
        let p = addr_of_mut!(COUNTERS[cpu]);
        let mut left = n;
        while left > 0 {
            let k = left.min(TICK_EVERY);
            for _ in 0..k {
                write_volatile(p, read_volatile(p) + 1);
            }
            left -= k;
            if cpu == 0 {
                clock::tick();
            }
        }
        read_volatile(p)
    }
}

fn count_forever(cpu: usize) -> ! {
    loop {
        bump(cpu, 1 << 16);
    }
}

/// The boot CPU's last look at every CPU's counter, and at its own tick
/// count. Statics, not locals: zeroing or moving an array compiles to SSE
/// stores, which KVM-PVM's emulator of ring-0 code (`staunch.ring=0`) lacks.
static mut SEEN: [u64; boot::MAX_CPUS] = [0; boot::MAX_CPUS];
static mut SEEN_TICKS: u64 = 0;

/// At a report: how many CPUs' counters moved since the last one (the boot
/// CPU's own liveness is its tick count), and how many APs' counters went
/// back (each printed as a `cpu mismatch`).
fn check_cpus() -> (u64, u64) {
    let t = clock::ticks();
    // SAFETY: the boot CPU alone uses SEEN*; reading another CPU's counter
    // cannot tear (an aligned u64).
    unsafe {
        let mut moved = (t != SEEN_TICKS) as u64;
        SEEN_TICKS = t;
        let mut back = 0;
        for i in 1..boot::MAX_CPUS {
            let now = read_volatile(addr_of!(COUNTERS[i]));
            let last = read_volatile(addr_of!(SEEN[i]));
            if now < last {
                back += 1;
                say!("cpu mismatch cpu={} was={} now={}", i, last, now);
            } else if now > last {
                moved += 1;
            }
            write_volatile(addr_of_mut!(SEEN[i]), now);
        }
        (moved, back)
    }
}

fn counter(c: &Config) -> u8 {
    let mut n = 0;
    let mut mismatches = 0;
    while c.reports == 0 || n < c.reports {
        let v = bump(0, c.chunk);
        n += 1;
        let (alive, back) = check_cpus();
        mismatches += back;
        let gap = clock::take_maxgap_us();
        say!("counter={} tick={} cpus={} mismatches={} maxgap_us={}", v, n, alive, mismatches, gap);
    }
    if mismatches == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

static mut CON_DATA: [u8; proto::console::DATA_MAX] = [0; proto::console::DATA_MAX];

/// A byte stream the host can check byte for byte (`proto::console`):
/// every byte but the `maxgap_us` values follows from the line's seq. The
/// lines carry no `cpus=` (it would not be predictable); the APs are still
/// checked at every line, and one that went back prints a `cpu mismatch`
/// line, which the host's check sees as foreign bytes in the stream.
fn console(c: &Config) -> u8 {
    // SAFETY: the boot CPU's alone (a static for ring 0's sake, see SEEN).
    let d = unsafe { &mut *addr_of_mut!(CON_DATA) };
    let mut n = 0;
    let mut mismatches = 0;
    while c.reports == 0 || n < c.reports {
        mismatches += check_cpus().1;
        let gap = clock::take_maxgap_us();
        say!("con seq={} maxgap_us={} data={}", n, gap, proto::console::data(n, d));
        n += 1;
    }
    let (alive, back) = check_cpus();
    mismatches += back;
    let gap = clock::take_maxgap_us();
    say!("con end lines={} cpus={} mismatches={} maxgap_us={}", n, alive, mismatches, gap);
    if mismatches == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

#[repr(C, align(4096))]
struct Buf([u8; BLOCK_SIZE]);
static mut WBUF: Buf = Buf([0; BLOCK_SIZE]);
static mut BLK_ID: [u8; 20] = [0; 20];
/// Each slot's own write and read buffers.
#[repr(C, align(4096))]
struct SlotBufs([[[u8; BLOCK_SIZE]; 2]; virtio::MAX_SLOTS]);
static mut SLOT_BUFS: SlotBufs = SlotBufs([[[0; BLOCK_SIZE]; 2]; virtio::MAX_SLOTS]);

fn slot_buf(slot: usize, read: bool) -> *mut [u8; BLOCK_SIZE] {
    // SAFETY: only the address is taken here.
    unsafe { addr_of_mut!(SLOT_BUFS.0[slot][read as usize]) }
}

fn open_blk() -> Option<virtio::Blk> {
    match virtio::find_blk(cmdline()) {
        Ok(b) => {
            say!("blk capacity={} ro={} flush={}", b.capacity, b.read_only as u8, b.flush as u8);
            Some(b)
        }
        Err(e) => {
            say!("error blk {:?}", e);
            None
        }
    }
}

/// `blk-verify`'s pipeline: slot 0 carries flushes, slots 1..=depth carry
/// one write-then-read-back each.
struct Verify {
    blk: virtio::Blk,
    fl: InFlight,
    win: SeqWindow,
    blocks: u64,
    verified: u64,
    mismatches: u64,
    errors: u64,
    kick: bool,
    /// When each slot's request was handed to the device (TSC), and the
    /// longest any data request took since the last report: the I/O stall
    /// the guest itself saw (a backend restart shows here).
    submitted: [u64; virtio::MAX_SLOTS],
    maxio: u64,
}

impl Verify {
    fn start_write(&mut self, slot: usize, seq: u64) {
        let lba = proto::lba_for(seq, self.blocks);
        let b = slot_buf(slot, false);
        // SAFETY: the slot is free, so the device is done with its buffers.
        proto::fill_block(unsafe { &mut *b }, seq, lba);
        self.blk.submit(slot, virtio::T_OUT, lba * SECTORS_PER_BLOCK, Some((b as u64, BLOCK_SIZE as u32)));
        self.fl.submit(slot, Request { kind: virtio::T_OUT, seq, lba, writable: 1 });
        self.submitted[slot] = io::rdtsc();
        self.kick = true;
    }

    fn start_read(&mut self, slot: usize, seq: u64, lba: u64) {
        let b = slot_buf(slot, true);
        // SAFETY: as in start_write.
        unsafe { (*b).fill(0) };
        self.blk.submit(slot, virtio::T_IN, lba * SECTORS_PER_BLOCK, Some((b as u64, BLOCK_SIZE as u32)));
        self.fl.submit(slot, Request { kind: virtio::T_IN, seq, lba, writable: BLOCK_SIZE as u32 + 1 });
        self.submitted[slot] = io::rdtsc();
        self.kick = true;
    }

    /// Check one used-ring entry and move its slot on.
    fn complete(&mut self, u: virtio::UsedElem) {
        if let Err(b) = self.fl.check_used_index(u.driver_idx, u.device_idx) {
            self.bad(b, u);
            self.blk.resync();
            return;
        }
        let blk = &self.blk;
        let d = match self.fl.complete(u.id, u.len, |s| blk.status(s)) {
            Ok(d) => d,
            Err(b) => {
                self.bad(b, u);
                if let Some(r) = b.request().filter(|r| r.kind != virtio::T_FLUSH) {
                    self.win.retire(r.seq);
                }
                return;
            }
        };
        let (seq, lba) = (d.req.seq, d.req.lba);
        if d.req.kind != virtio::T_FLUSH {
            if let Some(t) = self.submitted.get(d.slot) {
                self.maxio = self.maxio.max(io::rdtsc().saturating_sub(*t));
            }
        }
        match d.req.kind {
            virtio::T_OUT if d.status == 0 => {
                self.win.wrote(seq, true);
                self.start_read(d.slot, seq, lba);
            }
            virtio::T_OUT => {
                self.errors += 1;
                self.win.retire(seq);
            }
            virtio::T_IN => {
                // SAFETY: the read completed: the device is done with the buffer.
                let got = proto::check_block(unsafe { &*slot_buf(d.slot, true) }, lba);
                match (d.status, got) {
                    (0, Ok(s)) if s == seq => self.verified += 1,
                    (0, r) => {
                        self.mismatches += 1;
                        say!("blk mismatch seq={} lba={} got={:?}", seq, lba, r);
                    }
                    _ => self.errors += 1,
                }
                self.win.retire(seq);
            }
            _ => {
                if d.status != 0 {
                    self.errors += 1;
                    say!("blk flush status={}", d.status);
                }
            }
        }
    }

    fn bad(&mut self, b: Bad, u: virtio::UsedElem) {
        self.mismatches += 1;
        match b.request() {
            Some(r) => say!("blk mismatch why={} id={} len={} seq={} lba={}", b.why(), u.id, u.len, r.seq, r.lba),
            None => say!(
                "blk mismatch why={} id={} len={} used={} device_used={}",
                b.why(),
                u.id,
                u.len,
                u.driver_idx,
                u.device_idx
            ),
        }
    }

    /// Take every completion posted, then tell the device about the reads
    /// they started.
    fn drain_used(&mut self) -> bool {
        let mut any = false;
        while let Some(u) = self.blk.poll() {
            self.complete(u);
            any = true;
        }
        if self.kick {
            self.blk.kick();
            self.kick = false;
        }
        any
    }

    /// Flush in slot 0, with the data slots idle; its status is checked.
    fn flush(&mut self) {
        self.blk.submit(0, virtio::T_FLUSH, 0, None);
        self.fl.submit(0, Request { kind: virtio::T_FLUSH, seq: 0, lba: 0, writable: 1 });
        self.blk.kick();
        while self.fl.is_busy(0) {
            if !self.drain_used() {
                core::hint::spin_loop();
            }
        }
    }
}

fn blk_verify(c: &Config) -> u8 {
    let Some(mut blk) = open_blk() else {
        return exit_code::NO_DEVICE;
    };
    // SAFETY: the buffer belongs to the boot CPU's workload alone.
    let wbuf = unsafe { &mut (*addr_of_mut!(WBUF)).0 };
    // SAFETY: as above (a static for ring 0's sake, see SEEN).
    let id = unsafe { &mut *addr_of_mut!(BLK_ID) };
    let st = blk.request(virtio::T_GET_ID, 0, Some(&mut id[..]));
    let idlen = id.iter().position(|b| *b == 0).unwrap_or(20);
    say!("blk id=\"{}\" status={}", core::str::from_utf8(&id[..idlen]).unwrap_or("?"), st);
    if blk.read_only {
        proto::fill_block(wbuf, 0, 0);
        let st = blk.request(virtio::T_OUT, 0, Some(&mut wbuf[..]));
        say!("blk ro-write status={}", st);
        return if st == 0 { exit_code::MISMATCH } else { exit_code::OK };
    }
    let blocks = c.blocks.min(blk.capacity / SECTORS_PER_BLOCK);
    if blocks == 0 {
        say!("error blk disk too small");
        return exit_code::NO_DEVICE;
    }
    // Queue depth: as asked, at most the queue's slots but one (slot 0 is
    // for flushes) and at most `blocks`, so the seqs in flight (a window of
    // `depth` consecutive ones, see proto::blk::SeqWindow) never share a block.
    let slots = blk.slots().min(proto::blk::MAX_SLOTS);
    let depth = c.qd.min(slots as u64 - 1).min(blocks).max(1);
    say!("blk qd={} blocks={} slots={}", depth, blocks, slots);
    let mut v = Verify {
        blk,
        fl: InFlight::new(depth as usize + 1, virtio::STRIDE as u32),
        win: SeqWindow::new(depth, c.writes),
        blocks,
        verified: 0,
        mismatches: 0,
        errors: 0,
        kick: false,
        submitted: [0; virtio::MAX_SLOTS],
        maxio: 0,
    };
    // Issue up to each report boundary, then let the pipeline drain before
    // flushing and reporting: at a report every write issued has completed,
    // so `written` is exactly what is on disk (SeqWindow's docs).
    let mut stop = c.report_every;
    loop {
        while let Some(slot) = v.fl.free_in(1..depth as usize + 1) {
            let Some(seq) = v.win.issue(stop) else { break };
            v.start_write(slot, seq);
        }
        if v.kick {
            v.blk.kick();
            v.kick = false;
        }
        if v.fl.busy() == 0 {
            let last = v.win.finished();
            if v.blk.flush {
                v.flush();
            }
            let (alive, back) = check_cpus();
            v.mismatches += back;
            let gap = clock::take_maxgap_us();
            let maxio = clock::cycles_to_us(core::mem::take(&mut v.maxio));
            let (w, ok, bad, err) = (v.win.written(), v.verified, v.mismatches, v.errors);
            if last {
                say!(
                    "blk written={} verified={} mismatches={} errors={} final=1 cpus={} maxgap_us={} maxio_us={}",
                    w,
                    ok,
                    bad,
                    err,
                    alive,
                    gap,
                    maxio
                );
                break;
            }
            say!(
                "blk written={} verified={} mismatches={} errors={} cpus={} maxgap_us={} maxio_us={}",
                w,
                ok,
                bad,
                err,
                alive,
                gap,
                maxio
            );
            v.blk.ack_interrupt();
            stop += c.report_every;
            continue;
        }
        if !v.drain_used() {
            core::hint::spin_loop();
        }
    }
    if v.mismatches == 0 && v.errors == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

fn exits(c: &Config) -> u8 {
    let n = c.iters;
    say!("exits pio-begin n={}", n);
    let t = io::rdtsc();
    // Ticks every 64 exits: a tick's emulated rdtsc (~0.7 us) on each would
    // add ~9% to the exit cost this measures.
    for i in 0..n {
        io::outb(proto::BENCH_PORT, 0);
        if i % 64 == 0 {
            clock::tick();
        }
    }
    say!("exits pio-end n={} cycles={}", n, io::rdtsc() - t);
    let Some(dev) = virtio::first_device(cmdline()) else {
        say!("exits mmio-skip no device");
        return exit_code::OK;
    };
    say!("exits mmio-begin n={}", n);
    let t = io::rdtsc();
    let mut x = 0u32;
    for i in 0..n {
        x ^= io::mmio_read32(dev);
        if i % 64 == 0 {
            clock::tick();
        }
    }
    say!("exits mmio-end n={} cycles={} x={:#x}", n, io::rdtsc() - t, x);
    exit_code::OK
}

fn blk_bench(c: &Config) -> u8 {
    let Some(mut blk) = open_blk() else {
        return exit_code::NO_DEVICE;
    };
    // SAFETY: as in blk_verify.
    let buf = unsafe { &mut (*addr_of_mut!(WBUF)).0 };
    let blocks = c.blocks.min(blk.capacity / SECTORS_PER_BLOCK).max(1);
    let mut errors = 0;
    for (name, kind) in [("read", virtio::T_IN), ("write", virtio::T_OUT)] {
        say!("blkbench {}-begin n={}", name, c.iters);
        let t = io::rdtsc();
        for i in 0..c.iters {
            if blk.request(kind, (i % blocks) * SECTORS_PER_BLOCK, Some(&mut buf[..])) != 0 {
                errors += 1;
            }
        }
        say!("blkbench {}-end n={} cycles={} errors={}", name, c.iters, io::rdtsc() - t, errors);
    }
    if errors == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

/// Random 4 KiB reads, then writes, `staunch.qd` of them in flight, over
/// `staunch.blocks` blocks: a request rate like fio's randread/randwrite.
/// Each phase also reports the longest single request it saw.
fn blk_rand(c: &Config) -> u8 {
    let Some(mut blk) = open_blk() else {
        return exit_code::NO_DEVICE;
    };
    let blocks = c.blocks.min(blk.capacity / SECTORS_PER_BLOCK).max(1);
    let depth = (c.qd as usize).clamp(1, blk.slots().min(virtio::MAX_SLOTS));
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next_lba = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % blocks
    };
    let mut errors = 0u64;
    for (name, kind) in [("read", virtio::T_IN), ("write", virtio::T_OUT)] {
        say!("blkrand {}-begin n={} qd={}", name, c.iters, depth);
        let t = io::rdtsc();
        let mut started = [0u64; virtio::MAX_SLOTS];
        let (mut issued, mut done, mut worst) = (0u64, 0u64, 0u64);
        for slot in 0..depth {
            if issued == c.iters {
                break;
            }
            let b = slot_buf(slot, false);
            blk.submit(slot, kind, next_lba() * SECTORS_PER_BLOCK, Some((b as u64, BLOCK_SIZE as u32)));
            started[slot] = io::rdtsc();
            issued += 1;
        }
        blk.kick();
        while done < issued {
            let Some(u) = blk.poll() else {
                core::hint::spin_loop();
                continue;
            };
            let slot = u.id as usize / virtio::STRIDE;
            if slot >= depth || blk.status(slot) != 0 {
                errors += 1;
            }
            let slot = slot.min(depth - 1);
            worst = worst.max(io::rdtsc().saturating_sub(started[slot]));
            done += 1;
            if issued < c.iters {
                let b = slot_buf(slot, false);
                blk.submit(slot, kind, next_lba() * SECTORS_PER_BLOCK, Some((b as u64, BLOCK_SIZE as u32)));
                started[slot] = io::rdtsc();
                issued += 1;
                blk.kick();
            }
        }
        say!(
            "blkrand {}-end n={} cycles={} errors={} maxio_us={}",
            name,
            done,
            io::rdtsc() - t,
            errors,
            clock::cycles_to_us(worst)
        );
    }
    if errors == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

fn spin(c: &Config) -> u8 {
    say!("spin-begin n={}", c.iters);
    let t = io::rdtsc();
    // SAFETY: a pure register loop.
    unsafe { asm!("2: dec {0}", "jnz 2b", inout(reg) c.iters.max(1) => _, options(nomem, nostack)) };
    say!("spin-end n={} cycles={}", c.iters, io::rdtsc() - t);
    exit_code::OK
}

/// Echo serial input back a line at a time; `quit` ends.
fn echo() -> u8 {
    let mut line = [0u8; 128];
    let mut n = 0;
    say!("echo-ready");
    loop {
        clock::tick();
        let Some(b) = io::getc() else {
            core::hint::spin_loop();
            continue;
        };
        if b == b'\n' || b == b'\r' {
            let s = core::str::from_utf8(&line[..n]).unwrap_or("?");
            if s == "quit" {
                return exit_code::OK;
            }
            if n > 0 {
                say!("echo {}", s);
            }
            n = 0;
        } else if n < line.len() {
            line[n] = b;
            n += 1;
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic {}", info.message());
    io::power_off(exit_code::PANIC)
}

#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Memory primitives the compiler calls; `rep` string ops, no recursion.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees valid, non-overlapping ranges.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack)) };
    d
}

#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: forward copy is safe when dest does not start inside src.
        return unsafe { memcpy(d, s, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: in bounds by the loop condition.
        unsafe { *d.add(i) = *s.add(i) };
    }
    d
}

#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees a valid range.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack)) };
    d
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: caller guarantees valid ranges.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
