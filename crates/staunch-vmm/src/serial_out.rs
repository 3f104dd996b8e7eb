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

/// A listening unix socket; the latest client gets output and sends input.
#[derive(Clone)]
pub struct UnixConsole {
    client: Arc<Mutex<Option<UnixStream>>>,
}

impl UnixConsole {
    /// Bind `path` and accept clients in the background; `input` receives
    /// what clients send.
    pub fn bind(path: &Path, input: impl Fn(&[u8]) + Send + Sync + 'static) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let me = UnixConsole { client: Arc::new(Mutex::new(None)) };
        let slot = me.client.clone();
        let input = Arc::new(input);
        std::thread::Builder::new().name("serial-accept".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
                let input = input.clone();
                let _ = std::thread::Builder::new().name("serial-in".into()).spawn(move || pump(reader, &*input));
            }
        })?;
        Ok(me)
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
