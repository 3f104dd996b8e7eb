//! Staunch test guest: a freestanding x86-64 program that proves a VM's state
//! survives. Workloads are chosen on the kernel command line
//! (`staunch.work=counter|blk-verify|exits|blk-bench|spin|echo`) and report
//! over COM1 in lines starting with `STAUNCH `.
#![no_std]
#![no_main]
#![no_builtins]

mod boot;
mod io;
mod virtio;

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};
use staunch_guestproto::{self as proto, exit_code, BLOCK_SIZE, SECTORS_PER_BLOCK};

#[derive(Clone, Copy, PartialEq)]
enum Work {
    Counter,
    BlkVerify,
    Exits,
    BlkBench,
    Spin,
    Echo,
    Reset,
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
};
static mut CMDLINE: [u8; 2048] = [0; 2048];
static mut CMDLINE_LEN: usize = 0;
/// Boot CPU has built page tables and the IDT: the others may proceed.
static RELEASED: AtomicU64 = AtomicU64::new(0);
/// One counter per CPU, incremented in guest memory by the `counter` workload.
static mut COUNTERS: [u64; boot::MAX_CPUS] = [0; boot::MAX_CPUS];

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
                    "spin" => Work::Spin,
                    "echo" => Work::Echo,
                    "reset" => Work::Reset,
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
        RELEASED.store(1, Ordering::Release);
    } else {
        while RELEASED.load(Ordering::Acquire) == 0 {
            core::hint::spin_loop();
        }
        boot::load_paging();
        boot::setup_cpu(cpu);
    }
    // SAFETY: CONFIG is read-only after release.
    let (ring, work) = unsafe { (CONFIG.ring, CONFIG.work) };
    if cpu != 0 && work != Work::Counter {
        // Nothing for this CPU to do: halt with interrupts off, so its vCPU
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
        if c.work == Work::Counter {
            count_forever(cpu as usize);
        }
        loop {
            core::hint::spin_loop();
        }
    }
    say!("ready ring={} cmdline=\"{}\"", c.ring, cmdline());
    if c.touch_mib > 0 {
        touch(c.touch_mib);
    }
    let code = match c.work {
        Work::Counter => counter(&c),
        Work::BlkVerify => blk_verify(&c),
        Work::Exits => exits(&c),
        Work::BlkBench => blk_bench(&c),
        Work::Spin => spin(&c),
        Work::Echo => echo(),
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

fn bump(cpu: usize, n: u64) -> u64 {
    // SAFETY: each CPU writes only its own slot; volatile keeps every increment
    // a real store to guest memory.
    unsafe {
        let p = addr_of_mut!(COUNTERS[cpu]);
        for _ in 0..n {
            write_volatile(p, read_volatile(p) + 1);
        }
        read_volatile(p)
    }
}

fn count_forever(cpu: usize) -> ! {
    loop {
        bump(cpu, 1 << 16);
    }
}

fn counter(c: &Config) -> u8 {
    let mut last = [0u64; boot::MAX_CPUS];
    let mut n = 0;
    while c.reports == 0 || n < c.reports {
        let v = bump(0, c.chunk);
        n += 1;
        let mut alive = 0;
        for (i, l) in last.iter_mut().enumerate() {
            // SAFETY: reading another CPU's counter; a torn value is impossible
            // for an aligned u64.
            let now = unsafe { read_volatile(addr_of!(COUNTERS[i])) };
            if now != *l {
                alive += 1;
            }
            *l = now;
        }
        say!("counter={} tick={} cpus={}", v, n, alive);
    }
    exit_code::OK
}

#[repr(C, align(4096))]
struct Buf([u8; BLOCK_SIZE]);
static mut WBUF: Buf = Buf([0; BLOCK_SIZE]);
static mut RBUF: Buf = Buf([0; BLOCK_SIZE]);

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

fn blk_verify(c: &Config) -> u8 {
    let Some(mut blk) = open_blk() else {
        return exit_code::NO_DEVICE;
    };
    // SAFETY: the buffers belong to the boot CPU's workload alone.
    let (wbuf, rbuf) = unsafe { (&mut (*addr_of_mut!(WBUF)).0, &mut (*addr_of_mut!(RBUF)).0) };
    let mut id = [0u8; 20];
    let st = blk.request(virtio::T_GET_ID, 0, Some(&mut id));
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
    let (mut written, mut verified, mut mismatches, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut seq = 0u64;
    while c.writes == 0 || seq < c.writes {
        let lba = proto::lba_for(seq, blocks);
        proto::fill_block(wbuf, seq, lba);
        let st = blk.request(virtio::T_OUT, lba * SECTORS_PER_BLOCK, Some(&mut wbuf[..]));
        if st != 0 {
            errors += 1;
        } else {
            written += 1;
            rbuf.fill(0);
            let st = blk.request(virtio::T_IN, lba * SECTORS_PER_BLOCK, Some(&mut rbuf[..]));
            match (st, proto::check_block(rbuf, lba)) {
                (0, Ok(s)) if s == seq => verified += 1,
                (0, r) => {
                    mismatches += 1;
                    say!("blk mismatch seq={} lba={} got={:?}", seq, lba, r);
                }
                _ => errors += 1,
            }
        }
        seq += 1;
        if seq % c.report_every == 0 {
            if blk.flush {
                blk.request(virtio::T_FLUSH, 0, None);
            }
            say!("blk written={} verified={} mismatches={} errors={}", written, verified, mismatches, errors);
        }
    }
    if blk.flush {
        blk.request(virtio::T_FLUSH, 0, None);
    }
    say!("blk written={} verified={} mismatches={} errors={} final=1", written, verified, mismatches, errors);
    if mismatches == 0 && errors == 0 {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

fn exits(c: &Config) -> u8 {
    let n = c.iters;
    say!("exits pio-begin n={}", n);
    let t = io::rdtsc();
    for _ in 0..n {
        io::outb(proto::BENCH_PORT, 0);
    }
    say!("exits pio-end n={} cycles={}", n, io::rdtsc() - t);
    let Some(dev) = virtio::first_device(cmdline()) else {
        say!("exits mmio-skip no device");
        return exit_code::OK;
    };
    say!("exits mmio-begin n={}", n);
    let t = io::rdtsc();
    let mut x = 0u32;
    for _ in 0..n {
        x ^= io::mmio_read32(dev);
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
