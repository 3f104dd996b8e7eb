//! The guest's own clock (the TSC, calibrated at boot) and its pause meter:
//! [`tick`] notes the longest interval between two consecutive calls, and
//! the workloads call it in their loops, between the bytes they print and
//! while they poll a device, so a pause that stops the guest anywhere shows
//! up as `maxgap_us=` on the next report line.
//!
//! Only the boot CPU ticks (the APs run bare counters). The statics are
//! atomics used with plain loads and stores: no locked instructions, which
//! ring-0 code under an instruction emulator may lack.
//!
//! Undisturbed, measured here (KVM-PVM, 2 host cores shared with other
//! builds, load average 3 to 10), `maxgap_us` per report line is:
//! - at least ~290 us on any line: a guest that does nothing but print sees
//!   that much (the longest exit among those that print a line);
//! - `counter`, 1 vCPU: median ~400 us (~360-450 us on a quiet host), p90
//!   ~10 ms and a max of ~90 ms on a host at load 10;
//! - `counter`, 2 vCPUs: ~3-6 ms typical on a quiet host (the scheduler's
//!   slice: two spinning vCPU threads on two shared cores), median ~0.7 ms,
//!   p90 ~25 ms at load 10;
//! - `console`, 1 vCPU: median ~0.5 ms, p90 ~12 ms, max ~110 ms at load 10;
//! - `blk-verify` report lines: 10-100 ms, as their interval holds a flush
//!   (an fsync the VMM runs inside the guest's notify exit).
//!
//! So a pause of a few hundred ms stands out; one of a few ms does not on
//! this host.

use crate::io::{inb, outb, rdtsc};
use core::arch::asm;
use core::arch::x86_64::__cpuid;
use core::ptr::{addr_of, addr_of_mut, read_volatile};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicU64 = AtomicU64::new(0);
static MAXGAP: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);

/// One step of a loop: note the time since the previous tick.
#[inline]
pub fn tick() {
    let now = rdtsc();
    let last = LAST.load(Relaxed);
    // A TSC that went back (it should not) opens a new interval.
    if last != 0 && now > last && now - last > MAXGAP.load(Relaxed) {
        MAXGAP.store(now - last, Relaxed);
    }
    LAST.store(now, Relaxed);
    TICKS.store(TICKS.load(Relaxed).wrapping_add(1), Relaxed);
}

/// How many times the boot CPU ticked (its liveness counter).
pub fn ticks() -> u64 {
    TICKS.load(Relaxed)
}

/// The longest gap since the previous call, in microseconds; starts over.
pub fn take_maxgap_us() -> u64 {
    tick();
    let g = MAXGAP.load(Relaxed);
    MAXGAP.store(0, Relaxed);
    cycles_to_us(g)
}

pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Relaxed)
}

pub fn cycles_to_us(c: u64) -> u64 {
    match tsc_khz() {
        0 => 0,
        k => (c as u128 * 1000 / k as u128) as u64,
    }
}

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    /// The hypervisor's timing leaf, CPUID 0x40000010.
    Cpuid,
    /// KVM's paravirtual clock (its TSC-to-nanoseconds scale).
    Kvmclock,
    /// Counted against the PIT's channel 2.
    Pit,
    None,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Cpuid => "cpuid",
            Source::Kvmclock => "kvmclock",
            Source::Pit => "pit",
            Source::None => "none",
        }
    }
}

/// Find the TSC frequency (ring 0, boot CPU, before the workloads start):
/// the hypervisor's own figure when it gives one (unless `pit`), else the
/// PIT. (Here kvmclock says 2445406 kHz, exactly the host kernel's figure;
/// see `pit_khz` for how close the PIT gets.)
pub fn calibrate(pit: bool) -> Source {
    let (khz, src) = match hypervisor_khz().filter(|_| !pit) {
        Some(r) => r,
        None => match pit_khz() {
            Some(k) => (k, Source::Pit),
            None => (0, Source::None),
        },
    };
    TSC_KHZ.store(khz, Relaxed);
    src
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = __cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// KVM's `pvclock_vcpu_time_info`.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    _pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    mul: u32,
    shift: i8,
    flags: u8,
    _pad: [u8; 2],
}

