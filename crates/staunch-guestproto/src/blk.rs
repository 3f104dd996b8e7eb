//! Bookkeeping for `blk-verify`'s pipeline: several requests in flight, each
//! in its own slot (a fixed descriptor chain with its own buffers), and the
//! checks on every completion the device posts. Pure logic, so the host can
//! test it; the guest's virtio driver feeds it used-ring entries.
//!
//! Two pieces:
//! - [`InFlight`]: which request each slot has in flight. A used-ring entry
//!   must name a slot's head descriptor and that slot must have a request in
//!   flight; anything else (an unknown id, a second completion of a request
//!   already completed, a replay) is a [`Bad`] completion, which the guest
//!   counts as a mismatch, never as a timeout.
//! - [`SeqWindow`]: which write sequence numbers may be issued, and the
//!   `written` count. Completions may arrive in any order, so the guest only
//!   issues seq `s` while every seq below `s - depth + 1` is retired: the
//!   seqs in flight always lie in a window of `depth <= blocks` consecutive
//!   numbers, so no two requests to the same LBA (`seq % blocks`) are ever in
//!   flight together.

/// Most slots one tracker holds (descriptor chains, the control slot included).
pub const MAX_SLOTS: usize = 32;
/// Most requests `blk-verify` keeps in flight.
pub const MAX_QD: usize = MAX_SLOTS - 1;
/// What the driver writes into a request's status byte before submitting it;
/// no device writes it (valid statuses are 0, 1 and 2).
pub const STATUS_UNSET: u8 = 0xff;

/// One request, as the slot that carries it remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// virtio-blk request type (`T_IN`, `T_OUT`, ...).
    pub kind: u32,
    /// The write sequence number it belongs to (0 for control requests).
    pub seq: u64,
    pub lba: u64,
    /// Bytes of the chain the device may write (data for reads, plus the
    /// status byte): a used length above this reports some other request.
    pub writable: u32,
}

/// A completion that does not match what the driver has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// The used id is no slot's head descriptor.
    UnknownId { id: u32 },
    /// The slot has nothing in flight: a duplicate or replayed completion of
    /// a request already completed.
    NotInFlight { slot: usize },
    /// The device claims to have written more than this request's buffers
    /// hold: the entry reports another request.
    TooLong { slot: usize, len: u32, req: Request },
    /// The request's status byte is untouched: the device completed this id
    /// without serving its chain (it reports another request).
    NoStatus { slot: usize, req: Request },
    /// The device's used index moved back, or ahead by more than the driver
    /// ever had in flight.
    UsedIndex { driver: u16, device: u16 },
}

impl Bad {
    /// The request this completion claimed to finish, if it named one the
    /// driver had in flight (that slot is free again).
    pub fn request(&self) -> Option<Request> {
        match self {
            Bad::TooLong { req, .. } | Bad::NoStatus { req, .. } => Some(*req),
            _ => None,
        }
    }

    /// One word for the report line.
    pub fn why(&self) -> &'static str {
        match self {
            Bad::UnknownId { .. } => "unknown-id",
            Bad::NotInFlight { .. } => "duplicate",
            Bad::TooLong { .. } => "wrong-length",
            Bad::NoStatus { .. } => "no-status",
            Bad::UsedIndex { .. } => "used-index",
        }
    }
}

/// A completion that matched the request in flight in `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub slot: usize,
    pub req: Request,
    pub status: u8,
    pub len: u32,
}

/// Which request each slot has in flight. Slot `i`'s chain starts at
/// descriptor `i * stride`, which is the id the device returns for it.
#[derive(Clone, Debug)]
pub struct InFlight {
    slots: [Option<Request>; MAX_SLOTS],
    n: usize,
    stride: u32,
    busy: usize,
}

impl InFlight {
    /// `n` slots (at most [`MAX_SLOTS`]) of `stride` descriptors each.
    pub fn new(n: usize, stride: u32) -> Self {
        InFlight { slots: [None; MAX_SLOTS], n: n.min(MAX_SLOTS), stride: stride.max(1), busy: 0 }
    }

