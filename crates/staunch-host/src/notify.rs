//! systemd's notify protocol (sd_notify(3)): datagrams such as `READY=1`
//! and `WATCHDOG=1` to the unix socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading '@'). Without the variable,
//! nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `$WATCHDOG_USEC`, as systemd recommends, if set for us.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| std::env::var("WATCHDOG_PID").map_or(true, |p| p == std::process::id().to_string()))
            .map(|us| Duration::from_micros(us / 2));
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            use std::os::linux::net::SocketAddrExt;
            let addr = match path.strip_prefix('@') {
                Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        // Children must not inherit the variables and talk to systemd as us.
        // SAFETY: called from the supervisor's main thread before it starts
        // any other thread.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        Notifier { sock, watchdog_every }
    }

    pub fn send(&self, msg: &str) {
        if let Some((s, addr)) = &self.sock
            && let Err(e) = s.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!("sd_notify {msg:?}: {e}");
        }
    }
}
