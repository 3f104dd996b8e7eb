//! COM1: a 16550 UART (vm-superio) with output to any writer and input
//! pushed in by the VMM.

use crate::Interrupt;
use crate::bus::{BusDevice, DeviceAction};
use crate::serial_tx::{LedgerWriter, TxLedger, TxState};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// The transmit holding register's offset, and the divisor-latch bit.
const THR: u64 = 0;
const LCR_DLAB: u8 = 0x80;

pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger();
        Ok(())
    }
}

type Uart = vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    /// The registers as the last completed access left them, with their
    /// checksum. Each access checks the live UART against this copy first:
    /// a difference means something other than the UART's own code changed
    /// it (a wild write, a bit flip, injected corruption). That is a fault:
    /// microreset goes back to this copy and the access is retried.
    good: SerialState,
    seal: u64,
    /// Transmitted bytes: exactly-once across microreset and recovery.
    ledger: Arc<TxLedger>,
    /// The next write retries one that failed (microreset): the ledger says
    /// whether its byte went out (a crash's replay says so itself).
    retry: bool,
    /// `good`, published for the crash path, which cannot take the lock a
    /// dead thread may hold.
    published: Arc<Mutex<SerialState>>,
}

/// Versioned, serializable UART state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Hash)]
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
    /// Version 2: the transmit ledger (not part of the register check).
    pub tx: TxState,
}

const VERSION: u32 = 2;

impl Serial {
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        let ledger = TxLedger::new();
        let w = LedgerWriter::new(ledger.clone(), out);
        Self::sealed(vm_superio::Serial::new(IrqTrigger(irq), Box::new(w)), ledger, false)
    }

    fn sealed(uart: Uart, ledger: Arc<TxLedger>, retry: bool) -> Self {
        let mut s = Serial {
            uart,
            good: SerialState::default(),
            seal: 0,
            ledger,
            retry,
            published: Arc::new(Mutex::new(SerialState::default())),
        };
        s.commit();
        s
    }

    fn commit(&mut self) {
        // Most accesses (a byte out) leave the registers as they were: hash
        // (and publish) only what changed.
        let now = self.regs();
        if now != self.good || self.seal == 0 {
            self.seal = checksum(&now);
            *self.published.lock().unwrap_or_else(|p| p.into_inner()) = now.clone();
            self.good = now;
        }
    }

    /// Panics (inside the bus's contained region) if the registers changed
    /// since the last access.
    fn check(&self) {
        let now = self.regs();
        if now != self.good {
            panic!(
                "UART state corrupted outside the device model ({}): checksum mismatch",
                first_difference(&self.good, &now)
            );
        }
    }

    /// Replace the live UART with one built from `st`, keeping its output and
    /// interrupt line.
    fn rebuild(&mut self, st: &SerialState) -> Result<(), String> {
        let irq = self.uart.interrupt_evt().0.clone();
        let old = std::mem::replace(
            &mut self.uart,
            vm_superio::Serial::new(IrqTrigger(irq.clone()), Box::new(std::io::sink())),
        );
        self.uart = vm_superio::Serial::from_state(
            &to_superio(st),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            old.into_writer(),
        )
        .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(())
    }

    /// Rebuild a UART from saved state (registers, pending input, and the
    /// transmit ledger, whose unsent bytes go to `out` first).
    pub fn restore(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>, s: &SerialState) -> Result<Self, String> {
        if s.version != VERSION {
            return Err(format!("serial state version {} is not supported (expected {VERSION})", s.version));
        }
        let ledger = TxLedger::restore(&s.tx);
        let mut w = LedgerWriter::new(ledger.clone(), out);
        w.drain();
        let out: Box<dyn Write + Send> = Box::new(w);
        let uart = vm_superio::Serial::from_state(&to_superio(s), IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self::sealed(uart, ledger, false))
    }

    /// The transmit ledger, for the crash path.
    pub fn ledger(&self) -> Arc<TxLedger> {
        self.ledger.clone()
    }

    /// The last committed registers, kept current for the crash path.
    pub fn published(&self) -> Arc<Mutex<SerialState>> {
        self.published.clone()
    }

    /// Queue input for the guest; returns how many bytes fit in the FIFO.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        let n = self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0);
        self.commit();
        n
    }

    /// Registers and FIFO, what the integrity check covers.
    fn regs(&self) -> SerialState {
        from_superio(self.uart.state())
    }

    pub fn state(&self) -> SerialState {
        SerialState { tx: self.ledger.state(), ..self.regs() }
    }

    /// Saved state after a crash, without the lock a dead thread may hold:
    /// the published registers and the lock-free ledger.
    /// `published` may be held by the dead thread too: it is only tried,
    /// and power-on registers stand in for it then.
    pub fn state_after_crash(published: &Mutex<SerialState>, ledger: &TxLedger) -> SerialState {
        let deadline = std::time::Instant::now() + std::time::Duration::from_micros(500);
        let regs = loop {
            match published.try_lock() {
                Ok(g) => break g.clone(),
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().clone(),
                Err(_) if std::time::Instant::now() < deadline => std::thread::yield_now(),
                Err(_) => break SerialState::default(),
            }
        };
        SerialState { tx: ledger.state(), ..regs }
    }
}

impl BusDevice for Serial {
    /// Back to the registers as the last completed access left them (their
    /// checksum proves the copy itself intact; if not, power-on state). A
    /// byte being transmitted when the handler failed may be lost.
    fn microreset(&mut self) {
        let good = if checksum(&self.good) == self.seal { self.good.clone() } else { SerialState::default() };
        if self.rebuild(&good).is_ok() {
            self.commit();
        }
        // The access is retried next; the ledger keeps what it transmitted.
        self.retry = true;
    }

