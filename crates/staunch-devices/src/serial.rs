//! COM1: a 16550 UART (vm-superio) with output to any writer and input
//! pushed in by the VMM.

use crate::Interrupt;
use crate::bus::{BusDevice, DeviceAction};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;

pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger();
        Ok(())
    }
}

pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

/// Versioned, serializable UART state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SerialState {
    pub version: u32,
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub rx_fifo: Vec<u8>,
}

impl Serial {
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Serial { uart: vm_superio::Serial::new(IrqTrigger(irq), out) }
    }

    /// Rebuild a UART from saved state (registers and pending input).
    pub fn restore(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>, s: &SerialState) -> Result<Self, String> {
        if s.version != 1 {
            return Err(format!("serial state version {} is not supported", s.version));
        }
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        };
        let uart = vm_superio::Serial::from_state(&st, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Serial { uart })
    }

    /// Queue input for the guest; returns how many bytes fit in the FIFO.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            version: 1,
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer.clone(),
        }
    }
}

impl BusDevice for Serial {
    // Microreset: the default. The UART's state is a set of independent
    // byte registers, each either old or new after a failed write, so the
    // current values are consistent; a byte being transmitted may be lost.

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first_mut()) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if let Err(e) = staunch_fault::hit(&staunch_fault::SERIAL_WRITE) {
            panic!("{e}");
        }
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first()) {
            // An output error (closed pipe) must not stop the guest.
            let _ = self.uart.write(off, *b);
        }
        DeviceAction::Continue
    }
}
