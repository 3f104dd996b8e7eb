//! The `console` workload's byte stream, and the host's check that a serial
//! log holds it exactly once.
//!
//! After its `STAUNCH ready ...` line the guest prints, for seq = 0, 1, ...
//!
//! ```text
//! STAUNCH con seq=<seq> maxgap_us=<digits> data=<data(seq)>\r\n
//! ```
//!
//! where [`data`] is 40 to 80 characters derived from `seq` alone, so every
//! byte but the `maxgap_us` value is predictable. With `staunch.reports=N`
//! it ends with `STAUNCH con end lines=N ...` (the rest of that line is not
//! part of the checked stream).

/// Shortest and longest data field.
pub const DATA_MIN: usize = 40;
pub const DATA_MAX: usize = 80;
/// Start of the line that ends a finite stream.
pub const END: &str = "STAUNCH con end lines=";

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The data field of line `seq`: 40..=80 characters of `[A-Za-z0-9_-]`.
pub fn data(seq: u64, buf: &mut [u8; DATA_MAX]) -> &str {
    let mut x = seq ^ 0x636f_6e73_6f6c_6521;
    let len = DATA_MIN + (splitmix(&mut x) % (DATA_MAX - DATA_MIN + 1) as u64) as usize;
    for b in buf[..len].iter_mut() {
        *b = ALPHABET[(splitmix(&mut x) >> 58) as usize];
    }
    // Every byte is ASCII from the alphabet.
    core::str::from_utf8(&buf[..len]).unwrap_or("")
}

#[cfg(feature = "alloc")]
pub use check::{check, Check, Deviation, Kind};

#[cfg(feature = "alloc")]
mod check {
    use super::{data, DATA_MAX, END};
    use alloc::format;
    use alloc::vec::Vec;

    /// Stands for the variable `maxgap_us` value in the expected stream.
    const DIGITS: u8 = 0;
    /// Tokens that must agree after a deviation before the checker trusts
    /// its guess at what happened.
    const AGREE: usize = 48;
    /// The longest run of lost or extra bytes the checker looks for.
    const MAX_SKIP: usize = 1 << 16;

    /// What happened at one place in the log.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        /// Expected bytes missing.
        Lost,
        /// Unexpected bytes that repeat the bytes just before them.
        Doubled,
        /// Other unexpected bytes (or bytes replaced by others: then as many
        /// bytes are also counted lost).
        Extra,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Deviation {
        /// Offset in the log where the stream first differs.
        pub offset: usize,
        pub kind: Kind,
        pub bytes: usize,
    }

