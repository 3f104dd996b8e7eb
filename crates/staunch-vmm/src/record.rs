//! The preserved record: everything needed to rebuild a running VM around its
//! memory in a fresh process image. Framed with magic, version, length and a
//! CRC, and validated before use: a process that failed may have corrupted
//! its own state (ReHype's lesson), so a bad record is refused, never trusted.

use crate::config::VmConfig;
use serde::{Deserialize, Serialize};
use staunch_devices::legacy::I8042State;
use staunch_devices::serial::SerialState;
use staunch_devices::virtio::mmio::MmioState;
use staunch_kvm::state::{VcpuSnapshot, VmSnapshot};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

pub const MAGIC: [u8; 8] = *b"STNCHREC";
pub const VERSION: u32 = 6;
const HEADER: usize = 8 + 4 + 8 + 4;
/// A record larger than this is corrupt, not big.
const MAX_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("preserved record: bad magic (not a Staunch record)")]
    Magic,
    #[error("preserved record: version {0} is not supported (expected {VERSION})")]
    Version(u32),
    #[error("preserved record: length {0} is out of range")]
    Length(u64),
    #[error("preserved record: CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted")]
    Crc { stored: u32, computed: u32 },
    #[error("preserved record: cannot decode: {0}")]
    Decode(String),
    #[error("preserved record: {0}")]
    Io(#[from] std::io::Error),
}

/// One RAM region: where it sits in the guest and the memfd behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RamInfo {
    pub gpa: u64,
    pub size: u64,
    pub fd: RawFd,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub virtio: Vec<MmioState>,
}

#[derive(Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    /// Why the record was written: "upgrade", "crash: SIGSEGV", ...
    pub cause: String,
    pub config: VmConfig,
    pub ram: Vec<RamInfo>,
    pub vcpus: Vec<VcpuSnapshot>,
    pub vm: VmSnapshot,
    pub devices: DevicesState,
    /// CLOCK_MONOTONIC when the guest was paused (survives exec).
    pub paused_at_ns: u64,
    /// In-flight virtio requests must be served again (crash path).
    pub replay_in_flight: bool,
    /// How many times this VM was rebuilt so far (upgrades and recoveries).
    pub generation: u64,
    /// Inherited descriptors of the disks, in config order (empty: reopen
    /// by path, as after a snapshot restore).
    pub disk_fds: Vec<RawFd>,
    /// Inherited console descriptors: the log file, or the unix listener
    /// and its attached client (empty: reopen or rebind by path).
    pub console_fds: Vec<RawFd>,
    /// Version 4: guest writes a crash interrupted mid-exit, completed in
    /// KVM and replayed to the devices by the successor.
    pub pending_writes: Vec<staunch_kvm::vcpu::PendingWrite>,
    /// Each vCPU's KVM_RUN count, continued by the successor (the stamps of
    /// its exits stay unique).
    pub vcpu_runs: Vec<u64>,
    /// Version 5: each vhost-user link (disks, then network devices: bus
    /// order), its inflight region among `disk_fds` in the same order.
    /// Version 6: the config has network devices.
    pub vhost: Vec<staunch_vhost::frontend::LinkRecord>,
}

