//! An address-range bus (one for port I/O, one for MMIO).

use std::sync::{Arc, Mutex};

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
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

type Shared = Arc<Mutex<dyn BusDevice>>;

#[derive(Default, Clone)]
pub struct Bus {
    // Sorted by base; ranges never overlap.
    entries: Vec<(u64, u64, Shared)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: Shared) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        if self.entries.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|(b, _, _)| *b < base);
        self.entries.insert(pos, (base, len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Shared)> {
        let i = self.entries.partition_point(|(b, _, _)| *b <= addr).checked_sub(1)?;
        let (b, l, d) = &self.entries[i];
        (addr - b < *l).then_some((addr - b, d))
    }

    /// Read; unclaimed addresses read as all ones, like an open bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                // A poisoned lock means a handler panicked mid-access; the
                // device state is still memory-safe, so keep serving it.
                d.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Option<DeviceAction> {
        let (off, d) = self.find(addr)?;
        Some(d.lock().unwrap_or_else(|p| p.into_inner()).write(off, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        bus.insert(0x100, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x200, 8, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x104, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0xfc, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
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
}