    pub fn slots(&self) -> usize {
        self.n
    }

    /// The head descriptor (used-ring id) of `slot`'s chain.
    pub fn head(&self, slot: usize) -> u32 {
        slot as u32 * self.stride
    }

    /// The slot whose chain starts at descriptor `id`.
    pub fn slot_of(&self, id: u32) -> Option<usize> {
        (id.is_multiple_of(self.stride) && ((id / self.stride) as usize) < self.n)
            .then_some((id / self.stride) as usize)
    }

    pub fn is_busy(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.is_some())
    }

    /// Requests in flight.
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// The first free slot in `range`.
    pub fn free_in(&self, range: core::ops::Range<usize>) -> Option<usize> {
        range.take_while(|s| *s < self.n).find(|s| self.slots[*s].is_none())
    }

    /// Note `req` as in flight in `slot`; false (and nothing noted) if the
    /// slot does not exist or already carries a request.
    pub fn submit(&mut self, slot: usize, req: Request) -> bool {
        if slot >= self.n || self.slots[slot].is_some() {
            return false;
        }
        self.slots[slot] = Some(req);
        self.busy += 1;
        true
    }

    /// Check the used-ring entry (`id`, `len`); `status` reads the status
    /// byte of a slot's request. A good completion frees its slot; so does
    /// a bad one that named a request in flight ([`Bad::request`]).
    pub fn complete(&mut self, id: u32, len: u32, status: impl FnOnce(usize) -> u8) -> Result<Done, Bad> {
        let slot = self.slot_of(id).ok_or(Bad::UnknownId { id })?;
        let req = self.slots[slot].take().ok_or(Bad::NotInFlight { slot })?;
        self.busy -= 1;
        let st = status(slot);
        if st == STATUS_UNSET {
            return Err(Bad::NoStatus { slot, req });
        }
        if len > req.writable {
            return Err(Bad::TooLong { slot, len, req });
        }
        Ok(Done { slot, req, status: st, len })
    }

    /// Check the device's used index against the driver's: it may only be
    /// ahead by at most the requests in flight. (A device that replays a
    /// request already completed moves it further.)
    pub fn check_used_index(&self, driver: u16, device: u16) -> Result<u16, Bad> {
        let ahead = device.wrapping_sub(driver);
        if ahead as usize > self.busy {
            Err(Bad::UsedIndex { driver, device })
        } else {
            Ok(ahead)
        }
    }
}

/// Which write sequence numbers are issued, written and retired.
///
/// A seq is *issued* when its write is submitted, *written* when the write
/// completes (successfully or not) and *retired* when its slot is free again
/// (after the read-back, or at once if the write failed).
///
/// `written()` counts the successful writes among the contiguous prefix of
/// seqs whose writes have all completed: completions that arrive out of
/// order are counted once every earlier write completed too. `blk-verify`
/// stops issuing at each report and lets the pipeline drain before it
/// prints, so at a report every issued seq is retired and `written` is
/// exactly the number of writes on disk: the host's "every block holds its
/// last write" check for seqs `0..written` is exact.
#[derive(Clone, Debug)]
pub struct SeqWindow {
    depth: u64,
    limit: u64,
    next: u64,
    done_low: u64,
    done_bits: u64,
    wrote_low: u64,
    wrote_bits: u64,
    ok_bits: u64,
    written: u64,
}

impl SeqWindow {
    /// At most `depth` (1..=64) seqs in flight; `limit` seqs in all (0: no end).
    pub fn new(depth: u64, limit: u64) -> Self {
        SeqWindow {
            depth: depth.clamp(1, 64),
            limit,
            next: 0,
            done_low: 0,
            done_bits: 0,
            wrote_low: 0,
            wrote_bits: 0,
            ok_bits: 0,
            written: 0,
        }
    }

    /// The next seq to issue, if the window allows one below `stop`.
    pub fn issue(&mut self, stop: u64) -> Option<u64> {
        let s = self.next;
        if s >= stop || s >= self.done_low + self.depth || (self.limit != 0 && s >= self.limit) {
            return None;
        }
        self.next += 1;
        Some(s)
    }

