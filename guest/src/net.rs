//! Polling virtio-net driver (virtio-mmio version 2, queue 0 receives,
//! queue 1 transmits) and the network workloads: `net-ping` sends
//! sequence-numbered frames (`staunch_guestproto::net`) to a responder and
//! checks every reply; `net-echo` answers every request it receives.
//!
//! Each descriptor is one buffer for a whole frame and its 12-byte header
//! (no mergeable buffers, no offloads); descriptor `i` is slot `i` of its
//! queue. Interrupts are not wanted (NO_INTERRUPT): everything polls.

use crate::io::{mmio_read32, mmio_write32};
use crate::virtio::{self, Avail, DescTable, Used, D_WRITE, QSIZE};
use crate::{clock, io, say};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use staunch_guestproto::exit_code;
use staunch_guestproto::net::{self as proto, Bad, Kind, Seen};

const F_MAC: u32 = 1 << 5;
const F_STATUS: u32 = 1 << 16;
/// virtio_net_hdr_v1: flags, gso type, header length, gso size, checksum
/// start and offset, buffer count; all zero on transmit.
const HDR: usize = 12;
const BUF: usize = 2048;
const RXQ: usize = 0;
const TXQ: usize = 1;
const NO_INTERRUPT: u16 = 1;

#[repr(C, align(4096))]
struct Bufs([[u8; BUF]; QSIZE]);

static mut DESC: [DescTable; 2] = [DescTable::EMPTY, DescTable::EMPTY];
static mut AVAIL: [Avail; 2] = [Avail::EMPTY, Avail::EMPTY];
static mut USED: [Used; 2] = [Used::EMPTY, Used::EMPTY];
static mut BUFS: [Bufs; 2] = [Bufs([[0; BUF]; QSIZE]), Bufs([[0; BUF]; QSIZE])];

pub struct Net {
    base: u64,
    pub mac: [u8; 6],
    /// The link status the device reports (1: up), if it reports one.
    pub status: Option<u16>,
    pub qsize: usize,
    avail: [u16; 2],
    used: [u16; 2],
    /// Receive buffers handed back since the last kick of queue 0.
    reposted: bool,
}

impl Net {
    pub fn open(cmdline: &str) -> Option<Net> {
        let base = virtio::find(cmdline, 1)?;
        match Net::init(base) {
            Ok(n) => Some(n),
            Err(e) => {
                say!("error net {:?}", e);
                None
            }
        }
    }

    fn init(base: u64) -> Result<Net, virtio::Error> {
        let agreed = virtio::negotiate(base, F_MAC | F_STATUS)?;
        let mut qsize = QSIZE;
        for q in [RXQ, TXQ] {
            // SAFETY: only the boot CPU drives the device; the rings are static.
            let rings = unsafe {
                write_volatile(addr_of_mut!(AVAIL[q].flags), NO_INTERRUPT);
                (addr_of!(DESC[q]) as u64, addr_of!(AVAIL[q]) as u64, addr_of!(USED[q]) as u64)
            };
            qsize = qsize.min(virtio::setup_queue(base, q as u32, 2, rings)?);
        }
        virtio::driver_ok(base);
        let (c0, c1) = (mmio_read32(base + virtio::CONFIG), mmio_read32(base + virtio::CONFIG + 4));
        let [a, b, c, d] = c0.to_le_bytes();
        let [e, f, s0, s1] = c1.to_le_bytes();
        let mac = if agreed & F_MAC != 0 { [a, b, c, d, e, f] } else { [0x02, 0, 0, 0, 0, 1] };
        let status = (agreed & F_STATUS != 0).then_some(u16::from_le_bytes([s0, s1]));
        let mut n = Net { base, mac, status, qsize, avail: [0; 2], used: [0; 2], reposted: false };
        for i in 0..qsize {
            n.post_rx(i as u16);
        }
        n.kick(RXQ);
        Ok(n)
    }

    /// The link status the device reports now (1: up; -1: it reports
    /// none), read at every report: a link that went down shows.
    fn link(&self) -> i32 {
        match self.status {
            Some(_) => (mmio_read32(self.base + virtio::CONFIG + 4) >> 16) as i32,
            None => -1,
        }
    }

    fn buf(q: usize, slot: usize) -> *mut [u8; BUF] {
        // SAFETY: only the address is taken.
        unsafe { addr_of_mut!(BUFS[q].0[slot % QSIZE]) }
    }

