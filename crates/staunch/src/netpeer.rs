//! `staunch net-peer`: the host's end of the test guest's frames, on a
//! real interface (a bridge the tests and the demo create in a network
//! namespace) through an AF_PACKET socket.
//!
//! `--echo` answers every sequence-numbered request (the guest's
//! `net-ping` checks the replies); the host keeps its own count of what
//! arrived, so the guest's counts and the host's can be compared. Counts go
//! to stdout as JSON lines, the last one at SIGTERM or SIGINT; SIGUSR1
//! makes it send stop frames (the guest then drains and reports).
//!
//! `--ping` is the load generator for the guest's `net-echo`: numbered
//! requests, open loop at `--rate` per second (latency counted from each
//! request's scheduled time, so a stall delays the requests behind it and
//! shows in their latency, as TailBench's client does) or closed loop
//! with `--window` in flight; one JSON line of results at the end.

use anyhow::{bail, Context, Result};
use staunch_guestproto::net::{self as proto, Bad, Kind, Seen};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct NetPeerArgs {
    /// The interface to listen and answer on (a bridge, a tap, a veth).
    #[arg(long)]
    iface: String,
    /// Answer every request from the guest (its `net-ping`).
    #[arg(long, conflicts_with = "ping")]
    echo: bool,
    /// Send requests to the guest (its `net-echo`) and time the replies.
    #[arg(long)]
    ping: bool,
    /// The guest's MAC address (default: broadcast).
    #[arg(long)]
    to: Option<String>,
    /// Requests per second, open loop (0: closed loop, `--window` in flight).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 8)]
    window: u64,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Bytes per frame.
    #[arg(long, default_value_t = 128)]
    frame: usize,
    /// Print the counts this often.
    #[arg(long, default_value_t = 1000)]
    report_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);
/// SIGUSR1: tell the guest to stop (its `net-ping` drains and reports).
static TELL_STOP: AtomicBool = AtomicBool::new(false);

/// SIGTERM or SIGINT arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

impl From<&NetPeerArgs> for crate::netload::Load {
    fn from(a: &NetPeerArgs) -> Self {
        crate::netload::Load { rate: a.rate, window: a.window, secs: a.secs, frame: a.frame }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        TELL_STOP.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

/// An AF_PACKET socket bound to `iface` for our frame type, and the
/// interface's MAC address.
pub fn open(iface: &str) -> Result<(OwnedFd, [u8; 6])> {
    if iface.is_empty() || iface.len() > 15 {
        bail!("interface name {iface:?}: 1 to 15 bytes");
    }
    let proto_be = proto::ETHERTYPE.to_be();
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto_be as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket (needs CAP_NET_RAW)");
    }
    // SAFETY: a descriptor we just created and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("interface {iface}"));
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields we use are set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
    sll.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: bind with a sockaddr_ll we own and its size.
    if unsafe { libc::bind(fd.as_raw_fd(), &sll as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bind to {iface}"));
    }
    // struct ifreq: the name, then a sockaddr whose data is the MAC.
    let mut ifr = [0u8; 40];
    ifr[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, ifr.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("MAC address of {iface}"));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&ifr[18..24]);
    Ok((fd, mac))
}

/// What the host saw, per run.
#[derive(Default, serde::Serialize)]
struct Counts {
    requests: u64,
    /// Requests seen for the first time (per sender).
    unique: u64,
    dup: u64,
    replies: u64,
    corrupt: u64,
    foreign: u64,
    send_errors: u64,
    senders: usize,
}

pub fn run(a: NetPeerArgs) -> Result<()> {
    if !a.echo && !a.ping {
        bail!("say what to do: --echo or --ping");
    }
    let (fd, me) = open(&a.iface)?;
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    if a.ping {
        let to = match &a.to {
            Some(m) => staunch_vmm::config::parse_mac(m)?,
            None => proto::BROADCAST,
        };
        let r = crate::netload::ping(&fd, me, to, &crate::netload::Load::from(&a))?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mut c = Counts::default();
    let mut seen: HashMap<[u8; 6], Seen> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let every = Duration::from_millis(a.report_ms.max(1));
    let mut last = Instant::now();
    let mut last_stop = Instant::now();
    let print = |c: &Counts, last: bool| {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        v["final"] = last.into();
        println!("{v}");
    };
    while !stopped() {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, 100) };
        if last.elapsed() >= every {
            print(&c, false);
            last = Instant::now();
        }
        if TELL_STOP.load(Ordering::SeqCst) && last_stop.elapsed() > Duration::from_millis(100) {
            // Again and again: a frame can be lost to a dying backend.
            let mut f = [0u8; proto::HEADER];
            let n = proto::build(&mut f, proto::BROADCAST, me, Kind::Stop, 0, 0);
            crate::netload::send(&fd, &f[..n]);
            last_stop = Instant::now();
        }
        if ready <= 0 {
            continue;
        }
        while let Some(n) = crate::netload::recv(&fd, &mut buf) {
            let frame = &mut buf[..n];
            let f = match proto::parse(frame) {
                Ok(f) if f.kind == Kind::Request => f,
                Ok(_) | Err(Bad::Foreign) => {
                    c.foreign += 1;
                    continue;
                }
                Err(Bad::Corrupt) => {
                    c.corrupt += 1;
                    continue;
                }
            };
            c.requests += 1;
            if seen.entry(f.src).or_default().first(f.seq) {
                c.unique += 1;
            } else {
                c.dup += 1;
            }
            c.senders = seen.len();
            let reply = &mut frame[..f.len];
            proto::answer(reply, me);
            if crate::netload::send(&fd, reply) {
                c.replies += 1;
            } else {
                c.send_errors += 1;
            }
        }
    }
    print(&c, true);
    Ok(())
}
