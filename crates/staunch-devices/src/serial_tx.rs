//! The UART's transmit ledger: what makes the console exactly-once across
//! microreset, crash recovery and upgrade.
//!
//! Every byte the guest writes to the transmit register is first *accepted*
//! into a small ring (one store of the `accepted` count is the commit point),
//! then written to the host sink, after which `sunk` moves on. The ledger is
//! lock-free, so the crash path reads it even when the dead thread holds the
//! UART's lock. A successor restores both counts and the accepted bytes not
//! yet sunk, writes those first, and, for the write exit a crash interrupted,
//! knows whether the byte had been accepted (`access` marks the count at the
//! start of the transmit write in progress): accepted means it is not sent
//! again, not accepted means the replayed write sends it. So no byte is lost
//! and none is written twice. The one window left is between the sink's
//! `write` returning and `sunk` moving on; for a file sink the crash path
//! closes it by reading the file's length (see [`TxLedger::sunk_from_len`]).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Bytes accepted but not yet sunk that a ledger can hold; the sink is
/// drained on every byte, so more than one is pending only after a crash.
const RING: usize = 4096;
const NO_ACCESS: u64 = u64::MAX;

/// The ledger as saved in the preserved record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct TxState {
    pub accepted: u64,
    pub sunk: u64,
    /// Accepted bytes the sink has not taken yet, oldest first.
    pub pending: Vec<u8>,
    /// `accepted` at the start of a transmit write that was interrupted.
    pub access: Option<u64>,
}

pub struct TxLedger {
    accepted: AtomicU64,
    sunk: AtomicU64,
    access: AtomicU64,
    /// `len` of a file sink minus `sunk` when the ledger took the file over.
    file_base: AtomicU64,
    ring: Box<[AtomicU8]>,
}

impl TxLedger {
    pub fn new() -> Arc<Self> {
        Self::restore(&TxState::default())
    }

    pub fn restore(s: &TxState) -> Arc<Self> {
        let l = TxLedger {
            accepted: AtomicU64::new(s.accepted),
            sunk: AtomicU64::new(s.accepted - (s.pending.len() as u64).min(s.accepted)),
            access: AtomicU64::new(s.access.unwrap_or(NO_ACCESS)),
            file_base: AtomicU64::new(NO_ACCESS),
            ring: (0..RING).map(|_| AtomicU8::new(0)).collect(),
        };
        let first = l.sunk.load(Ordering::Relaxed);
        for (i, b) in s.pending.iter().enumerate() {
            l.ring[((first + i as u64) % RING as u64) as usize].store(*b, Ordering::Relaxed);
        }
        Arc::new(l)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    pub fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Acquire)
    }

    /// A transmit-register write begins.
    pub(crate) fn begin_access(&self) {
        self.access.store(self.accepted(), Ordering::Release);
    }

    pub(crate) fn end_access(&self) {
        self.access.store(NO_ACCESS, Ordering::Release);
    }

    /// True if the interrupted transmit write already had its byte accepted
    /// (a retry must then not send it again).
    pub(crate) fn interrupted_access_accepted(&self) -> bool {
        let a = self.access.load(Ordering::Acquire);
        a != NO_ACCESS && self.accepted() > a
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
        if base != NO_ACCESS && len >= base {
            let sunk = (len - base).min(self.accepted());
            self.sunk.store(sunk.max(self.sunk()), Ordering::Release);
        }
    }

    pub fn state(&self) -> TxState {
        let (accepted, sunk) = (self.accepted(), self.sunk());
        let from = sunk.max(accepted.saturating_sub(RING as u64));
        TxState {
            accepted,
            sunk,
            pending: (from..accepted).map(|i| self.ring[(i % RING as u64) as usize].load(Ordering::Relaxed)).collect(),
            access: Some(self.access.load(Ordering::Acquire)).filter(|a| *a != NO_ACCESS),
        }
    }

    fn accept(&self, b: u8) {
        let n = self.accepted.load(Ordering::Relaxed);
        self.ring[(n % RING as u64) as usize].store(b, Ordering::Relaxed);
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
        while sunk < accepted {
            let at = (sunk % RING as u64) as usize;
            let n = ((accepted - sunk) as usize).min(RING - at);
            let chunk: Vec<u8> = l.ring[at..at + n].iter().map(|b| b.load(Ordering::Relaxed)).collect();
            let _ = self.sink.write_all(&chunk);
            sunk += n as u64;
            l.sunk.store(sunk, Ordering::Release);
        }
    }
}

impl Write for LedgerWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            self.ledger.accept(*b);
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
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
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
        l.accept(b'c'); // the crash lands between accept and drain
        let st = l.state();
        assert_eq!((st.accepted, st.sunk, st.pending.as_slice()), (3, 2, &b"c"[..]));
        let l2 = TxLedger::restore(&st);
        let mut w2 = LedgerWriter::new(l2.clone(), Box::new(out.clone()));
        w2.drain();
        w2.write_all(b"d").unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"abcd");
        assert_eq!((l2.accepted(), l2.sunk()), (4, 4));
    }

    #[test]
    fn file_length_corrects_a_trailing_counter() {
        let l = TxLedger::new();
        l.track_file(100); // 100 bytes of earlier runs in the log
        l.accept(b'x');
        l.accept(b'y');
        // Both reached the file but the counter did not move on.
        l.sunk_from_len(102);
        assert_eq!(l.sunk(), 2);
        assert!(l.state().pending.is_empty());
    }

    #[test]
    fn an_interrupted_access_knows_whether_it_was_accepted() {
        let l = TxLedger::new();
        l.begin_access();
        assert!(!l.interrupted_access_accepted());
        l.accept(b'q');
        assert!(l.interrupted_access_accepted());
        let l2 = TxLedger::restore(&l.state());
        assert!(l2.interrupted_access_accepted());
        l2.end_access();
        assert!(!l2.interrupted_access_accepted());
    }
}
