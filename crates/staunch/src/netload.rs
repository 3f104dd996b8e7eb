//! The load generator of `staunch net-peer --ping` (and of `bench net`
//! and `bench tail`, which run it): numbered requests to the guest's
//! `net-echo` over an AF_PACKET socket, each reply matched to its request
//! and timed.

use anyhow::Result;
use staunch_guestproto::net::{self as proto, Kind, Seen};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

const PACKET_OUTGOING: u8 = 4;
/// A request not answered this long is lost.
const DEADLINE: Duration = Duration::from_secs(1);

/// One frame received on `fd` into `buf` (not one we sent), if any is
/// waiting; its length.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: an all-zero sockaddr_ll is valid; recvfrom fills it.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: a buffer and an address we own, with their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut flen,
            )
        };
        if n <= 0 {
            return None;
        }
        if from.sll_pkttype != PACKET_OUTGOING {
            return Some(n as usize);
        }
    }
}

/// Send one frame on the bound socket; false if it did not go whole.
pub fn send(fd: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: sending from a buffer we own on a bound socket.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
    n == frame.len() as isize
}

/// Wait until `fd` is readable or `d` has passed.
fn wait(fd: &OwnedFd, d: Duration) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts = libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long };
    // SAFETY: one valid pollfd and a timespec we own; no signal mask change.
    unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
}

/// What to send.
pub struct Load {
    /// Requests per second (0: closed loop).
    pub rate: u64,
    pub window: u64,
    pub secs: f64,
    pub frame: usize,
}

/// What came back, latencies in microseconds (host-measured round trips
/// through the guest; a lost request counts as the 1 s deadline).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Results {
    pub sent: u64,
    pub replies: u64,
    pub lost: u64,
    /// A reply after its request was counted lost.
    pub late: u64,
    pub dup: u64,
    pub corrupt: u64,
    pub foreign: u64,
    pub send_errors: u64,
    pub secs: f64,
    /// Replies per second.
    pub per_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ping(fd: &OwnedFd, me: [u8; 6], to: [u8; 6], load: &Load) -> Result<Results> {
    let mut r = Results::default();
    let mut buf = vec![0u8; 65_536];
    let mut frame = vec![0u8; proto::MAX_FRAME];
    // Requests awaiting a reply: seq -> when it was (meant to be) sent.
    let mut waiting: HashMap<u64, Instant> = HashMap::new();
    let mut answered = Seen::default();
    let mut lat: Vec<f64> = Vec::new();
    let t0 = Instant::now();
    let run = Duration::from_secs_f64(load.secs.max(0.0));
    let step = (load.rate > 0).then(|| Duration::from_secs_f64(1.0 / load.rate as f64));
    let mut next_check = t0;
    loop {
        let now = Instant::now();
        let sending = now < t0 + run && !crate::netpeer::stopped();
        if !sending && waiting.is_empty() {
            break;
        }
        if now > t0 + run + DEADLINE * 2 {
            break;
        }
        // Send what is due.
        while sending && !crate::netpeer::stopped() {
            let due = match step {
                Some(s) => t0 + s * r.sent as u32,
                None if (waiting.len() as u64) < load.window.max(1) => now,
                None => break,
            };
            if due > now {
                break;
            }
            let n = proto::build(&mut frame, to, me, Kind::Request, r.sent, load.frame);
            if send(fd, &frame[..n]) {
                waiting.insert(r.sent, due);
            } else {
                r.send_errors += 1;
            }
            r.sent += 1;
        }
        let mut got = false;
        while let Some(n) = recv(fd, &mut buf) {
            got = true;
            let at = Instant::now();
            let f = match proto::parse(&buf[..n]) {
                Ok(f) if f.kind == Kind::Reply && f.seq < r.sent => f,
                Ok(_) | Err(proto::Bad::Foreign) => {
                    r.foreign += 1;
                    continue;
                }
                Err(proto::Bad::Corrupt) => {
                    r.corrupt += 1;
                    continue;
                }
            };
            if !answered.first(f.seq) {
                r.dup += 1;
                continue;
            }
            match waiting.remove(&f.seq) {
                Some(sent) => {
                    lat.push(at.duration_since(sent).as_secs_f64() * 1e6);
                    r.replies += 1;
                }
                None => r.late += 1,
            }
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + Duration::from_millis(10);
            waiting.retain(|_, sent| {
                let keep = now.duration_since(*sent) < DEADLINE;
                if !keep {
                    r.lost += 1;
                }
                keep
            });
        }
        let until = match step {
            Some(s) if sending => (t0 + s * r.sent as u32).saturating_duration_since(now),
            _ => Duration::from_millis(1),
        };
        if !got {
            // Nothing came: sleep until something does or a send is due
            // (a reply just taken may free a closed loop's window: no sleep).
            wait(fd, until.min(Duration::from_millis(1)));
        }
    }
    r.lost += waiting.len() as u64;
    // A request that never got its reply waited at least the deadline: it
    // counts in the percentiles as that (as a client's timeout would), not
    // as nothing.
    lat.extend(std::iter::repeat_n(DEADLINE.as_secs_f64() * 1e6, r.lost as usize));
    r.secs = t0.elapsed().as_secs_f64().min(load.secs.max(1e-9));
    r.per_s = r.replies as f64 / r.secs;
    lat.sort_by(|a, b| a.total_cmp(b));
    if !lat.is_empty() {
        r.mean_us = lat.iter().sum::<f64>() / lat.len() as f64;
    }
    (r.p50_us, r.p95_us, r.p99_us) = (pct(&lat, 0.5), pct(&lat, 0.95), pct(&lat, 0.99));
    r.max_us = lat.last().copied().unwrap_or(0.0);
    Ok(r)
}