    fn publish(&mut self, q: usize, slot: u16, len: u32, flags: u16) {
        let i = slot as usize % QSIZE;
        // SAFETY: one CPU drives the queues; a slot not in the avail ring is
        // the driver's.
        unsafe {
            let d = virtio::Desc { addr: Self::buf(q, i) as u64, len, flags, next: 0 };
            write_volatile(addr_of_mut!(DESC[q].0[i]), d);
            write_volatile(addr_of_mut!(AVAIL[q].ring[self.avail[q] as usize % self.qsize]), slot);
            fence(Ordering::SeqCst);
            self.avail[q] = self.avail[q].wrapping_add(1);
            write_volatile(addr_of_mut!(AVAIL[q].idx), self.avail[q]);
        }
    }

    fn post_rx(&mut self, slot: u16) {
        self.publish(RXQ, slot, BUF as u32, D_WRITE);
        self.reposted = true;
    }

    fn kick(&mut self, q: usize) {
        fence(Ordering::SeqCst);
        mmio_write32(self.base + virtio::QUEUE_NOTIFY, q as u32);
        if q == RXQ {
            self.reposted = false;
        }
    }

    /// The next used entry of queue `q`: (slot, length). Ticks the pause
    /// meter, as every poll loop does.
    fn next_used(&mut self, q: usize) -> Option<(usize, usize)> {
        clock::tick();
        // SAFETY: the used ring is written by the device, read only here.
        unsafe {
            if read_volatile(addr_of!(USED[q].idx)) == self.used[q] {
                return None;
            }
            fence(Ordering::SeqCst);
            let (id, len) = read_volatile(addr_of!(USED[q].ring[self.used[q] as usize % self.qsize]));
            self.used[q] = self.used[q].wrapping_add(1);
            Some((id as usize, len as usize))
        }
    }

    /// Transmit slot `slot`'s buffer: `fill` writes the frame and returns
    /// its length. The slot is the caller's again at its completion.
    fn send(&mut self, slot: usize, fill: impl FnOnce(&mut [u8]) -> usize) {
        // SAFETY: the caller keeps the slot out of the ring until it completes.
        let b = unsafe { &mut *Self::buf(TXQ, slot) };
        b[..HDR].fill(0);
        let n = fill(&mut b[HDR..]);
        self.publish(TXQ, slot as u16, (HDR + n) as u32, 0);
        self.kick(TXQ);
    }

    /// A transmit completion: the slot whose frame the device has sent.
    fn sent(&mut self) -> Option<usize> {
        self.next_used(TXQ).map(|(id, _)| id)
    }

    /// The next received frame, handed to `f` (a slot id that is not ours
    /// or a length beyond the buffer is reported as `None`, a buffer
    /// returned without a frame as an empty one); the buffer goes back to
    /// the device afterwards.
    fn received<R>(&mut self, f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
        let (id, len) = self.next_used(RXQ)?;
        let r = if id < self.qsize && len <= BUF {
            // SAFETY: the device is done with this buffer until we post it again.
            let b = unsafe { &*Self::buf(RXQ, id) };
            // Shorter than a header: a frame the device dropped (Linux
            // counts it as a length error); an empty frame here.
            f(Some(if len < HDR { &[] } else { &b[HDR..len] }))
        } else {
            f(None)
        };
        self.post_rx((id % self.qsize) as u16);
        Some(r)
    }

    /// Hand back the receive buffers taken since the last kick.
    fn flush_rx(&mut self) {
        if self.reposted {
            self.kick(RXQ);
        }
    }
}

/// What the network workloads are told (from the command line).
pub struct Params {
    /// Seconds to run (0: forever).
    pub secs: u64,
    /// Requests kept in flight (`net-ping`).
    pub window: u64,
    /// Bytes per frame.
    pub frame: u64,
    pub report_ms: u64,
    /// A request without a reply this long is counted lost.
    pub timeout_ms: u64,
}

fn ms_to_cycles(ms: u64) -> u64 {
    ms.saturating_mul(clock::tsc_khz())
}

#[derive(Clone, Copy, Default)]
struct Slot {
    seq: u64,
    sent_at: u64,
    /// Waiting for a reply, and for the device to give the buffer back.
    waiting: bool,
    in_ring: bool,
}

/// The guest's own account of a `net-ping` run.
#[derive(Default)]
struct Tally {
    sent: u64,
    replies: u64,
    lost: u64,
    late: u64,
    dup: u64,
    reordered: u64,
    corrupt: u64,
    foreign: u64,
    bad_used: u64,
    highest: Option<u64>,
    /// The longest round trip since the last report, and of the run.
    maxrtt: u64,
    worst: u64,
    rtt_sum: u64,
}

