//! Sequence-numbered frames: what the test guest's `net-ping` sends, what
//! `staunch net-peer` answers (and the other way round for `net-echo`).
//!
//! A frame is an Ethernet header with [`ETHERTYPE`] (IEEE's local
//! experimental type, so nothing else on a test bridge claims it), then
//! [`BODY`] bytes: magic, kind, sequence number, payload length and a
//! check over the payload, then the payload, which is derived from the
//! sequence number. A frame whose bytes changed anywhere in the body fails
//! [`parse`]; a reply carries the request's sequence number and payload.

/// Ethernet header: destination, source, type.
pub const ETH: usize = 14;
pub const ETHERTYPE: u16 = 0x88b5;
pub const MAGIC: [u8; 4] = *b"STNP";
/// Magic, kind, 3 reserved, seq (8), payload length (2), check (8).
pub const BODY: usize = 26;
/// Ethernet header and body: the shortest frame.
pub const HEADER: usize = ETH + BODY;
/// The longest frame (a standard MTU's).
pub const MAX_FRAME: usize = 1514;
pub const BROADCAST: [u8; 6] = [0xff; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Reply = 2,
    /// From the host: stop sending, drain, report the final counts.
    Stop = 3,
}

/// A frame that parsed: who sent it and what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub kind: Kind,
    pub seq: u64,
    /// The whole frame's length.
    pub len: usize,
}

/// Why a frame was not one of ours, or was damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// Another protocol (another type, or not our magic): ignored.
    Foreign,
    /// Ours, but its length, kind or payload check is wrong.
    Corrupt,
}

fn payload_byte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((i % 8) * 8)) as u8 ^ i as u8
}

/// Write a frame of `len` bytes (clamped to [HEADER, MAX_FRAME] and to
/// `buf`) into `buf`; returns its length.
pub fn build(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], kind: Kind, seq: u64, len: usize) -> usize {
    let len = len.clamp(HEADER, MAX_FRAME).min(buf.len());
    if len < HEADER {
        return 0;
    }
    buf[..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let b = &mut buf[ETH..len];
    b[..4].copy_from_slice(&MAGIC);
    b[4] = kind as u8;
    b[5..8].fill(0);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..18].copy_from_slice(&((len - HEADER) as u16).to_le_bytes());
    let mut h = crate::fnv1a(&seq.to_le_bytes(), 0xcbf2_9ce4_8422_2325);
    for (i, p) in b[BODY..].iter_mut().enumerate() {
        *p = payload_byte(seq, i);
    }
    h = crate::fnv1a(&b[BODY..], h);
    b[18..26].copy_from_slice(&h.to_le_bytes());
    len
}

/// Parse and check a received frame (`frame` is exactly what arrived; a
/// frame padded to the Ethernet minimum is fine).
pub fn parse(frame: &[u8]) -> Result<Frame, Bad> {
    if frame.len() < ETH + 4 || frame[12..14] != ETHERTYPE.to_be_bytes() || frame[ETH..ETH + 4] != MAGIC {
        return Err(Bad::Foreign);
    }
    if frame.len() < HEADER {
        return Err(Bad::Corrupt);
    }
    let b = &frame[ETH..];
    if b[5..8] != [0; 3] {
        return Err(Bad::Corrupt);
    }
    let kind = match b[4] {
        1 => Kind::Request,
        2 => Kind::Reply,
        3 => Kind::Stop,
        _ => return Err(Bad::Corrupt),
    };
    let seq = u64::from_le_bytes(b[8..16].try_into().map_err(|_| Bad::Corrupt)?);
    let plen = u16::from_le_bytes([b[16], b[17]]) as usize;
    let check = u64::from_le_bytes(b[18..26].try_into().map_err(|_| Bad::Corrupt)?);
    if BODY + plen > b.len() {
        return Err(Bad::Corrupt);
    }
    let payload = &b[BODY..BODY + plen];
    if payload.iter().enumerate().any(|(i, p)| *p != payload_byte(seq, i)) {
        return Err(Bad::Corrupt);
    }
    let h = crate::fnv1a(payload, crate::fnv1a(&seq.to_le_bytes(), 0xcbf2_9ce4_8422_2325));
    if h != check {
        return Err(Bad::Corrupt);
    }
    let mac = |o: usize| -> [u8; 6] { frame[o..o + 6].try_into().unwrap_or([0; 6]) };
    Ok(Frame { dst: mac(0), src: mac(6), kind, seq, len: HEADER + plen })
}