    /// Flip the divisor-latch bit of the line control register: unnoticed,
    /// the guest's next bytes would go to the baud-rate divisor, not out.
    fn corrupt(&mut self) -> Option<&'static str> {
        let mut st = self.state();
        st.line_control ^= 0x80;
        self.rebuild(&st).ok().map(|()| "uart.line_control")
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.check();
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first_mut()) {
            *b = self.uart.read(off);
        }
        self.commit();
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        match staunch_fault::hit(&staunch_fault::SERIAL_WRITE) {
            Err(e) => panic!("{e}"),
            Ok(true) => {
                let field = self.corrupt();
                tracing::warn!(?field, "injected corruption");
            }
            Ok(false) => {}
        }
        self.check();
        let retry = std::mem::take(&mut self.retry);
        let transmit = offset == THR && self.good.line_control & LCR_DLAB == 0;
        if transmit && (retry || crate::access::replaying()) && self.ledger.has_accepted(crate::access::stamp()) {
            // The failed or interrupted attempt of this very access had
            // its byte accepted: sending it again would double it. The UART
            // still does the write (its registers and its interrupt are what
            // the guest expects); the writer lets the byte pass.
            self.ledger.swallow_next();
        }
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first()) {
            // An output error (closed pipe) must not stop the guest.
            let _ = self.uart.write(off, *b);
        }
        self.commit();
        DeviceAction::Continue
    }
}

impl Default for SerialState {
    /// A UART at power-on (vm-superio's reset values).
    fn default() -> Self {
        from_superio(vm_superio::serial::SerialState::default())
    }
}

fn from_superio(s: vm_superio::serial::SerialState) -> SerialState {
    SerialState {
        version: VERSION,
        divisor_low: s.baud_divisor_low,
        divisor_high: s.baud_divisor_high,
        interrupt_enable: s.interrupt_enable,
        interrupt_identification: s.interrupt_identification,
        line_control: s.line_control,
        line_status: s.line_status,
        modem_control: s.modem_control,
        modem_status: s.modem_status,
        scratch: s.scratch,
        rx_fifo: s.in_buffer,
        tx: TxState::default(),
    }
}

fn to_superio(s: &SerialState) -> vm_superio::serial::SerialState {
    vm_superio::serial::SerialState {
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
    }
}

fn checksum(s: &SerialState) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn first_difference(a: &SerialState, b: &SerialState) -> &'static str {
    let regs = [
        (a.divisor_low != b.divisor_low, "divisor_low"),
        (a.divisor_high != b.divisor_high, "divisor_high"),
        (a.interrupt_enable != b.interrupt_enable, "interrupt_enable"),
        (a.interrupt_identification != b.interrupt_identification, "interrupt_identification"),
        (a.line_control != b.line_control, "line_control"),
        (a.line_status != b.line_status, "line_status"),
        (a.modem_control != b.modem_control, "modem_control"),
        (a.modem_status != b.modem_status, "modem_status"),
        (a.scratch != b.scratch, "scratch"),
    ];
    regs.iter().find(|(d, _)| *d).map_or("rx_fifo", |(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial_tx::tests::Out;
    use std::sync::Mutex;
    struct NoIrq;
    impl Interrupt for NoIrq {
        fn trigger(&self) {}
    }

    /// A corrupted register is caught at the next access, the bus's
    /// microreset restores the committed copy, and the retried write goes
    /// out: the guest's byte is not lost to the divisor latch.
    #[test]
    fn corruption_is_detected_and_repaired() {
        let out = Out::default();
        let dev = Mutex::new(Serial::new(Arc::new(NoIrq), Box::new(out.clone())));
        let write = |b: u8| {
            crate::bus::contained("serial", &dev, None, None, |s| {
                s.write(0, &[b]);
            })
        };
        write(b'a');
        assert_eq!(dev.lock().unwrap().corrupt(), Some("uart.line_control"));
        assert!(write(b'b').is_some());
        write(b'c');
        assert_eq!(&*out.0.lock().unwrap(), b"abc");
        assert_eq!(dev.lock().unwrap().state().line_control & 0x80, 0);
    }

    /// A sink that fails (panics) once, after the byte was accepted.
    struct FlakySink(Out, bool);
    impl Write for FlakySink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if std::mem::take(&mut self.1) {
                panic!("sink failed");
            }
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A fault after the byte was accepted: microreset retries the access,
    /// which must not send the byte again, and the byte still goes out.
    #[test]
    fn microreset_after_transmit_neither_loses_nor_doubles() {
        let out = Out::default();
        let dev = Mutex::new(Serial::new(Arc::new(NoIrq), Box::new(FlakySink(out.clone(), true))));
        let write = |b: u8| {
            crate::access::set_stamp(b as u64); // one access per byte
            crate::bus::contained("serial", &dev, None, None, |s| s.write(0, &[b]))
        };
        assert!(write(b'a').is_some());
        assert!(write(b'b').is_some());
        assert_eq!(&*out.0.lock().unwrap(), b"ab");
        let st = dev.lock().unwrap().state();
        assert_eq!((st.tx.accepted, st.tx.sunk), (2, 2));
    }

    #[test]
    fn a_corrupted_committed_copy_falls_back_to_power_on() {
        let mut s = Serial::new(Arc::new(NoIrq), Box::new(std::io::sink()));
        s.write(3, &[0x03]); // 8N1
        s.good.scratch ^= 1; // the copy itself is hit: its seal no longer matches
        s.microreset();
        assert_eq!(s.state(), SerialState::default());
    }
}
