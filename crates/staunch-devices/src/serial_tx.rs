//! The UART's transmit ledger: what makes the console exactly-once across
//! microreset, crash recovery and upgrade.
//!
//! Every byte the guest writes to the transmit register is first *accepted*
//! into a small ring (one store of the `accepted` count is the commit point),
//! then written to the host sink, after which `sunk` moves on. The ledger is
//! lock-free, so the crash path reads it even when the dead thread holds the
//! UART's lock. Each accepted byte carries the stamp of the guest access that
//! wrote it (see [`crate::access`]). A successor restores both counts and the
//! recent bytes with their stamps, writes first what was not sunk, and, for a
//! write exit a crash cut short, finds by its stamp whether the byte was
//! accepted: then the replay does not send it again, else the replay sends
//! it. A microreset's retry asks the same. So no byte is lost and none is
//! written twice. The one window left is between the sink's `write`
//! returning and `sunk` moving on: for a file sink the crash path closes it
//! by reading the file's length (see [`TxLedger::sunk_from_len`]); for a pipe
//! or a socket that one write may be repeated.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes accepted but not yet sunk that a ledger can hold; the sink is
/// drained on every byte, so more than one is pending only after a crash.
const RING: usize = 4096;
/// Accepted bytes a saved ledger keeps with their stamps (at least), enough
/// to find the interrupted accesses of every vCPU.
const KEEP: u64 = 256;
const NO_FILE: u64 = u64::MAX;

/// The ledger as saved in the preserved record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct TxState {
    pub accepted: u64,
    pub sunk: u64,
    /// The last accepted bytes (all those not sunk, and at least the last
    /// [`KEEP`]), oldest first, each `byte | stamp << 8`.
    pub recent: Vec<u64>,
}

pub struct TxLedger {
    accepted: AtomicU64,
    sunk: AtomicU64,
    /// `len` of a file sink minus `sunk` when the ledger took the file over.
    file_base: AtomicU64,
    /// The next byte the writer gets was accepted already (a skipped retry):
    /// the UART still runs its write, for its registers and interrupt.
    swallow: AtomicBool,
    ring: Box<[AtomicU64]>,
}

impl TxLedger {
    pub fn new() -> Arc<Self> {
        Self::restore(&TxState::default())
    }

    pub fn restore(s: &TxState) -> Arc<Self> {
        let recent = &s.recent[s.recent.len().saturating_sub(RING)..];
        let first = s.accepted.saturating_sub(recent.len() as u64);
        let l = TxLedger {
            accepted: AtomicU64::new(s.accepted),
            // Bytes older than what was kept cannot be written any more.
            sunk: AtomicU64::new(s.sunk.clamp(first, s.accepted)),
            file_base: AtomicU64::new(NO_FILE),
            swallow: AtomicBool::new(false),
            ring: (0..RING).map(|_| AtomicU64::new(0)).collect(),
        };
        for (i, v) in recent.iter().enumerate() {
            l.slot(first + i as u64).store(*v, Ordering::Relaxed);
        }
        Arc::new(l)
    }

    fn slot(&self, n: u64) -> &AtomicU64 {
        &self.ring[(n % RING as u64) as usize]
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    pub fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Acquire)
    }

    /// True if a byte of the access stamped `stamp` was accepted (only the
    /// bytes still in the ring are searched: a retry or replay comes within
    /// a few bytes of its access).
    pub fn has_accepted(&self, stamp: u64) -> bool {
        let n = self.accepted();
        stamp != 0
            && (n.saturating_sub(RING as u64)..n).rev().any(|i| self.slot(i).load(Ordering::Relaxed) >> 8 == stamp)
    }

    /// The next byte handed to the writer is not accepted again.
    pub(crate) fn swallow_next(&self) {
        self.swallow.store(true, Ordering::Release);
    }

    /// The sink is the file whose length is `len` now: from here on its
    /// length tells exactly how much of the stream it holds.
    pub fn track_file(&self, len: u64) {
        self.file_base.store(len.saturating_sub(self.sunk()), Ordering::Release);
    }

    /// After a crash: set `sunk` from the file sink's length `len` (exact,
    /// where the counter may trail by the one write the crash cut short).
    pub fn sunk_from_len(&self, len: u64) {
        let base = self.file_base.load(Ordering::Acquire);
        if base != NO_FILE && len >= base {
            let sunk = (len - base).min(self.accepted());
            self.sunk.store(sunk.max(self.sunk()), Ordering::Release);
        }
    }

    pub fn state(&self) -> TxState {
        let (accepted, sunk) = (self.accepted(), self.sunk());
        let keep = (accepted - sunk.min(accepted)).max(KEEP).min(RING as u64);
        let from = accepted.saturating_sub(keep);
        TxState { accepted, sunk, recent: (from..accepted).map(|i| self.slot(i).load(Ordering::Relaxed)).collect() }
    }

    fn accept(&self, b: u8, stamp: u64) {
        let n = self.accepted.load(Ordering::Relaxed);
        self.slot(n).store(b as u64 | stamp << 8, Ordering::Relaxed);
        // The commit point: from here the byte is the console's.
        self.accepted.store(n + 1, Ordering::Release);
    }
}

