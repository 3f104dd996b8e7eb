//! A synchronous XenStore client over the unix socket, for the other
//! components and the tests. It survives the store's restarts and
//! failovers: on a broken connection it reconnects with backoff (every
//! 1-2 ms for the first 250 ms, a failover's time, then doubling to 100 ms, for up to `reconnect_for`), registers its watches
//! again (each fires once on registration, so nothing changed in the gap
//! goes unnoticed), and retries idempotent requests. A request inside a
//! transaction is not retried: the store aborted that transaction, so the
//! caller gets `EAGAIN` and runs it again, as after a conflict. Watch events
//! that arrive while a reply is awaited are queued for
//! [`Client::next_event`].

use crate::wire::{self, Op, ReadError};
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Client {
    path: std::path::PathBuf,
    stream: Option<UnixStream>,
    next_req: u32,
    events: VecDeque<(String, String)>,
    /// Registered watches (path, token), to register again after a reconnect.
    watches: Vec<(String, String)>,
    /// How long to keep trying to reconnect before giving up.
    pub reconnect_for: Duration,
    /// Reconnections so far.
    pub reconnects: u64,
}

/// A request's outcome: the reply's payload, or XenStore's error name.
pub type Answer = Result<Vec<u8>, String>;

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        Ok(Client {
            path: path.to_path_buf(),
            stream: Some(UnixStream::connect(path)?),
            next_req: 1,
            events: VecDeque::new(),
            watches: Vec::new(),
            reconnect_for: Duration::from_secs(5),
            reconnects: 0,
        })
    }

    fn stream(&mut self) -> std::io::Result<&mut UnixStream> {
        self.stream.as_mut().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "not connected"))
    }

    /// Connect again, with backoff, and restore the watches.
    fn reconnect(&mut self) -> std::io::Result<()> {
        let t = std::time::Instant::now();
        let mut wait = Duration::from_millis(1);
        loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => {
                    self.stream = Some(s);
                    self.reconnects += 1;
                    for (path, token) in self.watches.clone() {
                        if let Err(e) = self.once(Op::Watch, 0, &nul(&[&path, &token]))? {
                            tracing::warn!(path, token, "watch not restored after reconnect: {e}");
                        }
                    }
                    return Ok(());
                }
                Err(e) if t.elapsed() >= self.reconnect_for => return Err(e),
                Err(_) => {
                    std::thread::sleep(wait);
                    // A standby takes over within milliseconds: poll
                    // closely at first, then back off.
                    let cap = if t.elapsed() < Duration::from_millis(250) { 2 } else { 100 };
                    wait = (wait * 2).min(Duration::from_millis(cap));
                }
            }
        }
    }

    /// Send one request and wait for its answer, reconnecting as needed.
    pub fn request(&mut self, op: Op, tx: u32, payload: &[u8]) -> std::io::Result<Answer> {
        let idempotent = tx == 0
            && matches!(
                op,
                Op::Read
                    | Op::Directory
                    | Op::DirectoryPart
                    | Op::GetPerms
                    | Op::Write
                    | Op::Mkdir
                    | Op::Rm
                    | Op::SetPerms
                    | Op::Watch
                    | Op::Unwatch
                    | Op::GetDomainPath
                    | Op::IsDomainIntroduced
            );
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(1);
        loop {
            let fresh = self.stream.is_none();
            if fresh {
                self.reconnect()?;
            }
            match self.once(op, tx, payload) {
                Ok(a) => {
                    self.remember(op, payload, &a);
                    return Ok(a);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(e);
                }
                Err(e) => {
                    self.stream = None;
                    if tx != 0 || op == Op::TransactionEnd {
                        // The store aborted the transaction with the connection.
                        return Ok(Err("EAGAIN".into()));
                    }
                    // A store that takes the connection but drops it (full,
                    // or dying again) is retried with backoff, not forever.
                    if !idempotent || started.elapsed() >= self.reconnect_for {
                        return Err(e);
                    }
                    if fresh {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    fn remember(&mut self, op: Op, payload: &[u8], a: &Answer) {
        let Ok(v) = wire::strings(payload) else { return };
        let [path, token] = v.as_slice() else { return };
        let w = (path.to_string(), token.to_string());
        match (op, a) {
            (Op::Watch, Ok(_)) if !self.watches.contains(&w) => self.watches.push(w),
            (Op::Unwatch, Ok(_)) => self.watches.retain(|x| *x != w),
            _ => {}
        }
    }

    fn once(&mut self, op: Op, tx: u32, payload: &[u8]) -> std::io::Result<Answer> {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        let msg = wire::encode(op as u32, req, tx, payload);
        std::io::Write::write_all(self.stream()?, &msg)?;
        loop {
            let m = self.read()?;
            if m.header.ty == Op::WatchEvent as u32 {
                self.queue(&m.payload);
                continue;
            }
            if m.header.req_id != req {
                continue;
            }
            return Ok(if m.header.ty == Op::Error as u32 {
                Err(String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap_or(&m.payload)).into_owned())
            } else {
                Ok(m.payload)
            });
        }
    }

    fn read(&mut self) -> std::io::Result<wire::Msg> {
        wire::read_msg(self.stream()?).map_err(|e| match e {
            ReadError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, other.to_string()),
        })
    }

    fn queue(&mut self, payload: &[u8]) {
        if let Ok(v) = wire::strings(payload)
            && let [path, token] = v.as_slice()
        {
            self.events.push_back((path.to_string(), token.to_string()));
        }
    }

    /// The next watch event (path, token), waiting up to `within`.
    pub fn next_event(&mut self, within: Duration) -> std::io::Result<Option<(String, String)>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if self.stream.is_none() {
                self.reconnect()?;
                continue;
            }
            self.stream()?.set_read_timeout(Some(left))?;
            let r = self.read();
            if let Some(s) = &self.stream {
                s.set_read_timeout(None)?;
            }
            match r {
                Ok(m) if m.header.ty == Op::WatchEvent as u32 => self.queue(&m.payload),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                // The store went away: reconnect; the watches fire again.
                Err(_) => self.stream = None,
            }
        }
    }

    pub fn read_value(&mut self, tx: u32, path: &str) -> std::io::Result<Answer> {
        self.request(Op::Read, tx, &nul(&[path]))
    }

    pub fn write_value(&mut self, tx: u32, path: &str, value: &[u8]) -> std::io::Result<Answer> {
        let mut p = nul(&[path]);
        p.extend_from_slice(value);
        self.request(Op::Write, tx, &p)
    }

    pub fn transaction_start(&mut self) -> std::io::Result<Result<u32, String>> {
        Ok(self
            .request(Op::TransactionStart, 0, b"\0")?
            .map(|b| String::from_utf8_lossy(b.strip_suffix(&[0]).unwrap_or(&b)).parse().unwrap_or(0)))
    }

    pub fn transaction_end(&mut self, tx: u32, commit: bool) -> std::io::Result<Answer> {
        self.request(Op::TransactionEnd, tx, if commit { b"T\0" } else { b"F\0" })
    }
}

/// NUL-terminated strings, concatenated: most requests' payload.
pub fn nul(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}
