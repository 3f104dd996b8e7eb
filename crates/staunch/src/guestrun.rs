//! Run the test guest inside this process and watch its report lines as they
//! arrive, each stamped with the time its newline left the UART.

use anyhow::{bail, Result};
use staunch_vmm::{RunningVm, SerialConfig, VmConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Instant;

/// Serial sink that turns bytes into timestamped lines.
struct LineSink {
    buf: Vec<u8>,
    tx: Sender<(Instant, String)>,
}

impl Write for LineSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for b in data {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.buf).trim_end().to_string();
                    let _ = self.tx.send((Instant::now(), line));
                    self.buf.clear();
                }
                _ => self.buf.push(*b),
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct GuestRun {
    pub vm: RunningVm,
    pub started: Instant,
    lines: Receiver<(Instant, String)>,
}

/// Where the project keeps built guest images and downloaded assets.
/// `$STAUNCH_CACHE`, else the checkout's `.cache` when run from
/// `target/<profile>/`, else a directory under the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("STAUNCH_CACHE") {
        return PathBuf::from(p);
    }
    let checkout = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent()?.parent().map(|r| r.join(".cache")))
        .filter(|c| c.is_dir());
    checkout.unwrap_or_else(|| std::env::temp_dir().join("staunch-cache"))
}

pub fn test_guest() -> Result<PathBuf> {
    Ok(staunch_testguest::install(&cache_dir())?)
}

pub fn guest_config(kernel: &Path, cmdline: &str, vcpus: u8, disks: &[PathBuf]) -> VmConfig {
    let mut cfg = VmConfig::new(kernel);
    cfg.cmdline = cmdline.into();
    cfg.vcpus = vcpus;
    cfg.serial = SerialConfig::Null;
    cfg.disks = disks.iter().map(|p| staunch_vmm::DiskConfig { path: p.clone(), read_only: false }).collect();
    cfg
}

impl GuestRun {
    pub fn start(cfg: &VmConfig) -> Result<Self> {
        let (tx, lines) = channel();
        let started = Instant::now();
        let vm = RunningVm::start_with_output(cfg, Some(Box::new(LineSink { buf: Vec::new(), tx })))?;
        Ok(GuestRun { vm, started, lines })
    }

    /// Next line, or None at the deadline.
    pub fn next_line(&self, deadline: Instant) -> Result<Option<(Instant, String)>> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(l) => Ok(Some(l)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("the VM's serial port closed"),
        }
    }
}