fn report(t: &mut Tally, last: bool, link: i32) {
    let (alive, _) = crate::check_cpus();
    let mean = if t.replies > 0 { clock::cycles_to_us(t.rtt_sum / t.replies) } else { 0 };
    say!(
        "net sent={} replies={} lost={} late={} dup={} reordered={} corrupt={} foreign={} bad_used={} link={} final={} cpus={} maxrtt_us={} worstrtt_us={} meanrtt_us={} maxgap_us={}",
        t.sent,
        t.replies,
        t.lost,
        t.late,
        t.dup,
        t.reordered,
        t.corrupt,
        t.foreign,
        t.bad_used,
        link,
        last as u8,
        alive,
        clock::cycles_to_us(core::mem::take(&mut t.maxrtt)),
        clock::cycles_to_us(t.worst),
        mean,
        clock::take_maxgap_us()
    );
}

fn announce(n: &Net) {
    let m = n.mac;
    say!(
        "net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} status={} qsize={}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        n.status.map_or(-1, |s| s as i32),
        n.qsize
    );
}

static mut SLOTS: [Slot; QSIZE] = [Slot { seq: 0, sent_at: 0, waiting: false, in_ring: false }; QSIZE];
static mut SEEN: Seen = Seen::new();
static mut ECHO_FRAME: [u8; proto::MAX_FRAME] = [0; proto::MAX_FRAME];

/// Send numbered requests (broadcast) with `window` of them awaiting a
/// reply, check every reply, report the counts every `report_ms`; for
/// `secs`, or until the host sends a stop frame.
pub fn ping(cmdline: &str, p: &Params) -> u8 {
    let Some(mut n) = Net::open(cmdline) else { return exit_code::NO_DEVICE };
    announce(&n);
    let window = (p.window as usize).clamp(1, n.qsize);
    // SAFETY: the boot CPU's alone (statics for ring 0's sake, see SEEN in main).
    let (slots, seen) = unsafe { (&mut *addr_of_mut!(SLOTS), &mut *addr_of_mut!(SEEN)) };
    let mut t = Tally::default();
    let start = io::rdtsc();
    let mut end = (p.secs > 0).then(|| start + ms_to_cycles(p.secs * 1000));
    let (every, timeout) = (ms_to_cycles(p.report_ms.max(1)), ms_to_cycles(p.timeout_ms.max(1)));
    let mut next_report = start + every;
    loop {
        let now = io::rdtsc();
        let running = end.is_none_or(|e| now < e);
        // A report line takes tens of ms to print (an exit per byte): the
        // requests in flight drain first, so no round trip includes it.
        let sending = running && now < next_report;
        if sending {
            for (i, s) in slots[..window].iter_mut().enumerate() {
                if s.waiting || s.in_ring {
                    continue;
                }
                let (seq, mac) = (t.sent, n.mac);
                n.send(i, |b| proto::build(b, proto::BROADCAST, mac, Kind::Request, seq, p.frame as usize));
                *s = Slot { seq, sent_at: io::rdtsc(), waiting: true, in_ring: true };
                t.sent += 1;
            }
        }
        while let Some(id) = n.sent() {
            match slots[..window].get_mut(id) {
                Some(s) if s.in_ring => s.in_ring = false,
                _ => t.bad_used += 1,
            }
        }
        while let Some(r) = n.received(|f| f.map(proto::parse)) {
            let now = io::rdtsc();
            let f = match r {
                None => {
                    t.bad_used += 1;
                    continue;
                }
                Some(Err(Bad::Foreign)) => {
                    t.foreign += 1;
                    continue;
                }
                Some(Err(Bad::Corrupt)) => {
                    t.corrupt += 1;
                    continue;
                }
                Some(Ok(f)) if f.kind == Kind::Stop => {
                    // The host is done: finish what is in flight and end.
                    end = Some(now);
                    continue;
                }
                Some(Ok(f)) if f.kind != Kind::Reply => {
                    t.foreign += 1;
                    continue;
                }
                Some(Ok(f)) if f.seq >= t.sent => {
                    // A reply to a request never sent.
                    t.corrupt += 1;
                    continue;
                }
                Some(Ok(f)) => f,
            };
            if !seen.first(f.seq) {
                t.dup += 1;
                continue;
            }
            if t.highest.is_some_and(|h| f.seq < h) {
                t.reordered += 1;
            }
            t.highest = Some(t.highest.map_or(f.seq, |h| h.max(f.seq)));
            match slots[..window].iter_mut().find(|s| s.waiting && s.seq == f.seq) {
                Some(s) => {
                    s.waiting = false;
                    let rtt = now.saturating_sub(s.sent_at);
                    t.maxrtt = t.maxrtt.max(rtt);
                    t.worst = t.worst.max(rtt);
                    t.rtt_sum += rtt;
                    t.replies += 1;
                }
                None => {
                    // Its slot gave up on it: counted lost then, late now.
                    t.late += 1;
                    t.lost = t.lost.saturating_sub(1);
                    t.replies += 1;
                }
            }
        }
        n.flush_rx();
        let now = io::rdtsc();
        for s in slots[..window].iter_mut() {
            if s.waiting && now.saturating_sub(s.sent_at) > timeout {
                s.waiting = false;
                t.lost += 1;
            }
        }
        let idle = slots[..window].iter().all(|s| !s.waiting && !s.in_ring);
        if !running && idle {
            break;
        }
        if now >= next_report && idle {
            report(&mut t, false, n.link());
            next_report = io::rdtsc() + every;
        }
    }
    report(&mut t, true, n.link());
    let clean = t.lost == 0 && t.corrupt == 0 && t.bad_used == 0;
    if clean {
        exit_code::OK
    } else {
        exit_code::MISMATCH
    }
}

