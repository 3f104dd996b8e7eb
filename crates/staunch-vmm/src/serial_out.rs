//! Where the guest's serial output goes, with a timestamp of its first byte
//! (boot-time measurement) and a unix-socket console.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Wraps a writer and notes when the guest first printed.
pub struct Stamped<W> {
    pub(crate) inner: W,
    pub first: Arc<OnceLock<Instant>>,
}

impl<W: Write> Stamped<W> {
    pub fn new(inner: W) -> Self {
        Stamped { inner, first: Arc::new(OnceLock::new()) }
    }
}

impl<W: Write> Write for Stamped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            self.first.get_or_init(Instant::now);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stdout, flushed per write so lines appear as the guest prints them.
pub struct StdoutNow;
impl Write for StdoutNow {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = std::io::stdout().lock();
        o.write_all(buf)?;
        o.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Where console input goes.
type Input = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A listening unix socket; the latest client gets output and sends input.
/// Both descriptors can be handed to a successor image, so an attached
/// console stays attached across an upgrade or a crash re-exec.
#[derive(Clone)]
pub struct UnixConsole {
    client: Arc<Mutex<Option<UnixStream>>>,
    listener: Arc<UnixListener>,
}

impl UnixConsole {
    /// Bind `path` and accept clients in the background; `input` receives
    /// what clients send.
    pub fn bind(path: &Path, input: impl Fn(&[u8]) + Send + Sync + 'static) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        Self::adopt(UnixListener::bind(path)?, None, input)
    }

    /// Serve an inherited listener and, if one was attached, its client.
    pub fn adopt(
        listener: UnixListener,
        client: Option<UnixStream>,
        input: impl Fn(&[u8]) + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let me = UnixConsole { client: Arc::new(Mutex::new(None)), listener: Arc::new(listener.try_clone()?) };
        let slot = me.client.clone();
        let input: Input = Arc::new(input);
        let attach = move |stream: UnixStream, slot: &Mutex<Option<UnixStream>>, input: &Input| {
            let Ok(reader) = stream.try_clone() else { return };
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
            let input = input.clone();
            let _ = std::thread::Builder::new().name("serial-in".into()).spawn(move || pump(reader, &*input));
        };
        if let Some(c) = client {
            attach(c, &slot, &input);
        }
        std::thread::Builder::new().name("serial-accept".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                attach(stream, &slot, &input);
            }
        })?;
        Ok(me)
    }

    /// Duplicates of the listener and the attached client, for a successor.
    pub fn handover(&self) -> std::io::Result<(UnixListener, Option<UnixStream>)> {
        let client = self.client.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|c| c.try_clone().ok());
        Ok((self.listener.try_clone()?, client))
    }
}

impl Write for UnixConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = c.as_mut()
            && s.write_all(buf).is_err()
        {
            *c = None; // client went away: drop output until the next one
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copy a byte stream into `input` until EOF.
pub fn pump(mut r: impl Read, input: &(dyn Fn(&[u8]) + Send + Sync)) {
    let mut buf = [0u8; 256];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        input(&buf[..n]);
    }
}