    /// The write of `seq` completed (`ok`: with status 0). False if `seq` is
    /// not in flight or its write was already noted.
    pub fn wrote(&mut self, seq: u64, ok: bool) -> bool {
        if seq < self.wrote_low || seq >= self.next {
            return false;
        }
        let bit = 1u64 << (seq - self.wrote_low);
        if self.wrote_bits & bit != 0 {
            return false;
        }
        self.wrote_bits |= bit;
        if ok {
            self.ok_bits |= bit;
        }
        while self.wrote_bits & 1 != 0 {
            self.written += self.ok_bits & 1;
            self.wrote_bits >>= 1;
            self.ok_bits >>= 1;
            self.wrote_low += 1;
        }
        true
    }

    /// `seq` is done with its slot (a write never noted counts as failed).
    /// False if `seq` is not in flight.
    pub fn retire(&mut self, seq: u64) -> bool {
        if seq < self.done_low || seq >= self.next {
            return false;
        }
        let bit = 1u64 << (seq - self.done_low);
        if self.done_bits & bit != 0 {
            return false;
        }
        if seq >= self.wrote_low && self.wrote_bits & (1 << (seq - self.wrote_low)) == 0 {
            self.wrote(seq, false);
        }
        self.done_bits |= bit;
        while self.done_bits & 1 != 0 {
            self.done_bits >>= 1;
            self.done_low += 1;
        }
        true
    }

    /// Successful writes in the completed prefix (see the type's docs).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Every seq below this is retired.
    pub fn retired(&self) -> u64 {
        self.done_low
    }

    /// Seqs issued so far.
    pub fn issued(&self) -> u64 {
        self.next
    }

    pub fn in_flight(&self) -> u64 {
        self.next - self.done_low
    }

