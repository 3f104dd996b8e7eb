//! virtio-blk over a raw file. Requests are served synchronously on the
//! notify exit with positional I/O straight into guest memory.

use super::VirtioDevice;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT, desc::split::Descriptor};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR: u64 = 512;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Sectors per discard or write-zeroes segment, and segments per request.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
pub const MAX_RANGE_SEGS: u32 = 16;
/// write-zeroes flag: the range may be deallocated (reads stay zero).
const WZ_UNMAP: u32 = 1;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 256;
const ID_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("disk {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("disk {path} is {len} bytes: not a whole number of 512-byte sectors")]
    Size { path: String, len: u64 },
}

pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    acked: u64,
    sizes: [u16; 1],
    /// Requests served so far (for benchmarks and recovery checks).
    pub requests: u64,
}

/// Versioned, serializable device state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlkState {
    pub version: u32,
    pub path: PathBuf,
    pub read_only: bool,
    pub capacity: u64,
    pub acked_features: u64,
    pub requests: u64,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlkError> {
        let p = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|err| BlkError::Open { path: p.clone(), err })?;
        Self::from_file(file, path, read_only)
    }

    /// A disk over an already open file (inherited across a re-exec, so it
    /// keeps working even if its path was renamed or removed meanwhile).
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, BlkError> {
        let p = path.display().to_string();
        let meta = file.metadata().map_err(|err| BlkError::Open { path: p.clone(), err })?;
        if !meta.is_file() {
            return Err(BlkError::Open { path: p, err: std::io::Error::other("not a regular file") });
        }
        let len = meta.len();
        if len % SECTOR != 0 {
            return Err(BlkError::Size { path: p, len });
        }
        let mut id = [0u8; ID_LEN];
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity: len / SECTOR,
            id,
            acked: 0,
            sizes: [QUEUE_SIZE],
            requests: 0,
        })
    }

    /// The backing file, e.g. to hand it to a successor image.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn state(&self) -> BlkState {
        BlkState {
            version: 1,
            path: self.path.clone(),
            read_only: self.read_only,
            capacity: self.capacity,
            acked_features: self.acked,
            requests: self.requests,
        }
    }

    /// A second handle on the same disk (another queue, another thread).
    pub fn try_clone(&self) -> Result<Block, BlkError> {
        let file =
            self.file.try_clone().map_err(|err| BlkError::Open { path: self.path.display().to_string(), err })?;
        Ok(Block { file, path: self.path.clone(), requests: 0, ..*self })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Serve one descriptor chain; returns the number of bytes written into
    /// guest memory (the used length), status included.
    pub fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let Some((status, rest)) = descs.split_last() else {
            return 0;
        };
        if !status.is_write_only() || status.len() < 1 || rest.is_empty() {
            return 0; // nowhere to report: complete with nothing written
        }
        let (hdr, data) = (&rest[0], &rest[1..]);
        let (st, written) = match self.execute(hdr, data, mem) {
            Ok(n) => (S_OK, n),
            Err(st) => (st, 0),
        };
        if mem.write_obj(st, status.addr()).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    fn execute(&mut self, hdr: &Descriptor, data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, u8> {
        if hdr.is_write_only() || hdr.len() < 16 {
            return Err(S_IOERR);
        }
        let raw: [u8; 16] = mem.read_obj(hdr.addr()).map_err(|_| S_IOERR)?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        self.requests += 1;
        match kind {
            T_IN | T_OUT => {
                let write = kind == T_OUT;
                if write && self.read_only {
                    return Err(S_IOERR);
                }
                // Directions must match: the device writes only into
                // write-only buffers and reads only from read-only ones.
                if data.iter().any(|d| d.is_write_only() == write) {
                    return Err(S_IOERR);
                }
                let total: u64 = data.iter().map(|d| d.len() as u64).sum();
                let end = sector.checked_mul(SECTOR).and_then(|s| s.checked_add(total)).ok_or(S_IOERR)?;
                if !total.is_multiple_of(SECTOR) || end > self.capacity * SECTOR {
                    return Err(S_IOERR);
                }
                let mut off = sector * SECTOR;
                for d in data {
                    self.transfer(mem, d.addr(), d.len() as usize, off, write)?;
                    off += d.len() as u64;
                }
                Ok(if write { 0 } else { total as u32 })
            }
            T_FLUSH => {
                if self.read_only {
                    return Ok(0);
                }
                self.file.sync_data().map_err(|_| S_IOERR)?;
                Ok(0)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(S_IOERR);
                }
                self.ranges(kind, data, mem)?;
                Ok(0)
            }
            T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(S_IOERR)?;
                let n = (d.len() as usize).min(ID_LEN);
                mem.write_slice(&self.id[..n], d.addr()).map_err(|_| S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(S_UNSUPP),
        }
    }

    /// Discard or write-zeroes: segments of (sector, sectors, flags), read
    /// from device-readable buffers. Both are idempotent (a resubmission
    /// after a backend restart leaves the same bytes): a discard punches a
    /// hole (it reads as zeros afterwards, as Linux's discard-zeroes
    /// expects nothing more), write-zeroes zeroes the range in place, or
    /// punches it when the guest allows unmapping.
    fn ranges(&self, kind: u32, data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), u8> {
        if data.iter().any(|d| d.is_write_only()) {
            return Err(S_IOERR);
        }
        let total: u64 = data.iter().map(|d| d.len() as u64).sum();
        if total == 0 || !total.is_multiple_of(16) || total / 16 > MAX_RANGE_SEGS as u64 {
            return Err(S_IOERR);
        }
        // Check every segment before touching the disk: a bad one fails
        // the request without half of it done.
        let mut segs = Vec::new();
        for d in data {
            for i in 0..d.len() as u64 / 16 {
                let raw: [u8; 16] = mem.read_obj(d.addr().unchecked_add(16 * i)).map_err(|_| S_IOERR)?;
                let sector = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
                let n = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
                let allowed = if kind == T_WRITE_ZEROES { WZ_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Err(S_UNSUPP);
                }
                let end = sector.checked_add(n as u64).ok_or(S_IOERR)?;
                if n > MAX_RANGE_SECTORS || end > self.capacity {
                    return Err(S_IOERR);
                }
                segs.push((sector * SECTOR, n as u64 * SECTOR, flags & WZ_UNMAP != 0));
            }
        }
        for (off, len, unmap) in segs {
            if len == 0 {
                continue;
            }
            let punch = kind == T_DISCARD || unmap;
            let mode =
                libc::FALLOC_FL_KEEP_SIZE | if punch { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
            // SAFETY: fallocate on our own file descriptor; no memory involved.
            let r = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off as i64, len as i64) };
            if r != 0 {
                // A filesystem without the mode: write zeros instead.
                self.zero(off, len)?;
            }
        }
        Ok(())
    }

    fn zero(&self, mut off: u64, len: u64) -> Result<(), u8> {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 64 << 10];
        let end = off + len;
        while off < end {
            let n = (end - off).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], off).map_err(|_| S_IOERR)?;
            off += n as u64;
        }
        Ok(())
    }

    fn transfer(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: usize, off: u64, write: bool) -> Result<(), u8> {
        let slice = mem.get_slice(addr, len).map_err(|_| S_IOERR)?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            // SAFETY: `ptr..ptr+len` is a mapped guest-memory slice checked by
            // get_slice; the guest may change it concurrently, which only
            // changes the bytes transferred, never memory safety.
            let n = unsafe {
                let p = ptr.add(done) as *mut libc::c_void;
                let pos = (off + done as u64) as libc::off64_t;
                if write {
                    libc::pwrite64(self.file.as_raw_fd(), p, len - done, pos)
                } else {
                    libc::pread64(self.file.as_raw_fd(), p, len - done, pos)
                }
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                return Err(S_IOERR);
            }
            done += n as usize;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { F_DISCARD | F_WRITE_ZEROES }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 0x40];
        cfg[..8].copy_from_slice(&self.capacity.to_le_bytes());
        if !self.read_only {
            // virtio_blk_config: max_discard_sectors, max_discard_seg,
            // discard_sector_alignment (4 KiB), max_write_zeroes_sectors,
            // max_write_zeroes_seg, write_zeroes_may_unmap.
            let fields = [(0x24, MAX_RANGE_SECTORS), (0x28, MAX_RANGE_SEGS), (0x2c, 8), (0x30, MAX_RANGE_SECTORS)];
            for (at, v) in fields.into_iter().chain([(0x34, MAX_RANGE_SEGS)]) {
                cfg[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            cfg[0x38] = 1;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| cfg.get(o + i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked = acked_features;
    }

    fn process_queue(&mut self, _index: usize, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let avail = q.avail_idx(mem, Ordering::Acquire).map_err(|e| e.to_string())?;
        if (avail - Wrapping(q.next_avail())).0 > q.size() {
            return Err(format!("avail index {} ran more than a queue ahead of {}", avail.0, q.next_avail()));
        }
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // Taken from the ring, not yet completed: the worst moment to fail.
            if staunch_fault::hit(&staunch_fault::VIRTQ_PROCESS).map_err(|e| e.to_string())? {
                // Corrupt the position and stop; the transport's integrity
                // check must notice before anything is served from it.
                q.set_next_avail(q.next_avail().wrapping_add(1000));
                return Ok(used);
            }
            // The chain iterator stops at loops and out-of-range indices.
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.serve(&descs, mem);
            q.add_used(mem, head, len).map_err(|e| e.to_string())?;
            used = true;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}