/// Answer every request received (to its sender), for a load generator on
/// the host; reports its counts every `report_ms` (a report line takes
/// tens of ms to print, and the host's requests wait meanwhile: the
/// benchmarks ask for one at the end only).
pub fn echo(cmdline: &str, p: &Params) -> u8 {
    let Some(mut n) = Net::open(cmdline) else { return exit_code::NO_DEVICE };
    announce(&n);
    // SAFETY: as in ping.
    let (slots, frame) = unsafe { (&mut *addr_of_mut!(SLOTS), &mut *addr_of_mut!(ECHO_FRAME)) };
    let (mut echoed, mut dropped, mut foreign, mut corrupt, mut bad_used) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let start = io::rdtsc();
    let end = (p.secs > 0).then(|| start + ms_to_cycles(p.secs * 1000));
    let every = ms_to_cycles(p.report_ms.max(1));
    let mut next_report = start + every;
    let qsize = n.qsize;
    let mut next_slot = 0usize;
    let reap = |n: &mut Net, slots: &mut [Slot], bad_used: &mut u64| {
        while let Some(id) = n.sent() {
            match slots.get_mut(id) {
                Some(s) if s.in_ring => s.in_ring = false,
                _ => *bad_used += 1,
            }
        }
    };
    loop {
        reap(&mut n, &mut slots[..qsize], &mut bad_used);
        // The received frame is copied into a free transmit slot and
        // answered there (the receive buffer goes straight back).
        while let Some(r) = n.received(|f| {
            let f = f?;
            let len = f.len().min(proto::MAX_FRAME);
            frame[..len].copy_from_slice(&f[..len]);
            Some((len, proto::parse(&f[..len])))
        }) {
            let (len, parsed) = match r {
                None => {
                    bad_used += 1;
                    continue;
                }
                Some(x) => x,
            };
            match parsed {
                Ok(f) if f.kind == Kind::Request => {}
                Ok(_) | Err(Bad::Foreign) => {
                    foreign += 1;
                    continue;
                }
                Err(Bad::Corrupt) => {
                    corrupt += 1;
                    continue;
                }
            }
            // A steady stream keeps this loop going: completions are
            // taken here too, or the transmit slots would run out.
            reap(&mut n, &mut slots[..qsize], &mut bad_used);
            let free = (0..qsize).map(|k| (next_slot + k) % qsize).find(|&k| !slots[k].in_ring);
            let Some(k) = free else {
                dropped += 1;
                continue;
            };
            next_slot = k + 1;
            slots[k].in_ring = true;
            let mac = n.mac;
            n.send(k, |b| {
                b[..len].copy_from_slice(&frame[..len]);
                proto::answer(&mut b[..len], mac);
                len
            });
            echoed += 1;
        }
        n.flush_rx();
        let now = io::rdtsc();
        let last = end.is_some_and(|e| now >= e);
        if now >= next_report || last {
            let (alive, _) = crate::check_cpus();
            say!(
                "netecho echoed={} dropped={} foreign={} corrupt={} bad_used={} final={} cpus={} maxgap_us={}",
                echoed,
                dropped,
                foreign,
                corrupt,
                bad_used,
                last as u8,
                alive,
                clock::take_maxgap_us()
            );
            next_report = io::rdtsc() + every;
        }
        if last {
            return if bad_used == 0 { exit_code::OK } else { exit_code::MISMATCH };
        }
    }
}
