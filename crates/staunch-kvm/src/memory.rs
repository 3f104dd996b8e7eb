//! Guest RAM backed by memfds: the one thing that outlives a VMM process, so
//! later recovery can rebuild a VM around the same memory without copying it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("guest memory size {0} MiB is out of range (16 MiB to 1 TiB)")]
    Size(u64),
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("sizing guest memory memfd to {size} bytes failed: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("mapping guest memory failed: {0}")]
    Map(String),
}

/// One contiguous RAM range and the memfd behind it.
#[derive(Debug)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
    pub file: File,
}

pub struct GuestRam {
    pub regions: Vec<RamRegion>,
    pub mem: GuestMemoryMmap,
    pub bytes: u64,
}

impl GuestRam {
    pub fn new(mib: u64) -> Result<Self, MemError> {
        if !(16..=1 << 20).contains(&mib) {
            return Err(MemError::Size(mib));
        }
        let bytes = mib << 20;
        let mut regions = Vec::new();
        for (i, (gpa, size)) in staunch_boot::ram_ranges(bytes).into_iter().enumerate() {
            let name = CString::new(format!("staunch-ram{i}")).expect("no NUL in name");
            // SAFETY: plain syscall with a valid C string; the fd is checked.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(MemError::Memfd(std::io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor we own.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(size).map_err(|err| MemError::Truncate { size, err })?;
            regions.push(RamRegion { gpa, size, file });
        }
        Self::map(regions, bytes)
    }

    /// Map RAM regions whose memfds already exist (inherited across exec):
    /// the guest's memory is reused in place, never copied.
    pub fn from_regions(regions: Vec<RamRegion>) -> Result<Self, MemError> {
        for r in &regions {
            let len = r.file.metadata().map_err(|e| MemError::Map(e.to_string()))?.len();
            if len < r.size {
                return Err(MemError::Map(format!("memfd for {:#x} holds {len} bytes, expected {}", r.gpa, r.size)));
            }
        }
        let bytes = regions.iter().map(|r| r.size).sum();
        Self::map(regions, bytes)
    }

    fn map(regions: Vec<RamRegion>, bytes: u64) -> Result<Self, MemError> {
        let mut ranges = Vec::new();
        for r in &regions {
            let f = r.file.try_clone().map_err(|e| MemError::Map(e.to_string()))?;
            ranges.push((GuestAddress(r.gpa), r.size as usize, Some(FileOffset::new(f, 0))));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| MemError::Map(e.to_string()))?;
        Ok(GuestRam { regions, mem, bytes })
    }
}
