//! An address-range bus (one for port I/O, one for MMIO), and the first rung
//! of recovery: a device whose handler panics (or reports an injected error)
//! is microreset to its last consistent state and the access is retried,
//! without leaving the process.

use staunch_fault::Point;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a device asks of the VMM after a register write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    Continue,
    PowerOff(u8),
    Reset,
}

/// A device on a bus: register reads and writes at an offset into its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction;
    /// Go back to a consistent state after a handler failed part way.
    /// The default suits devices whose state is independent registers.
    fn microreset(&mut self) {}
    /// Corrupt one named field (fault injection); returns its name.
    fn corrupt(&mut self) -> Option<&'static str> {
        None
    }
}

/// A contained fault and what became of it.
#[derive(Debug, Clone)]
pub struct FaultReport {
    pub device: &'static str,
    pub fault: String,
    pub recovered: bool,
    pub latency: Duration,
}

/// Who hears about microresets (the VMM turns them into events).
pub type Observer = Arc<dyn Fn(FaultReport) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

type Shared = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    name: &'static str,
    dev: Shared,
}

#[derive(Clone, Default)]
pub struct Bus {
    // Sorted by base; ranges never overlap.
    entries: Vec<Entry>,
    read_point: Option<&'static Point>,
    write_point: Option<&'static Point>,
    observer: Option<Observer>,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Run `f` on the device; on a panic or injected error, microreset it and
/// try once more.
pub fn contained<T: BusDevice + ?Sized, R>(
    name: &'static str,
    dev: &Mutex<T>,
    observer: Option<&Observer>,
    point: Option<&'static Point>,
    f: impl FnMut(&mut T) -> R,
) -> Option<R> {
    contained_with(staunch_fault::recovery_enabled(), name, dev, observer, point, f)
}

/// [`contained`] with recovery switched on or off explicitly (benchmarks
/// compare the two paths in one process).
pub fn contained_with<T: BusDevice + ?Sized, R>(
    recovery: bool,
    name: &'static str,
    dev: &Mutex<T>,
    observer: Option<&Observer>,
    point: Option<&'static Point>,
    mut f: impl FnMut(&mut T) -> R,
) -> Option<R> {
    if !recovery {
        if let Some(p) = point {
            let _ = staunch_fault::hit(p);
        }
        let mut g = dev.lock().unwrap_or_else(|p| p.into_inner());
        return Some(f(&mut *g));
    }
    let _region = staunch_fault::ContainedRegion::enter();
    let mut attempt = |first: bool| {
        catch_unwind(AssertUnwindSafe(|| {
            let mut g = dev.lock().unwrap_or_else(|p| p.into_inner());
            if first && let Some(p) = point {
                match staunch_fault::hit(p) {
                    Err(e) => return Err(e.to_string()),
                    Ok(true) => {
                        let field = g.corrupt();
                        tracing::warn!(device = name, ?field, "injected corruption");
                    }
                    Ok(false) => {}
                }
            }
            Ok(f(&mut *g))
        }))
        .unwrap_or_else(|p| Err(panic_text(&*p)))
    };
    match attempt(true) {
        Ok(r) => Some(r),
        Err(fault) => {
            let t = Instant::now();
            dev.lock().unwrap_or_else(|p| p.into_inner()).microreset();
            dev.clear_poison();
            let r = attempt(false).ok();
            if let Some(o) = observer {
                o(FaultReport { device: name, fault, recovered: r.is_some(), latency: t.elapsed() });
            }
            r
        }
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus whose accesses check these failpoints.
    pub fn with_points(read: &'static Point, write: &'static Point) -> Self {
        Bus { read_point: Some(read), write_point: Some(write), ..Self::default() }
    }

    pub fn set_observer(&mut self, o: Observer) {
        self.observer = Some(o);
    }

    pub fn insert(&mut self, base: u64, len: u64, name: &'static str, dev: Shared) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        if self.entries.iter().any(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, name, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let i = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &self.entries[i];
        (addr - e.base < e.len).then_some((addr - e.base, e))
    }

    /// Read; unclaimed addresses (and a device that cannot be recovered)
    /// read as all ones, like an open bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((off, e)) = self.find(addr) else {
            data.fill(0xff);
            return false;
        };
        let ok = contained(e.name, &*e.dev, self.observer.as_ref(), self.read_point, |d| d.read(off, data)).is_some();
        if !ok {
            data.fill(0xff);
        }
        true
    }

    /// Write; None for an unclaimed address or an unrecoverable device.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<DeviceAction> {
        let (off, e) = self.find(addr)?;
        contained(e.name, &*e.dev, self.observer.as_ref(), self.write_point, |d| d.write(off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
            self.0 = data[0];
            DeviceAction::Continue
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 8, "a", Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x200, 8, "b", Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x104, 8, "c", Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0xfc, 8, "c", Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x108, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x207, &[9]).is_some());
        bus.read(0x200, &mut b);
        assert_eq!(b[0], 9);
        assert!(bus.write(0x1ff, &[9]).is_none());
    }

    /// Panics on its first write after being armed; counts microresets.
    struct Flaky {
        armed: bool,
        value: u8,
        resets: Arc<AtomicUsize>,
    }
    impl BusDevice for Flaky {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> DeviceAction {
            if self.armed {
                self.armed = false;
                self.value = 0xee; // half-done update
                panic!("flaky device");
            }
            self.value = data[0];
            DeviceAction::Continue
        }
        fn microreset(&mut self) {
            self.value = 0;
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn panic_is_contained_reset_and_retried() {
        let resets = Arc::new(AtomicUsize::new(0));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus::new();
        let r = reports.clone();
        bus.set_observer(Arc::new(move |f| r.lock().unwrap().push(f)));
        let dev = Arc::new(Mutex::new(Flaky { armed: true, value: 1, resets: resets.clone() }));
        bus.insert(0x10, 1, "flaky", dev.clone()).unwrap();
        assert_eq!(bus.write(0x10, &[7]), Some(DeviceAction::Continue));
        let mut b = [0u8; 1];
        bus.read(0x10, &mut b);
        assert_eq!(b[0], 7, "write retried after the microreset");
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert!(!dev.is_poisoned(), "poison cleared");
        let reps = reports.lock().unwrap();
        assert_eq!(reps.len(), 1);
        assert!(reps[0].recovered && reps[0].fault.contains("flaky device"));
    }
}
