//! Small PC devices: the i8042 reset line and the power-off port.

use crate::bus::{BusDevice, DeviceAction};
use serde::{Deserialize, Serialize};

/// i8042 keyboard controller, only as far as guests use it to reset the
/// machine (command 0xFE on port 0x64). Ports 0x60..=0x64.
#[derive(Default)]
pub struct I8042 {
    state: I8042State,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct I8042State {
    pub version: u32,
    pub last_command: u8,
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State { version: 1, ..self.state.clone() }
    }

    pub fn restore(s: &I8042State) -> Result<Self, String> {
        if s.version != 1 {
            return Err(format!("i8042 state version {} is not supported", s.version));
        }
        Ok(I8042 { state: s.clone() })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty: no keyboard.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if offset == 4 && data.first() == Some(&0xfe) {
            return DeviceAction::Reset;
        }
        if offset == 4 {
            self.state.last_command = data.first().copied().unwrap_or(0);
        }
        DeviceAction::Continue
    }
}

/// Port of [`PowerPort`].
pub const POWER_PORT: u64 = 0xf4;

/// A one-byte port the guest writes its exit code to, at the address of
/// QEMU's isa-debug-exit (0xf4), so one test image powers off under both.
#[derive(Default)]
pub struct PowerPort;

impl BusDevice for PowerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        match (offset, data.first()) {
            (0, Some(code)) => DeviceAction::PowerOff(*code),
            _ => DeviceAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let mut k = I8042::default();
        k.write(4, &[0xd1]);
        let r = I8042::restore(&k.state()).unwrap();
        assert_eq!(r.state(), k.state());
        assert!(I8042::restore(&I8042State { version: 9, last_command: 0 }).is_err());
    }

    #[test]
    fn reset_and_power() {
        let mut k = I8042::default();
        assert_eq!(k.write(4, &[0xfe]), DeviceAction::Reset);
        assert_eq!(k.write(0, &[0xfe]), DeviceAction::Continue);
        assert_eq!(PowerPort.write(0, &[3]), DeviceAction::PowerOff(3));
        assert_eq!(PowerPort.write(1, &[3]), DeviceAction::Continue);
    }
}
