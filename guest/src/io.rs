//! Port I/O, MMIO and the polling 16550 driver.

use core::arch::asm;
use core::fmt;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass device register addresses from the command line;
    // they are identity mapped.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

const COM1: u16 = 0x3f8;

pub fn serial_init() {
    outb(COM1 + 1, 0x00); // no interrupts: we poll
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared
    outb(COM1 + 4, 0x0b);
}

pub fn putc(c: u8) {
    // Ticks between bytes: a pause while the guest prints shows too.
    crate::clock::tick();
    while inb(COM1 + 5) & 0x20 == 0 {
        crate::clock::tick();
        core::hint::spin_loop();
    }
    outb(COM1, c);
}

/// A byte from the serial port if one is waiting.
pub fn getc() -> Option<u8> {
    (inb(COM1 + 5) & 1 != 0).then(|| inb(COM1))
}

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                putc(b'\r');
            }
            putc(b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::io::Serial, "STAUNCH ");
        let _ = writeln!($crate::io::Serial, $($arg)*);
    }};
}

/// Power off through the exit port; spins if nothing is listening.
pub fn power_off(code: u8) -> ! {
    outb(staunch_guestproto::POWER_PORT, code);
    loop {
        core::hint::spin_loop();
    }
}
