//! `staunch blk`: virtio-blk served over vhost-user. The request handling
//! is the VMM's own virtio-blk model (one code path for both), here run in
//! its own restartable process.

use crate::backend::{Device, QueueHandler};
use staunch_devices::virtio::VirtioDevice;
use staunch_devices::virtio::blk::Block;
use std::path::Path;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

const F_MQ: u64 = 1 << 12;
const QUEUE_SIZE: u16 = 256;

pub use staunch_devices::virtio::blk::BlkError;

pub struct BlkDevice {
    disk: Block,
    queues: u16,
}

impl BlkDevice {
    /// Open the disk now, so a missing, misshapen or read-only file is the
    /// error seen at start.
    pub fn open(path: &Path, read_only: bool, queues: u16) -> Result<BlkDevice, BlkError> {
        let disk = Block::open(path, read_only)?;
        Ok(BlkDevice { disk, queues: queues.clamp(1, 16) })
    }
}

struct Handler(Block);

impl QueueHandler for Handler {
    fn serve(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        self.0.serve(descs, mem)
    }
}

impl Device for BlkDevice {
    fn name(&self) -> &'static str {
        "blk"
    }
    fn features(&self) -> u64 {
        self.disk.features() | if self.queues > 1 { F_MQ } else { 0 }
    }
    fn config(&self) -> Vec<u8> {
        let mut cfg = vec![0u8; 0x3c];
        self.disk.read_config(0, &mut cfg);
        // num_queues, at offset 34 of virtio_blk_config.
        cfg[34..36].copy_from_slice(&self.queues.to_le_bytes());
        cfg
    }
    fn queues(&self) -> usize {
        self.queues as usize
    }
    fn queue_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn handler(&self, _queue: usize) -> Result<Box<dyn QueueHandler>, String> {
        Ok(Box::new(Handler(self.disk.try_clone().map_err(|e| e.to_string())?)))
    }
}
