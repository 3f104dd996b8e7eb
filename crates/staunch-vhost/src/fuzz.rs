//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz, nightly) and
//! for the randomized tests that drive the same code on stable: arbitrary
//! bytes must give an error or a virtio error status, never a panic, a hang
//! or an access outside what the backend was given.

use crate::backend::{self, Device};
use crate::blk::BlkDevice;
use crate::inflight::Region;
use crate::memory::Memory;
use crate::queue::{self, WorkerSetup};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;
const DISK: u64 = 1 << 20;

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: plain syscall with a valid C string; checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    f
}

/// A disk of `DISK` bytes in a memfd (a regular file to the block model).
fn disk() -> BlkDevice {
    let f = memfd(c"fuzz-disk", DISK);
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)));
    let dev = BlkDevice::open(&path, false, 1).expect("fuzz disk");
    drop(f);
    dev
}

/// Guest memory of `MEM` bytes at guest address 0 (frontend address 1 GiB).
fn memory() -> Memory {
    let f = memfd(c"fuzz-mem", MEM);
    let r = VhostUserMemoryRegion::new(0, MEM, 1 << 30, 0);
    Memory::map(&[r], vec![f]).expect("fuzz memory")
}

/// One ring's worth of guest-written bytes, served by the block backend:
/// `data` is laid out in guest memory from address 0 (descriptor table at
/// 0, avail ring at 0x1000, used ring at 0x2000, buffers anywhere), its
/// first byte picks the queue size, its second the inflight state.
/// Returns how far the backend moved through the avail ring.
pub fn blk_requests(data: &[u8]) -> u16 {
    let dev = disk();
    ring(data, 0, &dev)
}

/// The same for the network backend: the second byte's bit 7 picks the
/// receive queue (frames waiting on its tap, a socket pair here, go into
/// guest buffers) or the transmit queue (guest chains go to the tap).
pub fn net_chains(data: &[u8]) -> u16 {
    let Some(&flags) = data.get(1) else { return 0 };
    let (tap, host) = UnixStream::pair().expect("socketpair");
    tap.set_nonblocking(true).expect("nonblocking");
    host.set_nonblocking(true).expect("nonblocking");
    let rx = flags & 0x80 != 0;
    if rx {
        use std::io::Write;
        // A few frames of varied sizes waiting on the tap.
        let mut h = &host;
        for n in [60usize, 1514, 14, 9000] {
            let _ = h.write_all(&vec![0x5a; n]);
        }
    }
    let dev = crate::net::NetDevice::new(File::from(std::os::fd::OwnedFd::from(tap)));
    ring(data, if rx { 0 } else { 1 }, &dev)
}

fn ring(data: &[u8], queue: usize, dev: &dyn Device) -> u16 {
    let Some((&sel, rest)) = data.split_first() else { return 0 };
    let Some((&flags, rest)) = rest.split_first() else { return 0 };
    let size = 1u16 << (sel % 9);
    let mem = memory();
    let n = rest.len().min(MEM as usize);
    let _ = mem.mem.write_slice(&rest[..n], GuestAddress(0));
    let inflight = (flags & 1 != 0).then(|| {
        let r = Region::create(1, 256).expect("inflight region");
        if flags & 2 != 0 {
            // A predecessor's leftovers: every descriptor "in flight".
            let q = r.queue(0).expect("queue 0");
            q.recover(0);
            for h in 0..size {
                q.begin(h, h as u64 + 1);
            }
        }
        Arc::new(r)
    });
    let setup = WorkerSetup {
        index: 0,
        size,
        desc: GuestAddress(0),
        avail: GuestAddress(0x1000),
        used: GuestAddress(0x2000),
        base: u16::from((flags >> 2) & 0x1f),
        kick: memfd(c"fuzz-kick", 0),
        call: None,
        mem,
        inflight,
        handler: dev.handler(queue).expect("handler"),
        events: None,
        component: "fuzz",
    };
    let base = setup.base;
    queue::serve_once(setup).map(|n| n.wrapping_sub(base)).unwrap_or(0)
}