pub fn encode(r: &VmRecord) -> Result<Vec<u8>, RecordError> {
    let payload = bincode::serialize(r).map_err(|e| RecordError::Decode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub fn decode(b: &[u8]) -> Result<VmRecord, RecordError> {
    if b.len() < HEADER || b[..8] != MAGIC {
        return Err(RecordError::Magic);
    }
    let version = u32::from_le_bytes(b[8..12].try_into().map_err(|_| RecordError::Magic)?);
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let len = u64::from_le_bytes(b[12..20].try_into().map_err(|_| RecordError::Magic)?);
    if len > MAX_LEN || len as usize > b.len() - HEADER {
        return Err(RecordError::Length(len));
    }
    let stored = u32::from_le_bytes(b[20..24].try_into().map_err(|_| RecordError::Magic)?);
    let payload = &b[HEADER..HEADER + len as usize];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(RecordError::Crc { stored, computed });
    }
    let r: VmRecord = bincode::deserialize(payload).map_err(|e| RecordError::Decode(e.to_string()))?;
    if r.version != VERSION {
        return Err(RecordError::Version(r.version));
    }
    Ok(r)
}

/// Write `bytes` into a new memfd that survives exec; returns it.
pub fn to_memfd(bytes: &[u8]) -> Result<File, RecordError> {
    let name = c"staunch-preserved";
    // SAFETY: plain syscall with a valid C string; the fd is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    Ok(f)
}

/// Read a whole record file or memfd from its start.
pub fn read_fd(f: &mut File) -> Result<Vec<u8>, RecordError> {
    f.seek(SeekFrom::Start(0))?;
    let mut v = Vec::new();
    f.take(MAX_LEN + HEADER as u64).read_to_end(&mut v)?;
    Ok(v)
}

/// Let `fd` survive exec.
pub fn keep_across_exec(fd: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Snapshot file: "STNCHSNP", version, record length, the framed record,
/// then each RAM region's bytes in record order.
pub const SNAP_MAGIC: [u8; 8] = *b"STNCHSNP";

/// Write a snapshot of `rec` and its memory to `path`. Memory is copied by
/// the kernel (copy_file_range) from the memfds; holes stay holes.
pub fn write_snapshot(path: &std::path::Path, rec: &VmRecord, ram: &[&File]) -> Result<u64, RecordError> {
    let framed = encode(rec)?;
    // Written beside its name and renamed into place once whole and synced:
    // a file under the asked-for name is always a complete snapshot, even
    // if this process dies halfway.
    let mut part = path.as_os_str().to_owned();
    part.push(".partial");
    let part = std::path::PathBuf::from(part);
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&part)?;
    f.write_all(&SNAP_MAGIC)?;
    f.write_all(&VERSION.to_le_bytes())?;
    f.write_all(&(framed.len() as u64).to_le_bytes())?;
    f.write_all(&framed)?;
    let mut total = f.stream_position()?;
    for (r, src) in rec.ram.iter().zip(ram) {
        copy_range(src, 0, &f, total, r.size)?;
        total += r.size;
    }
    f.set_len(total)?;
    f.sync_all()?;
    std::fs::rename(&part, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(total)
}

/// Read a snapshot: the record, with its RAM loaded into fresh memfds
/// (the record's fd numbers are replaced by theirs).
pub fn read_snapshot(path: &std::path::Path) -> Result<(VmRecord, Vec<File>), RecordError> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head)?;
    if head[..8] != SNAP_MAGIC {
        return Err(RecordError::Magic);
    }
    let v = u32::from_le_bytes(head[8..12].try_into().map_err(|_| RecordError::Magic)?);
    if v != VERSION {
        return Err(RecordError::Version(v));
    }
    let len = u64::from_le_bytes(head[12..20].try_into().map_err(|_| RecordError::Magic)?);
    if len > MAX_LEN {
        return Err(RecordError::Length(len));
    }
    let mut framed = vec![0u8; len as usize];
    f.read_exact(&mut framed)?;
    let mut rec = decode(&framed)?;
    // Descriptors of the saving process mean nothing here.
    rec.disk_fds.clear();
    // A snapshot's inflight regions are gone with its process: links start afresh.
    rec.vhost.clear();
    rec.console_fds.clear();
    let file_len = f.metadata()?.len();
    let mut off = 20 + len;
    let mut files = Vec::new();
    for r in &mut rec.ram {
        if off.checked_add(r.size).is_none_or(|end| end > file_len) {
            return Err(RecordError::Length(r.size));
        }
        let name = c"staunch-ram";
        // SAFETY: plain syscall with a valid C string; the fd is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a fresh descriptor we own.
        let m = unsafe { File::from_raw_fd(fd) };
        m.set_len(r.size)?;
        copy_range(&f, off, &m, 0, r.size)?;
        r.fd = m.as_raw_fd();
        off += r.size;
        files.push(m);
    }
    Ok((rec, files))
}

/// Copy `len` bytes between files at the given offsets, skipping holes in
/// the source (guest memory is mostly untouched), with positional I/O.
fn copy_range(src: &File, so: u64, dst: &File, d_off: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we hold; only the return value is used.
        let data = unsafe { libc::lseek(src.as_raw_fd(), (so + pos) as i64, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: nothing but holes to the end.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                return Ok(());
            }
        } else {
            pos = (data as u64).saturating_sub(so).max(pos);
        }
        if pos >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), (so + pos) as i64, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { ((hole as u64).saturating_sub(so)).min(len) };
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], so + pos)?;
            dst.write_all_at(&buf[..n], d_off + pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}
