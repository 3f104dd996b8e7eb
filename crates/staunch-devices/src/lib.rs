//! Device models and the address-range bus that vCPU exits dispatch into.
//! Nothing here knows about KVM: devices see offsets and bytes, and raise
//! interrupts through [`Interrupt`].

pub mod access;
pub mod bus;
pub mod legacy;
pub mod serial;
pub mod serial_tx;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, DeviceAction, FaultReport, Observer, contained, contained_with};

/// An interrupt line a device can raise (an irqfd in the VMM).
pub trait Interrupt: Send + Sync {
    fn trigger(&self);
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        // A full eventfd counter means the interrupt is already pending.
        let _ = self.write(1);
    }
}
