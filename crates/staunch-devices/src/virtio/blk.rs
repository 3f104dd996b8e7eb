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
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR: u64 = 512;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

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
            T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(S_IOERR)?;
                let n = (d.len() as usize).min(ID_LEN);
                mem.write_slice(&self.id[..n], d.addr()).map_err(|_| S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(S_UNSUPP),
        }
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
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 0x40];
        cfg[..8].copy_from_slice(&self.capacity.to_le_bytes());
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
