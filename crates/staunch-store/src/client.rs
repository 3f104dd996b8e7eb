//! A small synchronous XenStore client over the unix socket (used by the
//! other components and the tests). Watch events that arrive while a reply
//! is awaited are queued for [`Client::next_event`].

use crate::wire::{self, Op, ReadError};
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Client {
    stream: UnixStream,
    next_req: u32,
    events: VecDeque<(String, String)>,
}

/// A request's outcome: the reply's payload, or XenStore's error name.
pub type Answer = Result<Vec<u8>, String>;

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        Ok(Client { stream: UnixStream::connect(path)?, next_req: 1, events: VecDeque::new() })
    }

    pub fn request(&mut self, op: Op, tx: u32, payload: &[u8]) -> std::io::Result<Answer> {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        std::io::Write::write_all(&mut self.stream, &wire::encode(op as u32, req, tx, payload))?;
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
        wire::read_msg(&mut self.stream).map_err(|e| match e {
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
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        self.stream.set_read_timeout(Some(within))?;
        let r = self.read();
        self.stream.set_read_timeout(None)?;
        match r {
            Ok(m) if m.header.ty == Op::WatchEvent as u32 => {
                self.queue(&m.payload);
                Ok(self.events.pop_front())
            }
            Ok(_) => Ok(None),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
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