/// Turn a request in place into its reply from `me`: addressed back to its
/// sender, the same sequence number and payload.
pub fn answer(frame: &mut [u8], me: [u8; 6]) {
    if frame.len() < HEADER {
        return;
    }
    let (dst, src) = frame.split_at_mut(6);
    dst.copy_from_slice(&src[..6]);
    src[..6].copy_from_slice(&me);
    frame[ETH + 4] = Kind::Reply as u8;
}

/// Sequence numbers seen, for telling duplicates from first arrivals
/// within the last [`Seen::SPAN`] numbers, less up to 63 (older ones count
/// as seen). No heap: the guest keeps one.
pub struct Seen {
    bits: [u64; Seen::SPAN / 64],
    /// One past the highest number recorded.
    top: u64,
}

impl Default for Seen {
    fn default() -> Self {
        Seen::new()
    }
}

impl Seen {
    pub const SPAN: usize = 4096;

    pub const fn new() -> Seen {
        Seen { bits: [0; Seen::SPAN / 64], top: 0 }
    }

    /// Record `seq`; false if it was seen before (a duplicate).
    pub fn first(&mut self, seq: u64) -> bool {
        if seq + Self::SPAN as u64 <= self.top {
            return false;
        }
        if seq >= self.top + Self::SPAN as u64 {
            // A jump past the whole window (or a hostile number): start over.
            self.bits = [0; Self::SPAN / 64];
            self.top = seq & !63;
        }
        while self.top <= seq {
            // Slide the window: forget what falls out of it.
            let i = (self.top as usize % Self::SPAN) / 64;
            if self.top.is_multiple_of(64) {
                self.bits[i] = 0;
            }
            self.top += 1;
        }
        let (w, b) = ((seq as usize % Self::SPAN) / 64, seq % 64);
        let fresh = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut b = [0u8; 256];
        let n = build(&mut b, BROADCAST, [2, 0, 0, 0, 0, 1], Kind::Request, 77, 200);
        assert_eq!(n, 200);
        let f = parse(&b[..n]).unwrap();
        assert_eq!((f.kind, f.seq, f.len, f.src), (Kind::Request, 77, 200, [2, 0, 0, 0, 0, 1]));
        // Padding after the frame is fine; damage anywhere in the body is not.
        assert!(parse(&b[..n + 20]).is_ok());
        for at in ETH..n {
            let mut c = b;
            c[at] ^= 0x10;
            let r = parse(&c[..n]);
            assert!(r.is_err() && (at < ETH + 4 || r == Err(Bad::Corrupt)), "byte {at}: {r:?}");
        }
        assert_eq!(parse(&b[..HEADER - 1]), Err(Bad::Corrupt));
        assert_eq!(parse(&b[..10]), Err(Bad::Foreign));
        answer(&mut b[..n], [2, 0, 0, 0, 0, 9]);
        let r = parse(&b[..n]).unwrap();
        assert_eq!((r.kind, r.seq, r.dst, r.src), (Kind::Reply, 77, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 9]));
        assert_eq!(build(&mut b, BROADCAST, BROADCAST, Kind::Request, 1, 0), HEADER);
        assert_eq!(build(&mut b[..20], BROADCAST, BROADCAST, Kind::Request, 1, 0), 0);
    }

    /// Random bytes and randomly damaged frames: an error or a frame that
    /// checks, never a panic; a reply parses as its request's number.
    #[test]
    fn hostile_frames_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seen = Seen::new();
        let mut ok = 0;
        for _ in 0..5000 {
            let mut b = [0u8; 256];
            let n = build(&mut b, BROADCAST, [2, 0, 0, 0, 0, 1], Kind::Request, next(), (next() % 256) as usize);
            let len = (next() % 257) as usize;
            for _ in 0..(next() % 3) {
                let at = (next() % 256) as usize;
                b[at] = next() as u8;
            }
            if next() % 4 == 0 {
                b.iter_mut().for_each(|v| *v = next() as u8);
            }
            if let Ok(f) = parse(&b[..len]) {
                assert!(f.len <= len && f.len <= n.max(len));
                answer(&mut b[..f.len], [2, 0, 0, 0, 0, 9]);
                assert_eq!(parse(&b[..f.len]).map(|r| r.seq), Ok(f.seq));
                ok += 1;
            }
            seen.first(next() % 10_000);
        }
        assert!(ok > 100, "{ok}");
    }

    #[test]
    fn seen_tells_duplicates() {
        let mut s = Seen::default();
        assert!(s.first(0) && s.first(5) && !s.first(5) && s.first(3) && !s.first(0));
        assert!(s.first(10_000));
        assert!(!s.first(10), "older than the window counts as seen");
        assert!(s.first(10_000 - 1) && !s.first(10_000 - 1));
        for q in 10_001..20_000 {
            assert!(s.first(q));
        }
        assert!(!s.first(19_999));
    }
}
