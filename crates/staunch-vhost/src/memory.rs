//! The frontend's memory table as the backend sees it: every region mapped
//! from the fd that came with SET_MEM_TABLE, and the frontend's virtual
//! addresses (which vring addresses are given in) translated to guest
//! physical ones.

use std::fs::File;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory table: {0} regions but {1} fds")]
    Fds(usize, usize),
    #[error("memory region {index}: {what}")]
    Region { index: usize, what: String },
    #[error("memory table: {0}")]
    Map(String),
}

#[derive(Debug, Clone, Copy)]
struct Span {
    user: u64,
    size: u64,
    gpa: u64,
}

/// Guest memory mapped in the backend.
#[derive(Clone)]
pub struct Memory {
    pub mem: GuestMemoryMmap,
    spans: Vec<Span>,
}

impl Memory {
    /// Map the regions of a SET_MEM_TABLE. Every region must lie inside its
    /// file (a mapping past the end would fault on access) and regions must
    /// not overlap, in guest or frontend addresses.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Memory, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::Fds(regions.len(), files.len()));
        }
        let mut ranges = Vec::new();
        let mut spans = Vec::new();
        for (index, (r, f)) in regions.iter().zip(files).enumerate() {
            let bad = |what: String| MemoryError::Region { index, what };
            let r = *r; // packed: copy the fields out before using them
            let len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
            let end = r.mmap_offset.checked_add(r.memory_size).ok_or_else(|| bad("offset + size overflows".into()))?;
            if r.memory_size == 0 || end > len {
                let (size, off) = (r.memory_size, r.mmap_offset);
                return Err(bad(format!("{size} bytes at offset {off} do not fit its file of {len} bytes")));
            }
            if r.guest_phys_addr.checked_add(r.memory_size).is_none()
                || r.user_addr.checked_add(r.memory_size).is_none()
            {
                return Err(bad("address range overflows".into()));
            }
            let s = Span { user: r.user_addr, size: r.memory_size, gpa: r.guest_phys_addr };
            let overlap = |a: u64, b: u64, n: u64, m: u64| a < b + m && b < a + n;
            if spans
                .iter()
                .any(|o: &Span| overlap(o.gpa, s.gpa, o.size, s.size) || overlap(o.user, s.user, o.size, s.size))
            {
                return Err(bad("overlaps another region".into()));
            }
            spans.push(s);
            let size = usize::try_from(r.memory_size).map_err(|_| bad("too large".into()))?;
            let region = GuestRegionMmap::from_range(
                GuestAddress(r.guest_phys_addr),
                size,
                Some(FileOffset::new(f, r.mmap_offset)),
            )
            .map_err(|e| bad(e.to_string()))?;
            ranges.push(region);
        }
        ranges.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem = GuestMemoryMmap::from_regions(ranges).map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Memory { mem, spans })
    }

    /// The guest address of `len` bytes at frontend address `va`, if all of
    /// them lie in one region.
    pub fn translate(&self, va: u64, len: u64) -> Option<GuestAddress> {
        self.spans
            .iter()
            .find(|s| va >= s.user && va.checked_add(len).is_some_and(|e| e <= s.user + s.size))
            .map(|s| GuestAddress(va - s.user + s.gpa))
    }
}
