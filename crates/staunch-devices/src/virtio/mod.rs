//! virtio devices over the virtio-mmio (version 2) transport.

pub mod blk;
pub mod mmio;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport. Queue processing runs on the notify
/// exit; the device treats every descriptor as hostile.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked_features: u64);
    /// DRIVER_OK, with the queues as the driver configured them (a device
    /// served elsewhere hands them on; the default only activates).
    fn start(&mut self, acked_features: u64, _queues: &[Queue]) {
        self.activate(acked_features)
    }
    /// Completions are signalled straight to the guest's interrupt line by
    /// someone else (a vhost-user backend through the irqfd), so the
    /// transport cannot know why it fired: its interrupt status then always
    /// reports used buffers, and a driver checks its rings on every
    /// interrupt (a spurious check costs nothing).
    fn signals_directly(&self) -> bool {
        false
    }
    /// Process available buffers of queue `index`. Returns whether any buffer
    /// was used (so the transport should interrupt), or an error that makes
    /// the device need a reset.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String>;
    fn reset(&mut self);
}
