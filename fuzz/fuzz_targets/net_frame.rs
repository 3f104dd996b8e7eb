//! Frames as `staunch net-peer` and the test guest receive them (from a
//! hostile peer): parsed, checked, answered in place; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staunch_guestproto::net;

fuzz_target!(|data: &[u8]| {
    let mut f = data.to_vec();
    if let Ok(p) = net::parse(&f) {
        assert!(p.len <= f.len());
        net::answer(&mut f[..p.len], [2, 0, 0, 0, 0, 1]);
        assert_eq!(net::parse(&f[..p.len]).map(|r| r.seq), Ok(p.seq));
    }
    let mut seen = net::Seen::new();
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        seen.first(u64::from_le_bytes(b));
    }
});
