//! A session in and out of a snapshot (see `handoff`): the serving process
//! describes its session after every control message; its spare maps what
//! the snapshots name as they arrive and, when the serving process dies,
//! rebuilds the session and starts the rings that were running.

use super::{Device, Options, Session, Vring};
use crate::handoff::{Snapshot, VringSnap};
use crate::inflight::Region;
use crate::memory::Memory;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserMemoryRegion;

impl Session {
    /// This session and duplicates of its descriptors, in [`Snapshot`]'s
    /// order, with `conn` first.
    pub(crate) fn snapshot(&self, conn: &UnixStream) -> std::io::Result<(Snapshot, Vec<File>)> {
        let mut files = vec![File::from(OwnedFd::from(conn.try_clone()?))];
        let mem = match &self.mem_src {
            Some((m, fs)) => {
                for f in fs {
                    files.push(f.try_clone()?);
                }
                Some(m.clone())
            }
            None => None,
        };
        let inflight = match (&self.inflight_src, &self.inflight) {
            (Some(s), Some(r)) => {
                files.push(r.file().try_clone()?);
                Some(*s)
            }
            _ => None,
        };
        let mut vrings = Vec::with_capacity(self.vrings.len());
        for v in &self.vrings {
            for f in [&v.kick, &v.call].into_iter().flatten() {
                files.push(f.try_clone()?);
            }
            vrings.push(VringSnap {
                size: v.size,
                addrs: v.addrs,
                base: v.base,
                kick: v.kick.is_some(),
                call: v.call.is_some(),
                disabled: v.disabled,
                running: v.worker.is_some(),
            });
        }
        let snapshot = Snapshot {
            version: crate::handoff::VERSION,
            acked: self.acked,
            protocol: self.protocol,
            owner: self.owner,
            mem,
            inflight,
            vrings,
        };
        Ok((snapshot, files))
    }
}

/// A spare's copy of the serving process's session, mapped ahead of need.
pub(crate) struct Standby {
    device: Arc<dyn Device>,
    opts: Options,
    mem: Option<(u64, Memory)>,
    inflight: Option<(u64, Arc<Region>)>,
}

fn dup(f: &File) -> Result<File, String> {
    f.try_clone().map_err(|e| format!("duplicate a descriptor: {e}"))
}

impl Standby {
    pub(crate) fn new(device: Arc<dyn Device>, opts: Options) -> Standby {
        Standby { device, opts, mem: None, inflight: None }
    }

    /// Map the memory table and inflight region `s` names, unless they are
    /// the ones already mapped.
    pub(crate) fn apply(&mut self, s: &Snapshot, files: &[File]) {
        if let Err(e) = self.map(s, files) {
            tracing::warn!(error = %e, "snapshot from the serving process");
        }
    }

    fn map(&mut self, s: &Snapshot, files: &[File]) -> Result<(), String> {
        let mut at = 1;
        if let Some(m) = &s.mem {
            let n = m.regions.len();
            let fs = files.get(at..at + n).ok_or("too few descriptors")?;
            if self.mem.as_ref().map(|x| x.0) != Some(m.id) {
                let regions: Vec<VhostUserMemoryRegion> =
                    m.regions.iter().map(|r| VhostUserMemoryRegion::new(r.gpa, r.size, r.user, r.offset)).collect();
                let fs = fs.iter().map(dup).collect::<Result<Vec<_>, _>>()?;
                self.mem = Some((m.id, Memory::map(&regions, fs).map_err(|e| e.to_string())?));
            }
            at += n;
        }
        if let Some(i) = &s.inflight {
            let f = files.get(at).ok_or("too few descriptors")?;
            if self.inflight.as_ref().map(|x| x.0) != Some(i.id) {
                let r = Region::map(dup(f)?, i.size, i.offset, i.queues, i.queue_size).map_err(|e| e.to_string())?;
                self.inflight = Some((i.id, Arc::new(r)));
            }
        }
        Ok(())
    }

    /// The session `s` describes, its running rings started again (each
    /// from the inflight region) and signalled once; the connection too.
    pub(crate) fn resume(mut self, s: Snapshot, files: Vec<File>) -> Result<(UnixStream, Session), String> {
        self.map(&s, &files)?;
        let inflight = s.inflight.and(self.inflight.as_ref().map(|x| x.1.clone()));
        let mut files = files.into_iter();
        let conn = crate::handoff::connection(files.next().ok_or("no connection")?);
        let mut session = Session::new(self.device.clone(), self.opts.clone());
        if session.vrings.len() < s.vrings.len() {
            return Err("more rings than this device has".into());
        }
        session.acked = s.acked;
        session.protocol = s.protocol;
        session.owner = s.owner;
        if let Some(m) = &s.mem {
            let fs: Vec<File> = files.by_ref().take(m.regions.len()).collect();
            session.mem_src = Some((m.clone(), fs));
            session.mem = self.mem.as_ref().map(|x| x.1.clone());
        }
        if let Some(i) = s.inflight {
            files.next();
            session.inflight_src = Some(i);
            session.inflight = inflight.clone();
        }
        for (v, snap) in session.vrings.iter_mut().zip(&s.vrings) {
            *v = Vring {
                size: snap.size,
                addrs: snap.addrs,
                base: snap.base,
                kick: if snap.kick { files.next() } else { None },
                call: if snap.call { files.next() } else { None },
                disabled: snap.disabled,
                worker: None,
            };
        }
        for (i, v) in s.vrings.iter().enumerate() {
            if !v.running {
                continue;
            }
            if inflight.as_ref().and_then(|r| r.queue(i)).is_none() {
                // No inflight region (QEMU keeps none for net): the ring
                // goes on from the guest's used index. Our workers complete
                // in order, so everything past it was not completed: it is
                // served again (a transmit sent again, a receive buffer
                // filled with the next frame, a block request repeated).
                session.vrings[i].base = guest_used(&session, v).map_err(|e| format!("ring {i}: {e}"))?;
            }
            session.maybe_start(i).map_err(|e| format!("ring {i}: {e}"))?;
            // A completion the dead process published may not have been
            // signalled: one interrupt, spurious at worst.
            if let Some(c) = &session.vrings[i].call {
                let one = 1u64.to_ne_bytes();
                let _ = std::io::Write::write(&mut &*c, &one);
            }
        }
        Ok((conn, session))
    }
}