/// The UART's writer: accepts into the ledger, then drains to the sink.
pub struct LedgerWriter {
    ledger: Arc<TxLedger>,
    sink: Box<dyn Write + Send>,
}

impl LedgerWriter {
    pub fn new(ledger: Arc<TxLedger>, sink: Box<dyn Write + Send>) -> Self {
        LedgerWriter { ledger, sink }
    }

    /// Write every accepted byte the sink has not taken. A sink that fails
    /// (a closed pipe) loses the output, not the guest: the bytes count as
    /// sunk so the ring never fills.
    pub fn drain(&mut self) {
        let l = &self.ledger;
        let (mut sunk, accepted) = (l.sunk(), l.accepted());
        // A stack buffer: this runs for every byte the guest prints.
        let mut chunk = [0u8; 256];
        while sunk < accepted {
            let at = (sunk % RING as u64) as usize;
            let n = ((accepted - sunk) as usize).min(RING - at).min(chunk.len());
            for (c, b) in chunk.iter_mut().zip(&l.ring[at..at + n]) {
                *c = b.load(Ordering::Relaxed) as u8;
            }
            let _ = self.sink.write_all(&chunk[..n]);
            sunk += n as u64;
            l.sunk.store(sunk, Ordering::Release);
        }
    }
}

impl Write for LedgerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let skip = self.ledger.swallow.swap(false, Ordering::AcqRel) as usize;
        let stamp = crate::access::stamp();
        for b in &buf[skip.min(buf.len())..] {
            self.ledger.accept(*b, stamp);
        }
        self.drain();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.drain();
        self.sink.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that keeps what it got (the UART's tests use it too).
    #[derive(Clone, Default)]
    pub(crate) struct Out(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A byte accepted but not sunk when the process died is written by the
    /// successor, exactly once.
    #[test]
    fn pending_bytes_cross_a_restore() {
        let l = TxLedger::new();
        let out = Out::default();
        let mut w = LedgerWriter::new(l.clone(), Box::new(out.clone()));
        w.write_all(b"ab").unwrap();
        l.accept(b'c', 7); // the crash lands between accept and drain
        let st = l.state();
        assert_eq!((st.accepted, st.sunk, st.recent.len()), (3, 2, 3));
        let l2 = TxLedger::restore(&st);
        let mut w2 = LedgerWriter::new(l2.clone(), Box::new(out.clone()));
        w2.drain();
        w2.write_all(b"d").unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"abcd");
        assert_eq!((l2.accepted(), l2.sunk()), (4, 4));
        assert!(l2.has_accepted(7), "the stamp crossed the restore");
    }

    #[test]
    fn file_length_corrects_a_trailing_counter() {
        let l = TxLedger::new();
        l.track_file(100); // 100 bytes of earlier runs in the log
        l.accept(b'x', 1);
        l.accept(b'y', 2);
        // Both reached the file but the counter did not move on.
        l.sunk_from_len(102);
        assert_eq!(l.sunk(), 2);
        assert_eq!(l.state().recent.len(), 2);
    }

    #[test]
    fn stamps_tell_which_access_was_accepted() {
        let l = TxLedger::new();
        l.accept(b'a', (1 << 48) | 9); // vCPU 1, exit 9
        l.accept(b'b', 5); // vCPU 0, exit 5, after it
        assert!(l.has_accepted((1 << 48) | 9));
        assert!(l.has_accepted(5));
        assert!(!l.has_accepted(6));
        assert!(!l.has_accepted(0));
    }
}