    /// The result of checking one serial log.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Check {
        /// Where the stream starts in the log (after the ready line).
        pub start: usize,
        /// Complete `con` lines the checked part of the log spans (lines
        /// lost in the middle included: `lost` says what is missing).
        pub lines: u64,
        /// The stream's end line was found (`staunch.reports=N`).
        pub ended: bool,
        /// Expected bytes missing. (A `maxgap_us` value lost with its line
        /// counts as one byte: its length is unknowable.)
        pub lost: usize,
        /// Unexpected bytes that repeat what came right before them.
        pub doubled: usize,
        /// Other unexpected bytes.
        pub extra: usize,
        /// Offset in the log of the first deviation.
        pub first_bad: Option<usize>,
        /// Every deviation, in log order.
        pub deviations: Vec<Deviation>,
    }

    impl Check {
        /// Every expected byte exactly once.
        pub fn clean(&self) -> bool {
            self.deviations.is_empty()
        }
    }

    /// The expected stream, generated as far as it is looked at.
    struct Expected {
        buf: Vec<u8>,
        line_starts: Vec<usize>,
        next: u64,
        lines: Option<u64>,
        closed: bool,
    }

    impl Expected {
        fn get(&mut self, i: usize) -> Option<u8> {
            while self.buf.len() <= i && !self.closed {
                if self.lines.is_some_and(|n| self.next >= n) {
                    self.line_starts.push(self.buf.len());
                    self.buf.extend_from_slice(format!("{END}{} ", self.next).as_bytes());
                    self.closed = true;
                    break;
                }
                let mut d = [0u8; DATA_MAX];
                self.line_starts.push(self.buf.len());
                self.buf.extend_from_slice(format!("STAUNCH con seq={} maxgap_us=", self.next).as_bytes());
                self.buf.push(DIGITS);
                self.buf.extend_from_slice(format!(" data={}\r\n", data(self.next, &mut d)).as_bytes());
                self.next += 1;
            }
            self.buf.get(i).copied()
        }

        /// Complete lines before stream offset `e` (generated up to `e`).
        fn lines_before(&self, e: usize) -> u64 {
            // Line k has begun when line_starts[k] <= e, and is complete
            // once the next one has begun too (the end line counts as one).
            (self.line_starts.partition_point(|s| *s <= e) as u64).saturating_sub(1)
        }
    }

    /// Match one token of the expected stream at `e` against the log at `a`.
    fn step(log: &[u8], a: usize, exp: &mut Expected, e: usize) -> Option<(usize, usize)> {
        let want = exp.get(e)?;
        let got = *log.get(a)?;
        if want == DIGITS {
            let n = log[a..].iter().take(20).take_while(|b| b.is_ascii_digit()).count();
            (n > 0).then_some((a + n, e + 1))
        } else {
            (want == got).then_some((a + 1, e + 1))
        }
    }

    /// The log at `a` and the stream at `e` agree for a while, or to the
    /// end: of both (a finite stream), or of the log after at least one
    /// token (an open stream, which the log may cut anywhere).
    fn agrees(log: &[u8], mut a: usize, exp: &mut Expected, mut e: usize) -> bool {
        for matched in 0..AGREE {
            let (log_end, exp_end) = (a >= log.len(), exp.get(e).is_none());
            if log_end || exp_end {
                return (log_end && exp_end) || (log_end && exp.lines.is_none() && matched > 0);
            }
            match step(log, a, exp, e) {
                Some((a2, e2)) => (a, e) = (a2, e2),
                None => return false,
            }
        }
        true
    }

    /// Check that `log` (a whole serial log) holds the console stream
    /// exactly once: every byte except the `maxgap_us` values is compared.
    pub fn check(log: &[u8]) -> Check {
        let find = |hay: &[u8], pat: &[u8]| hay.windows(pat.len()).position(|w| w == pat);
        let start = find(log, b"STAUNCH ready")
            .and_then(|r| log[r..].iter().position(|b| *b == b'\n').map(|n| r + n + 1))
            .unwrap_or(0);
        // A finite stream: its end line says how many lines to expect, and
        // the checked stream stops at that line's count.
        let mut end = log.len();
        let mut lines = None;
        if let Some(p) = log[start..].windows(END.len()).rposition(|w| w == END.as_bytes()) {
            let p = start + p + END.len();
            let n = log[p..].iter().take_while(|b| b.is_ascii_digit()).count();
            if let Some(v) = core::str::from_utf8(&log[p..p + n]).ok().and_then(|s| s.parse().ok()) {
                lines = Some(v);
                end = (p + n + 1).min(log.len());
            }
        }
        let log = &log[..end];
        let mut exp = Expected { buf: Vec::new(), line_starts: Vec::new(), next: 0, lines, closed: false };
        let mut r = Check { start, ended: lines.is_some(), ..Check::default() };
        let (mut a, mut e) = (start, 0usize);
        while a < log.len() && exp.get(e).is_some() {
            if let Some((a2, e2)) = step(log, a, &mut exp, e) {
                (a, e) = (a2, e2);
                continue;
            }
            let mut found = None;
            for k in 1..=MAX_SKIP {
                if agrees(log, a, &mut exp, e + k) {
                    found = Some((0, k));
                } else if agrees(log, a + k, &mut exp, e) {
                    found = Some((k, 0));
                } else if agrees(log, a + k, &mut exp, e + k) {
                    found = Some((k, k));
                }
                if found.is_some() || (a + k >= log.len() && exp.get(e + k).is_none()) {
                    break;
                }
            }
            let (extra, lost) = found.unwrap_or((log.len() - a, 0));
            if lost > 0 {
                r.lost += lost;
                r.deviations.push(Deviation { offset: a, kind: Kind::Lost, bytes: lost });
            }
            if extra > 0 {
                let end = (a + extra).min(log.len());
                let doubled = lost == 0 && a >= start + extra && log[a..end] == log[a - extra..end - extra];
                let kind = if doubled { Kind::Doubled } else { Kind::Extra };
                if doubled {
                    r.doubled += end - a;
                } else {
                    r.extra += end - a;
                }
                r.deviations.push(Deviation { offset: a, kind, bytes: end - a });
            }
            r.first_bad.get_or_insert(a);
            (a, e) = (a + extra, e + lost);
        }
        // A finite stream must be complete; an open one may end anywhere
        // (the guest was still printing).
        if lines.is_some() && exp.get(e).is_some() {
            let mut missing = 0;
            while exp.get(e + missing).is_some() {
                missing += 1;
            }
            r.lost += missing;
            r.first_bad.get_or_insert(a);
            r.deviations.push(Deviation { offset: a, kind: Kind::Lost, bytes: missing });
            e += missing;
        }
        let _ = exp.get(e);
        r.lines = exp.lines_before(e);
        if r.ended {
            r.lines = r.lines.min(lines.unwrap_or(0));
        }
        r
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use std::string::String;
    use std::vec::Vec;

    fn line(seq: u64, gap: u64) -> String {
        let mut d = [0u8; DATA_MAX];
        std::format!("STAUNCH con seq={seq} maxgap_us={gap} data={}\r\n", data(seq, &mut d))
    }

    fn stream(n: u64, end: bool) -> (Vec<u8>, Vec<usize>) {
        let mut s = String::from("STAUNCH ready ring=3 tsc_khz=2000000 cmdline=\"staunch.work=console\"\r\n");
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(s.len());
            s += &line(i, 100 + i * 37 % 5000);
        }
        if end {
            s += &std::format!("STAUNCH con end lines={n} cpus=2 mismatches=0 maxgap_us=12\r\nSTAUNCH done code=0\r\n");
        }
        (s.into_bytes(), starts)
    }

    #[test]
    fn data_is_deterministic_printable_and_sized() {
        let mut a = [0u8; DATA_MAX];
        let mut b = [0u8; DATA_MAX];
        let mut lens = std::collections::BTreeSet::new();
        for seq in 0..2000 {
            let d = data(seq, &mut a);
            assert!((DATA_MIN..=DATA_MAX).contains(&d.len()), "{d}");
            assert!(d.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            lens.insert(d.len());
            let d = String::from(d);
            assert_eq!(d, data(seq, &mut b));
        }
        assert!(lens.len() > 30, "lengths vary");
        assert_ne!(String::from(data(1, &mut a)), data(2, &mut b));
    }

    #[test]
    fn clean_streams_pass() {
        let (s, _) = stream(500, true);
        let r = check(&s);
        assert!(r.clean(), "{r:?}");
        assert_eq!((r.lines, r.ended, r.lost, r.doubled, r.extra), (500, true, 0, 0, 0));
        // Open stream, cut mid-line (the guest still printing).
        let (s, starts) = stream(300, false);
        let r = check(&s[..starts[200] + 30]);
        assert!(r.clean(), "{r:?}");
        assert_eq!((r.lines, r.ended), (200, false));
    }

    #[test]
    fn one_byte_dropped() {
        let (mut s, starts) = stream(200, true);
        let at = starts[77] + 50;
        s.remove(at);
        let r = check(&s);
        assert_eq!((r.lost, r.doubled, r.extra), (1, 0, 0), "{r:?}");
        assert_eq!(r.first_bad, Some(at));
        assert_eq!(r.lines, 200);
        // The first byte of a line, and the last one.
        let (mut s, starts) = stream(200, true);
        s.remove(starts[10] - 1);
        s.remove(starts[150] - 1);
        let r = check(&s);
        assert_eq!((r.lost, r.doubled, r.extra), (2, 0, 0), "{r:?}");
        assert_eq!(r.deviations.len(), 2, "{r:?}");
    }

    #[test]
    fn one_byte_doubled() {
        let (mut s, starts) = stream(200, true);
        let at = starts[123] + 3;
        s.insert(at, s[at]);
        let r = check(&s);
        assert_eq!((r.lost, r.doubled, r.extra), (0, 1, 0), "{r:?}");
        // The doubled byte is the first or the second copy: same bytes.
        assert!(r.first_bad == Some(at) || r.first_bad == Some(at + 1), "{r:?}");
    }

    #[test]
    fn one_line_repeated() {
        let (s, starts) = stream(200, true);
        let (a, b) = (starts[42], starts[43]);
        let mut t = s[..b].to_vec();
        t.extend_from_slice(&s[a..b]);
        t.extend_from_slice(&s[b..]);
        let r = check(&t);
        assert_eq!((r.lost, r.doubled, r.extra), (0, b - a, 0), "{r:?}");
        assert_eq!(r.deviations.len(), 1);
        let off = r.first_bad.unwrap();
        assert!(off >= b && off < b + (b - a), "{r:?}");
        assert_eq!(r.lines, 200);
    }

    #[test]
    fn lost_lines_garbage_and_a_short_finite_stream() {
        let (s, starts) = stream(100, true);
        // Lines 20..23 lost.
        let mut t = s[..starts[20]].to_vec();
        t.extend_from_slice(&s[starts[23]..]);
        let r = check(&t);
        assert_eq!((r.doubled, r.extra), (0, 0), "{r:?}");
        // Each lost maxgap value counts as one byte.
        let gaps: usize = (20..23).map(|i| (100 + i * 37 % 5000).to_string().len() - 1).sum();
        assert_eq!(r.lost, starts[23] - starts[20] - gaps, "{r:?}");
        // Lines 20 and 23 begin alike up to "seq=2".
        assert_eq!(r.first_bad, Some(starts[20] + "STAUNCH con seq=2".len()));
        // A byte replaced by another.
        let mut t = s.clone();
        t[starts[5] + 60] = b'~';
        let r = check(&t);
        assert_eq!((r.lost, r.doubled, r.extra), (1, 0, 1), "{r:?}");
        // Foreign bytes inserted.
        let mut t = s[..starts[9]].to_vec();
        t.extend_from_slice(b"STAUNCH ready ring=3\r\n");
        t.extend_from_slice(&s[starts[9]..]);
        let r = check(&t);
        assert_eq!((r.lost, r.doubled, r.extra), (0, 0, 22), "{r:?}");
        // The end line promises 100 lines but the last two are missing.
        let end_line = s.windows(END.len()).position(|w| w == END.as_bytes()).unwrap();
        let t = [&s[..starts[98]], &s[end_line..]].concat();
        let r = check(&t);
        let gaps: usize = (98..100).map(|i| (100 + i * 37 % 5000).to_string().len() - 1).sum();
        assert_eq!((r.lost, r.doubled, r.extra), (end_line - starts[98] - gaps, 0, 0), "{r:?}");
        assert_eq!(r.lines, 100, "the stream spans all 100, two of them lost: {r:?}");
    }

    #[test]
    fn values_of_maxgap_do_not_matter() {
        let mut s = String::from("STAUNCH ready\r\n");
        for i in 0..50 {
            s += &line(i, [0, 7, 123_456_789, 18_446_744_073_709_551_615][i as usize % 4]);
        }
        assert!(check(s.as_bytes()).clean());
    }
}
