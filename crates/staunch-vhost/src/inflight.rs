//! The vhost-user inflight region ("Inflight I/O tracking" in the
//! vhost-user specification), split virtqueues.
//!
//! The backend allocates it as a memfd in GET_INFLIGHT_FD; the frontend
//! keeps the fd and hands it back with SET_INFLIGHT_FD to every backend it
//! connects to afterwards. Per queue, laid out exactly as the specification
//! and libvhost-user do, so that QEMU's frontend and ours interoperate with
//! any backend that implements it:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc[desc_num] { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! each queue's part rounded up to 64 bytes. A descriptor is marked in
//! flight (with a submission counter) before the backend acts on it and
//! cleared after its used-ring entry is published; `last_batch_head` and
//! `used_idx` tell a restarted backend whether it died between publishing a
//! used entry and clearing it. The frontend never interprets the region: it
//! only keeps it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{Ordering, fence};

/// The version a backend writes into a queue's header on first use.
pub const VERSION: u16 = 1;
const ALIGN: u64 = 64;
const HEADER: usize = 16;
const DESC: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: {0}")]
    Io(#[from] std::io::Error),
    #[error("inflight region of {size} bytes at offset {offset} is too small for {queues} queues of {queue_size}")]
    TooSmall { size: u64, offset: u64, queues: u16, queue_size: u16 },
    #[error("inflight region: {0} queues of size {1} are not a valid geometry")]
    Geometry(u16, u16),
}

/// Bytes one queue's part takes (libvhost-user's formula, so both ends of a
/// connection agree on the stride whatever produced the region).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC as u64 * queue_size as u64 + 2).div_ceil(ALIGN) * ALIGN
}

/// A mapping of the region (owned by the backend or the frontend).
pub struct Region {
    file: File,
    base: *mut u8,
    len: usize,
    offset: u64,
    queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory accessed with volatile
// operations; each queue's part is touched by one queue worker at a time.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// A fresh, zeroed region for `queues` queues of `queue_size` entries
    /// (GET_INFLIGHT_FD). The memfd is sealed against shrinking: a peer
    /// cannot truncate it under the other's mapping.
    pub fn create(queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        if queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(InflightError::Geometry(queues, queue_size));
        }
        let size = queue_region_size(queue_size) * queues as u64;
        let name = c"staunch-inflight";
        // SAFETY: plain syscall with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: fcntl on our own descriptor.
        let r =
            unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Region::map(file, size, 0, queues, queue_size)
    }

    /// Map a region a peer handed over. Its geometry is checked against its
    /// size: a frontend's numbers are not trusted.
    pub fn map(file: File, size: u64, offset: u64, queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        let too_small = || InflightError::TooSmall { size, offset, queues, queue_size };
        if queues == 0 || queue_size == 0 {
            return Err(InflightError::Geometry(queues, queue_size));
        }
        let need = queue_region_size(queue_size).checked_mul(queues as u64).ok_or_else(too_small)?;
        let real = file.metadata()?.len();
        if size < need || offset.checked_add(size).is_none_or(|end| end > real) || !offset.is_multiple_of(4096) {
            return Err(too_small());
        }
        let len = usize::try_from(size).map_err(|_| too_small())?;
        // SAFETY: a shared mapping of a file we hold, of a length within its
        // size (checked above); the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Region { file, base: base as *mut u8, len, offset, queues, queue_size })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn size(&self) -> u64 {
        self.len as u64
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn queues(&self) -> u16 {
        self.queues
    }
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The part of queue `index`, if the region has one.
    pub fn queue(&self, index: usize) -> Option<QueueInflight<'_>> {
        if index >= self.queues as usize {
            return None;
        }
        let stride = queue_region_size(self.queue_size) as usize;
        // SAFETY: index < queues and queues * stride <= len (checked at map).
        let base = unsafe { self.base.add(index * stride) };
        Some(QueueInflight { base, entries: self.queue_size, _region: std::marker::PhantomData })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// What a restarted backend must do for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the device continues in the avail ring: what the guest was told
    /// (its used index) plus what was taken and is still in flight.
    pub next_avail: u16,
    pub next_used: u16,
    /// Heads to serve again before anything new, oldest submission first.
    pub resubmit: Vec<u16>,
    /// A used entry had been published but not cleared: fixed up.
    pub fixed_last_batch: bool,
}

/// One queue's part of the region. Every access is volatile: the other end
/// (or our own predecessor) shares the memory.
pub struct QueueInflight<'a> {
    base: *mut u8,
    entries: u16,
    _region: std::marker::PhantomData<&'a Region>,
}

