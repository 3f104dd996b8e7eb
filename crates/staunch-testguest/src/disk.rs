//! The host's check of a `blk-verify` disk: every block holds its *last*
//! write. A guest that was stopped between two reports may have written a
//! few blocks past its last reported count, so the check takes a range of
//! write counts: `lo`, the count the guest reported, and `hi`, the most it
//! can have issued by then (`lo` plus a report interval plus the requests it
//! keeps in flight). Block `lba` must then hold a write at least as new as
//! the last one below `lo` and no newer than the last one below `hi`.

use crate::proto::{self, BLOCK_SIZE};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("disk image holds {have} bytes, {need} needed for {blocks} blocks")]
    Short { have: usize, need: usize, blocks: u64 },
    #[error("block {lba}: {err:?} (expected write {expect})")]
    Bad { lba: u64, err: proto::BlockError, expect: String },
    #[error("block {lba} holds write {found}, expected {expect}")]
    Stale { lba: u64, found: u64, expect: String },
}

/// The newest write below `n` that lands on `lba`.
fn last_below(n: u64, lba: u64, blocks: u64) -> Option<u64> {
    let last = n.checked_sub(1)?;
    let back = (last % blocks + blocks - lba) % blocks;
    last.checked_sub(back)
}

/// Check `bytes` (the disk image) for `blocks` blocks after `lo..=hi` writes.
pub fn check(bytes: &[u8], blocks: u64, lo: u64, hi: u64) -> Result<(), Vec<DiskError>> {
    let need = blocks as usize * BLOCK_SIZE;
    if bytes.len() < need {
        return Err(vec![DiskError::Short { have: bytes.len(), need, blocks }]);
    }
    let mut bad = Vec::new();
    for lba in 0..blocks {
        let (min, max) = (last_below(lo, lba, blocks), last_below(hi.max(lo), lba, blocks));
        let expect = match (min, max) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}..={b}"),
            (None, Some(b)) => format!("none or ..={b}"),
            _ => "none".into(),
        };
        let off = lba as usize * BLOCK_SIZE;
        let b: &[u8; BLOCK_SIZE] = bytes[off..off + BLOCK_SIZE].try_into().expect("block-sized slice");
        match proto::check_block(b, lba) {
            Err(proto::BlockError::Blank) if min.is_none() => {}
            Err(err) => bad.push(DiskError::Bad { lba, err, expect }),
            Ok(seq) => {
                let fresh_enough = min.is_none_or(|m| seq >= m);
                let not_future = max.is_some_and(|m| seq <= m);
                if seq % blocks != lba || !fresh_enough || !not_future {
                    bad.push(DiskError::Stale { lba, found: seq, expect });
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(blocks: u64, writes: impl Iterator<Item = u64>) -> Vec<u8> {
        let mut d = vec![0u8; blocks as usize * BLOCK_SIZE];
        for seq in writes {
            let lba = proto::lba_for(seq, blocks);
            let off = lba as usize * BLOCK_SIZE;
            let b: &mut [u8; BLOCK_SIZE] = (&mut d[off..off + BLOCK_SIZE]).try_into().unwrap();
            proto::fill_block(b, seq, lba);
        }
        d
    }

    #[test]
    fn exact_and_ranged() {
        let d = disk(8, 0..20);
        assert_eq!(check(&d, 8, 20, 20), Ok(()));
        // The guest reported 18, but may have written up to 20 before it stopped.
        assert_eq!(check(&d, 8, 18, 20), Ok(()));
        // It reported 20 but wrote only 18: blocks 2 and 3 are stale.
        let d = disk(8, 0..18);
        assert_eq!(check(&d, 8, 20, 24).unwrap_err().len(), 2);
        // Never reached: blank is fine.
        assert_eq!(check(&disk(8, 0..5), 8, 5, 5), Ok(()));
    }

    #[test]
    fn a_lost_overwrite_is_caught() {
        // Write 9 (block 1) lost: block 1 still holds write 1.
        let d = disk(8, (0..12).filter(|s| *s != 9));
        let e = check(&d, 8, 12, 12).unwrap_err();
        assert_eq!(e, vec![DiskError::Stale { lba: 1, found: 1, expect: "9".into() }]);
    }

    #[test]
    fn corruption_is_caught() {
        let mut d = disk(8, 0..8);
        d[3 * BLOCK_SIZE + 100] ^= 1;
        assert!(matches!(check(&d, 8, 8, 8).unwrap_err()[0], DiskError::Bad { lba: 3, .. }));
    }
}