static mut PVCLOCK: PvClock =
    PvClock { version: 0, _pad0: 0, tsc_timestamp: 0, system_time: 0, mul: 0, shift: 0, flags: 0, _pad: [0; 2] };

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: ring 0; only the KVM clock MSRs, which the caller checked exist.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) };
}

/// The TSC frequency from the hypervisor: CPUID 0x40000010 (VMware's
/// timing leaf, which some VMMs fill in), else the kvmclock scale, which KVM
/// computes from the host's own calibration (exact, and no waiting).
fn hypervisor_khz() -> Option<(u64, Source)> {
    let (max, b, c, d) = cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    if max >= 0x4000_0010 {
        let (khz, ..) = cpuid(0x4000_0010);
        if khz != 0 {
            return Some((khz as u64, Source::Cpuid));
        }
    }
    if &sig != b"KVMKVMKVM\0\0\0" || max < 0x4000_0001 {
        return None;
    }
    let (features, ..) = cpuid(0x4000_0001);
    let msr = if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        MSR_KVM_SYSTEM_TIME_NEW
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        MSR_KVM_SYSTEM_TIME
    } else {
        return None;
    };
    let pv = addr_of_mut!(PVCLOCK);
    wrmsr(msr, pv as u64 | 1);
    // SAFETY: KVM writes the structure before the vCPU runs again; read it
    // as the pvclock protocol says (an odd version is an update under way).
    let (mul, shift) = unsafe {
        let mut tries = 0;
        loop {
            let v = read_volatile(addr_of!((*pv).version));
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            let mul = read_volatile(addr_of!((*pv).mul));
            let shift = read_volatile(addr_of!((*pv).shift));
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            if v != 0 && v & 1 == 0 && v == read_volatile(addr_of!((*pv).version)) {
                break (mul, shift);
            }
            tries += 1;
            if tries > 1000 {
                break (0, 0);
            }
        }
    };
    // Off again: the clock is read once, and a snapshot or a successor
    // need not know about it.
    wrmsr(msr, 0);
    if mul == 0 {
        return None;
    }
    // ns = (tsc << shift) * mul >> 32, so kHz = 10^6 * 2^32 / mul >> shift.
    let mut khz = (1_000_000u64 << 32) / mul as u64;
    if shift < 0 {
        khz <<= -shift;
    } else {
        khz >>= shift;
    }
    Some((khz, Source::Kvmclock))
}

const PIT_HZ: u64 = 1_193_182;

/// One reading of the PIT's channel 2 counter, bracketed by two TSC reads:
/// (TSC at the middle, half the bracket, counter).
fn pit_sample() -> (u64, u64, u16) {
    let a = rdtsc();
    outb(0x43, 0x80); // latch channel 2
    let lo = inb(0x42) as u16;
    let hi = inb(0x42) as u16;
    let b = rdtsc();
    (a + (b - a) / 2, (b - a) / 2, lo | (hi << 8))
}

/// The best-bracketed of a few samples (a preempted one has a wide bracket).
fn pit_best() -> (u64, u64, u16) {
    let mut best = pit_sample();
    for _ in 0..7 {
        let s = pit_sample();
        if s.1 < best.1 {
            best = s;
        }
    }
    best
}

/// The TSC rate against the PIT: channel 2 counts down from 0xffff (55 ms)
/// while the guest reads it, each reading between two TSC reads. A tight
/// reading near the start and one ~40 ms later give the rate; preemption
/// only widens a reading's bracket, and the widest are never used, so a
/// busy host costs precision (the brackets' width over 40 ms), not a wrong
/// figure. None if the counter does not move (no PIT).
fn pit_khz() -> Option<u64> {
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, 0xff);
    outb(0x42, 0xff);
    let (t0, _, c0) = pit_best();
    let mut polls = 0u32;
    while c0.wrapping_sub(pit_sample().2) < (PIT_HZ / 25) as u16 {
        polls += 1;
        if polls > 100_000 {
            return None;
        }
    }
    let (t1, _, c1) = pit_best();
    let ticks = c0.wrapping_sub(c1) as u64;
    (ticks > 0 && t1 > t0).then(|| (t1 - t0) * PIT_HZ / ticks / 1000)
}