impl QueueInflight<'_> {
    fn at<T>(&self, off: usize) -> *mut T {
        // SAFETY: callers pass offsets inside this queue's part (header
        // fields, or a descriptor index checked against `entries`).
        unsafe { self.base.add(off) as *mut T }
    }
    fn get16(&self, off: usize) -> u16 {
        // SAFETY: an aligned u16 field inside the mapping.
        u16::from_le(unsafe { self.at::<u16>(off).read_volatile() })
    }
    fn set16(&self, off: usize, v: u16) {
        // SAFETY: as in get16.
        unsafe { self.at::<u16>(off).write_volatile(v.to_le()) }
    }
    pub fn version(&self) -> u16 {
        self.get16(8)
    }
    pub fn desc_num(&self) -> u16 {
        self.get16(10)
    }
    pub fn last_batch_head(&self) -> u16 {
        self.get16(12)
    }
    pub fn used_idx(&self) -> u16 {
        self.get16(14)
    }
    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.entries).then(|| HEADER + head as usize * DESC)
    }
    pub fn is_inflight(&self, head: u16) -> bool {
        // SAFETY: a byte inside the mapping (index checked by desc()).
        self.desc(head).is_some_and(|d| unsafe { self.at::<u8>(d).read_volatile() } == 1)
    }
    pub fn counter(&self, head: u16) -> u64 {
        // SAFETY: an aligned u64 inside the mapping (index checked by desc()).
        self.desc(head).map(|d| u64::from_le(unsafe { self.at::<u64>(d + 8).read_volatile() })).unwrap_or(0)
    }

    /// Taken from the avail ring, about to be acted on.
    pub fn begin(&self, head: u16, counter: u64) {
        let Some(d) = self.desc(head) else { return };
        // SAFETY: fields of descriptor `head`, inside the mapping.
        unsafe {
            self.at::<u64>(d + 8).write_volatile(counter.to_le());
            fence(Ordering::Release);
            self.at::<u8>(d).write_volatile(1);
        }
        fence(Ordering::SeqCst);
    }

    /// About to publish the used entry of `head`.
    pub fn pre_put(&self, head: u16) {
        self.set16(12, head);
        fence(Ordering::SeqCst);
    }

    /// The used entry of `head` is published and the used index is now
    /// `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            // SAFETY: the inflight byte of descriptor `head`.
            unsafe { self.at::<u8>(d).write_volatile(0) };
        }
        fence(Ordering::SeqCst);
        self.set16(14, used_idx);
        fence(Ordering::SeqCst);
    }

    /// Prepare the queue for a backend that starts on it, given the used
    /// index in guest memory. A queue never used before is initialised;
    /// one a predecessor used yields what to serve again.
    pub fn recover(&self, guest_used: u16) -> Recovery {
        if self.version() == 0 {
            // First use: the frontend allocated it zeroed.
            self.set16(10, self.entries);
            self.set16(14, guest_used);
            self.set16(8, VERSION);
            fence(Ordering::SeqCst);
            return Recovery {
                next_avail: guest_used,
                next_used: guest_used,
                resubmit: Vec::new(),
                fixed_last_batch: false,
            };
        }
        let mut fixed = false;
        if self.used_idx() != guest_used {
            // The predecessor published a used entry and died before
            // clearing its descriptor: that request is complete.
            let head = self.last_batch_head();
            if let Some(d) = self.desc(head) {
                // SAFETY: the inflight byte of descriptor `head`.
                unsafe { self.at::<u8>(d).write_volatile(0) };
            }
            fence(Ordering::SeqCst);
            self.set16(14, guest_used);
            fixed = true;
        }
        let mut pending: Vec<(u64, u16)> =
            (0..self.entries).filter(|&h| self.is_inflight(h)).map(|h| (self.counter(h), h)).collect();
        pending.sort_unstable();
        let inuse = pending.len() as u16;
        Recovery {
            next_avail: guest_used.wrapping_add(inuse),
            next_used: guest_used,
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
            fixed_last_batch: fixed,
        }
    }

    /// The next submission counter after a recovery (one past the largest).
    pub fn next_counter(&self) -> u64 {
        (0..self.entries).filter(|&h| self.is_inflight(h)).map(|h| self.counter(h) + 1).max().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_specification() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        let r = Region::create(2, 256).unwrap();
        assert_eq!(r.size(), 2 * 4160);
        let q = r.queue(1).unwrap();
        assert_eq!(q.recover(0).resubmit, Vec::<u16>::new());
        assert_eq!((q.version(), q.desc_num()), (VERSION, 256));
        q.begin(7, 3);
        // Byte 0 of descriptor 7 is its inflight flag, bytes 8..16 the counter.
        let bytes = |off: usize| unsafe { *r.base.add(4160 + off) };
        assert_eq!(bytes(HEADER + 7 * DESC), 1);
        assert_eq!(bytes(HEADER + 7 * DESC + 8), 3);
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn recovery_resubmits_in_submission_order_and_fixes_a_half_put() {
        let r = Region::create(1, 8).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(10);
        // Taken in order 5, 2, 6, 3; 2 completes; 6's used entry is published
        // (guest used index 12) but the backend dies before clearing it.
        for (c, h) in [5u16, 2, 6, 3].iter().enumerate() {
            q.begin(*h, c as u64 + 1);
        }
        q.pre_put(2);
        q.post_put(2, 11);
        q.pre_put(6);
        let rec = q.recover(12);
        assert!(rec.fixed_last_batch);
        assert_eq!(rec.resubmit, vec![5, 3]);
        assert_eq!((rec.next_used, rec.next_avail), (12, 14));
        assert_eq!(q.next_counter(), 5);
    }

    #[test]
    fn a_region_smaller_than_its_geometry_is_refused() {
        let r = Region::create(1, 8).unwrap();
        let f = r.file().try_clone().unwrap();
        assert!(Region::map(f, r.size(), 0, 4, 256).is_err());
        let f = r.file().try_clone().unwrap();
        assert!(Region::map(f, r.size(), 0, 1, 8).is_ok());
    }
}