/// The used index the guest was last told, for ring `v` of `session`.
fn guest_used(session: &Session, v: &VringSnap) -> Result<u16, String> {
    use vm_memory::Bytes;
    let mem = session.mem.as_ref().ok_or("no memory table")?;
    let (_, _, used) = v.addrs.ok_or("no ring addresses")?;
    let at = mem.translate(used, 4).ok_or("used ring outside guest memory")?;
    let idx: u16 = mem.mem.read_obj(vm_memory::GuestAddress(at.0 + 2)).map_err(|e| e.to_string())?;
    Ok(u16::from_le(idx))
}

/// The `vhost` crate's request handler keeps what was negotiated (the
/// acked features, the protocol features, whether replies are acked) to
/// itself. A resumed connection's handler learns it the way the first one
/// did: it is primed with the negotiation messages (`acked`, `protocol`)
/// on a private socket pair, whose end it reads is then replaced (dup2) by
/// the connection. A fresh connection's is primed with PROTOCOL_FEATURES
/// acked: QEMU's vhost-user-net enables its rings before it sets the
/// features, which the handler would refuse (libvhost-user accepts it).
pub(crate) fn handler(
    conn: UnixStream,
    session: &Arc<std::sync::Mutex<Session>>,
    acked: u64,
    protocol: u64,
) -> std::io::Result<vhost::vhost_user::BackendReqHandler<std::sync::Mutex<Session>>> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (ours, mut theirs) = UnixStream::pair()?;
    let slot = ours.as_raw_fd();
    let mut handler = vhost::vhost_user::BackendReqHandler::from_stream(ours, session.clone());
    // request codes of the specification; flags: version 1
    let msg = |code: u32, body: Option<u64>| {
        let mut m = Vec::with_capacity(20);
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(if body.is_some() { 8u32 } else { 0 }).to_le_bytes());
        if let Some(v) = body {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m
    };
    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    let prime = [
        msg(GET_FEATURES, None),
        msg(SET_FEATURES, Some(acked)),
        msg(GET_PROTOCOL_FEATURES, None),
        msg(SET_PROTOCOL_FEATURES, Some(protocol)),
    ];
    for m in prime {
        theirs.write_all(&m)?;
        handler.handle_request().map_err(|e| std::io::Error::other(format!("priming the request handler: {e}")))?;
    }
    // SAFETY: `slot` is the handler's own socket (we created it above and
    // it holds it); dup2 atomically makes that number refer to the
    // connection instead. The handler keeps no buffered bytes between
    // messages, so it next reads the connection's next message.
    if unsafe { libc::dup2(conn.as_raw_fd(), slot) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::VERSION;

    fn standby() -> Standby {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let disk = std::env::temp_dir().join(format!("staunch-resume-{}-{n}.img", std::process::id()));
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let dev = crate::blk::BlkDevice::open(&disk, false, 1).unwrap();
        let _ = std::fs::remove_file(&disk);
        Standby::new(Arc::new(dev), Options::default())
    }

    fn snapshot(vrings: Vec<VringSnap>) -> Snapshot {
        Snapshot { version: VERSION, acked: 0, protocol: 0, owner: true, mem: None, inflight: None, vrings }
    }

    fn files(n: usize) -> Vec<File> {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut v = vec![File::from(OwnedFd::from(a))];
        v.extend((1..n).map(|_| File::open("/dev/null").unwrap()));
        v
    }

    #[test]
    fn a_running_ring_without_inflight_or_memory_is_not_resumed() {
        let snap = snapshot(vec![VringSnap { size: 128, kick: true, call: true, running: true, ..Default::default() }]);
        let n = snap.fds();
        let e = standby().resume(snap, files(n)).err().expect("refused");
        assert!(e.contains("no memory table"), "{e}");
    }

    #[test]
    fn an_idle_session_resumes_with_its_connection() {
        let snap = Snapshot { acked: 1 << 32, ..snapshot(vec![VringSnap { size: 128, ..Default::default() }]) };
        let (_conn, s) = standby().resume(snap, files(1)).expect("resumed");
        assert_eq!(s.acked, 1 << 32);
        assert!(s.vrings[0].worker.is_none());
    }

    #[test]
    fn a_snapshot_with_more_rings_than_the_device_is_refused() {
        let snap = snapshot(vec![VringSnap::default(); 40]);
        assert!(standby().resume(snap, files(1)).is_err());
    }
}