    /// All `limit` seqs are retired.
    pub fn finished(&self) -> bool {
        self.limit != 0 && self.done_low >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T_IN: u32 = 0;
    const T_OUT: u32 = 1;

    fn w(seq: u64) -> Request {
        Request { kind: T_OUT, seq, lba: seq % 8, writable: 1 }
    }

    #[test]
    fn good_completions_in_any_order() {
        let mut f = InFlight::new(5, 3);
        assert!(f.submit(1, w(0)));
        assert!(f.submit(2, w(1)));
        assert!(!f.submit(2, w(2)), "a busy slot takes no second request");
        assert_eq!(f.busy(), 2);
        assert_eq!(f.check_used_index(10, 12), Ok(2));
        let d = f.complete(6, 1, |s| if s == 2 { 0 } else { STATUS_UNSET }).unwrap();
        assert_eq!((d.slot, d.req.seq, d.status), (2, 1, 0));
        let d = f.complete(3, 1, |_| 1).unwrap();
        assert_eq!((d.slot, d.req.seq, d.status), (1, 0, 1), "an I/O error is a good completion with status 1");
        assert_eq!(f.busy(), 0);
        assert_eq!(f.free_in(1..5), Some(1));
    }

    #[test]
    fn duplicate_and_replayed_completions_are_caught() {
        let mut f = InFlight::new(5, 3);
        f.submit(1, w(0));
        assert!(f.complete(3, 1, |_| 0).is_ok());
        // The same entry again (a duplicate, or a replay after a restore).
        assert_eq!(f.complete(3, 1, |_| 0), Err(Bad::NotInFlight { slot: 1 }));
        // A slot that never had anything in flight.
        assert_eq!(f.complete(9, 1, |_| 0), Err(Bad::NotInFlight { slot: 3 }));
        // A replay moves the device's used index past what was in flight.
        f.submit(2, w(1));
        assert_eq!(f.check_used_index(7, 9), Err(Bad::UsedIndex { driver: 7, device: 9 }));
        assert_eq!(f.check_used_index(7, 6), Err(Bad::UsedIndex { driver: 7, device: 6 }), "moved back");
        assert_eq!(f.check_used_index(0xffff, 0), Ok(1), "wraps");
    }

    #[test]
    fn unknown_ids_are_caught() {
        let mut f = InFlight::new(5, 3);
        f.submit(1, w(0));
        for id in [1, 4, 15, 999, u32::MAX] {
            assert_eq!(f.complete(id, 1, |_| 0), Err(Bad::UnknownId { id }), "{id}");
        }
        assert!(f.is_busy(1), "an unknown id completes nothing");
    }

    #[test]
    fn entries_that_report_another_request_are_caught() {
        let mut f = InFlight::new(5, 3);
        let r = Request { kind: T_IN, seq: 4, lba: 4, writable: 4097 };
        f.submit(1, w(0));
        f.submit(2, r);
        // A write's id with a read's length.
        assert_eq!(f.complete(3, 4097, |_| 0), Err(Bad::TooLong { slot: 1, len: 4097, req: w(0) }));
        // The read's id, but its status byte was never written.
        let e = f.complete(6, 4097, |_| STATUS_UNSET).unwrap_err();
        assert_eq!(e, Bad::NoStatus { slot: 2, req: r });
        assert_eq!(e.request(), Some(r));
        assert_eq!(f.busy(), 0, "both slots are free again");
    }

    #[test]
    fn window_keeps_lbas_apart_and_counts_the_written_prefix() {
        let mut win = SeqWindow::new(4, 10);
        let issued: Vec<u64> = core::iter::from_fn(|| win.issue(u64::MAX)).collect();
        assert_eq!(issued, [0, 1, 2, 3]);
        // Seq 2 and 3 complete first: not yet counted, and nothing new may
        // be issued (seq 4 would land on seq 0's block with blocks = 4).
        assert!(win.wrote(2, true) && win.wrote(3, true));
        assert!(win.retire(2) && win.retire(3));
        assert_eq!(win.written(), 0);
        assert_eq!(win.issue(u64::MAX), None);
        assert!(!win.wrote(3, true), "a write noted twice");
        assert!(!win.retire(3), "a seq retired twice");
        assert!(!win.retire(7), "a seq never issued");
        assert!(win.wrote(0, true));
        assert_eq!(win.written(), 1);
        assert!(win.wrote(1, false), "a failed write");
        assert_eq!(win.written(), 3, "seqs 0, 2 and 3 wrote");
        assert!(win.retire(0) && win.retire(1));
        assert_eq!((win.retired(), win.in_flight()), (4, 0));
        // A stop (a report) holds issuing back.
        assert_eq!(win.issue(5), Some(4));
        assert_eq!(win.issue(5), None);
        // Retiring without a noted write counts as a failed write.
        assert!(win.retire(4));
        assert_eq!(win.written(), 3);
        while let Some(s) = win.issue(u64::MAX) {
            assert!(win.wrote(s, true) && win.retire(s));
        }
        assert!(win.finished());
        assert_eq!((win.issued(), win.written()), (10, 8));
    }

    #[test]
    fn no_two_requests_in_flight_for_one_block_under_any_order() {
        // Random completion orders: the seqs in flight never share an LBA,
        // and after draining, written == issued.
        let blocks = 5;
        let mut x = 0x1234_5678u64;
        let mut win = SeqWindow::new(blocks, 0);
        let mut live: [Option<u64>; 64] = [None; 64];
        for step in 0..20_000 {
            while let Some(s) = win.issue(u64::MAX) {
                let i = live.iter().position(|l| l.is_none()).unwrap();
                live[i] = Some(s);
            }
            let lbas: u64 = live.iter().flatten().fold(0, |m, s| {
                let bit = 1 << (s % blocks);
                assert_eq!(m & bit, 0, "two seqs in flight for block {} at step {step}", s % blocks);
                m | bit
            });
            assert!(lbas != 0);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = live.iter().flatten().count();
            let pick = (x as usize) % n;
            let i = live.iter().enumerate().filter(|(_, l)| l.is_some()).nth(pick).unwrap().0;
            let s = live[i].take().unwrap();
            assert!(win.wrote(s, true) && win.retire(s));
        }
        assert_eq!(win.written(), win.retired());
    }
}