/// Bytes from a frontend on the backend's socket, until they run out.
pub fn vhost_messages(data: &[u8]) {
    use std::io::{Read, Write};
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let dev: Arc<dyn Device> = Arc::new(disk());
    let server = std::thread::spawn(move || backend::serve_one_connection(theirs, dev, &backend::Options::default()));
    let mut w = ours.try_clone().expect("socket");
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let mut r = ours;
        let _ = r.read_to_end(&mut sink);
    });
    let _ = w.write_all(data);
    let _ = w.shutdown(std::net::Shutdown::Write);
    server.join().expect("the backend's connection handler panicked");
    drop(w);
    let _ = reader.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        /// A plausible ring laid out as the entry points expect: 64
        /// descriptors pointing into memory (and sometimes not), mostly of
        /// the lengths `lens`, chains that loop, flags that lie; avail
        /// indices ahead and behind.
        fn ring(&mut self, lens: [u32; 4]) -> Vec<u8> {
            let mut mem = vec![0u8; 0x3000];
            for i in 0..64 {
                let at = i * 16;
                let addr = if self.next().is_multiple_of(4) { self.next() } else { 0x4000 + (self.next() % 0xf0000) };
                let len = if self.next().is_multiple_of(4) { self.next() as u32 } else { lens[i % 4] };
                let flags = (self.next() % 8) as u16;
                let next = (self.next() % 80) as u16;
                mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
            }
            let idx = (self.next() % 300) as u16;
            mem[0x1002..0x1004].copy_from_slice(&idx.to_le_bytes());
            for i in 0..256 {
                let h = (self.next() % 70) as u16;
                mem[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&h.to_le_bytes());
            }
            mem
        }
    }

    /// Plausible rings: descriptors pointing into memory (and sometimes not),
    /// chains that loop, lengths that lie, avail indices ahead and behind.
    #[test]
    fn random_rings_never_panic() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut taken = 0u64;
        for _ in 0..300 {
            let mut d = vec![rng.next() as u8 % 9, rng.next() as u8];
            d.extend(rng.ring([16, 4096, 1, 512]));
            let tail = (rng.next() % 4096) as usize;
            d.extend(rng.bytes(tail));
            taken += blk_requests(&d) as u64;
        }
        // Not a vacuous test: requests were taken from the rings and served.
        assert!(taken > 1000, "{taken}");
    }

    /// The same rings through both network queues.
    #[test]
    fn random_net_chains_never_panic() {
        let mut rng = Rng(0x7e7e_1234_5678_0001);
        let mut taken = 0u64;
        for round in 0..200u32 {
            let mut d = vec![rng.next() as u8 % 9, (rng.next() as u8 & 0x7f) | if round % 2 == 0 { 0x80 } else { 0 }];
            d.extend(rng.ring([12, 2048, 1, 60]));
            taken += net_chains(&d) as u64;
        }
        assert!(taken > 200, "{taken}");
    }

    /// Well-framed messages with random codes and bodies, and raw garbage.
    #[test]
    fn random_messages_never_panic() {
        let mut rng = Rng(0x0bad_cafe_f00d_0001);
        for round in 0..200u32 {
            let mut d = Vec::new();
            for _ in 0..(rng.next() % 8) {
                let code = (rng.next() % 48) as u32;
                let n = match rng.next() % 4 {
                    0 => 0,
                    1 => 8,
                    2 => 24,
                    _ => (rng.next() % 300) as usize,
                };
                let body = rng.bytes(n);
                let size = if rng.next().is_multiple_of(8) { rng.next() as u32 } else { body.len() as u32 };
                d.extend(code.to_le_bytes());
                d.extend(1u32.to_le_bytes());
                d.extend(size.to_le_bytes());
                d.extend(body);
            }
            if round.is_multiple_of(10) {
                d.extend(rng.bytes(64));
            }
            vhost_messages(&d);
        }
    }
}
