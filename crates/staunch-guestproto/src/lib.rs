//! The contract between the Staunch test guest and the host.
//!
//! The guest is `no_std` and freestanding; the host parses its serial output
//! and checks its disk. Both sides use this crate so the formats cannot drift.
//! The guest builds it without default features (no heap); the host gets the
//! checkers that need one (`alloc`).
#![cfg_attr(not(test), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod blk;
pub mod console;
pub mod net;

/// Every line the guest reports starts with this word.
pub const LINE_PREFIX: &str = "STAUNCH ";

/// Size of one verified block written by `blk-verify`.
pub const BLOCK_SIZE: usize = 4096;
/// Sectors (512 bytes) per verified block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / 512) as u64;
/// Magic at the start of every verified block.
pub const BLOCK_MAGIC: [u8; 8] = *b"STNCHBLK";

/// Port the guest writes its exit code to (QEMU's `isa-debug-exit` port, so
/// the same image powers off under both VMMs).
pub const POWER_PORT: u16 = 0xf4;
/// Port used for the PIO exit benchmark (the POST diagnostic port).
pub const BENCH_PORT: u16 = 0x80;

/// Guest exit codes written to [`POWER_PORT`].
pub mod exit_code {
    pub const OK: u8 = 0;
    pub const MISMATCH: u8 = 2;
    pub const FAULT: u8 = 3;
    pub const PANIC: u8 = 4;
    pub const BAD_CONFIG: u8 = 5;
    pub const NO_DEVICE: u8 = 6;
}

/// FNV-1a, 64 bit: cheap, no tables, good enough to catch torn or stale blocks.
pub fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Fill `buf` (one block) with the content for write number `seq` at block `lba`.
pub fn fill_block(buf: &mut [u8; BLOCK_SIZE], seq: u64, lba: u64) {
    buf[0..8].copy_from_slice(&BLOCK_MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[16..24].copy_from_slice(&lba.to_le_bytes());
    buf[24..32].copy_from_slice(&0u64.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ lba ^ 0x0051_574e_4348;
    if x == 0 {
        x = 1;
    }
    for chunk in buf[32..].chunks_exact_mut(8) {
        x = xorshift(x);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let sum = fnv1a(&buf[..], FNV_OFFSET);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Why a block failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// No magic: never written (or overwritten by something else).
    Blank,
    /// The block records another position than where it was found.
    WrongLba { found: u64 },
    /// Checksum mismatch: torn or corrupted.
    Checksum,
    /// Header fine but the payload is not what `seq` generates.
    Payload,
}

/// Check one block; returns its sequence number.
pub fn check_block(buf: &[u8; BLOCK_SIZE], lba: u64) -> Result<u64, BlockError> {
    if buf[0..8] != BLOCK_MAGIC {
        return Err(BlockError::Blank);
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (seq, found, sum) = (word(8), word(16), word(24));
    if found != lba {
        return Err(BlockError::WrongLba { found });
    }
    let mut h = fnv1a(&buf[..24], FNV_OFFSET);
    h = fnv1a(&[0u8; 8], h);
    h = fnv1a(&buf[32..], h);
    if h != sum {
        return Err(BlockError::Checksum);
    }
    let mut expect = [0u8; BLOCK_SIZE];
    fill_block(&mut expect, seq, lba);
    if expect[..] != buf[..] {
        return Err(BlockError::Payload);
    }
    Ok(seq)
}

/// Which block `blk-verify` write number `seq` lands on, for a region of `blocks`.
pub fn lba_for(seq: u64, blocks: u64) -> u64 {
    seq % blocks
}

/// Value of `key=value` in a space-separated line (`key` without the `=`).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_roundtrip_and_corruption() {
        let mut b = [0u8; BLOCK_SIZE];
        fill_block(&mut b, 77, 5);
        assert_eq!(check_block(&b, 5), Ok(77));
        assert_eq!(check_block(&b, 6), Err(BlockError::WrongLba { found: 5 }));
        b[1000] ^= 1;
        assert_eq!(check_block(&b, 5), Err(BlockError::Checksum));
        assert_eq!(check_block(&[0u8; BLOCK_SIZE], 0), Err(BlockError::Blank));
    }

    #[test]
    fn fields() {
        let l = "STAUNCH blk written=3 verified=2";
        assert_eq!(field(l, "written"), Some("3"));
        assert_eq!(field(l, "verified"), Some("2"));
        assert_eq!(field(l, "x"), None);
    }
}
