//! virtio-mmio transport, version 2 (virtio 1.x "modern" register layout).

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::Interrupt;
use crate::bus::{BusDevice, DeviceAction};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5354_4e43; // "STNC"

const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const S_FAILED: u32 = 0x80;

const INT_USED: u32 = 1;
const INT_CONFIG: u32 = 2;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    dev_features_sel: u32,
    drv_features_sel: u32,
    drv_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    observer: Option<crate::Observer>,
    /// Last configuration (queue addresses, features, status) published for
    /// the crash path, which cannot take the device lock if the device's own
    /// thread died holding it. Queue positions there are stale by design:
    /// a crash restore rewinds them to the used index in guest memory.
    shadow: Arc<std::sync::Mutex<MmioState>>,
}

pub const MMIO_STATE_VERSION: u32 = 2;

/// Versioned, serializable transport state (queue positions included).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MmioState {
    pub version: u32,
    pub status: u32,
    /// The feature-word selectors: a driver may be saved between selecting
    /// a word and writing it (found by the fault campaign).
    pub dev_features_sel: u32,
    pub drv_features_sel: u32,
    pub drv_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<dyn Interrupt>) -> Self {
        let queues = device.queue_max_sizes().iter().filter_map(|m| Queue::new(*m).ok()).collect();
        let t = MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            dev_features_sel: 0,
            drv_features_sel: 0,
            drv_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            observer: None,
            // Filled by the publish below, before anyone can read it.
            shadow: Arc::default(),
        };
        t.publish();
        t
    }

    /// The crash-path copy of this transport's configuration.
    pub fn shadow(&self) -> Arc<std::sync::Mutex<MmioState>> {
        self.shadow.clone()
    }

    fn publish(&self) {
        let st = self.state();
        if let Ok(mut s) = self.shadow.lock() {
            *s = st;
        }
    }

    pub fn set_observer(&mut self, o: crate::Observer) {
        self.observer = Some(o);
    }

    /// Serve again what the guest made available but was never completed:
    /// the device's position goes back to the used index in guest memory,
    /// the one thing the guest has been told. Block requests are idempotent
    /// (the same bytes to the same sectors), so serving one twice is safe.
    fn rewind_to_used(&mut self) -> usize {
        let mut rewound = 0;
        for q in &mut self.queues {
            if !q.ready() {
                continue;
            }
            if let Ok(used) = q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire) {
                rewound += q.next_avail().wrapping_sub(used.0) as usize;
                q.set_next_used(used.0);
                q.set_next_avail(used.0);
            }
        }
        rewound
    }

    /// Integrity check before serving a queue: the device's position must lie
    /// between what the guest was told (used) and what it offered (avail).
    fn check_queue(&mut self, index: usize) -> bool {
        if !staunch_fault::recovery_enabled() {
            return false;
        }
        let Some(q) = self.queues.get(index) else { return false };
        let (Ok(used), Ok(avail)) = (
            q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire),
            q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire),
        ) else {
            return false;
        };
        let ahead = q.next_avail().wrapping_sub(used.0);
        let offered = avail.0.wrapping_sub(used.0);
        if q.next_used() != used.0 || ahead > offered {
            let t = std::time::Instant::now();
            let fault = format!(
                "queue {index} state inconsistent: next_avail {} next_used {} guest used {} avail {}",
                q.next_avail(),
                q.next_used(),
                used.0,
                avail.0
            );
            self.rewind_to_used();
            if let Some(o) = &self.observer {
                o(crate::FaultReport { device: "virtio-mmio", fault, recovered: true, latency: t.elapsed() });
            }
            return true;
        }
        false
    }

    pub fn state(&self) -> MmioState {
        MmioState {
            version: MMIO_STATE_VERSION,
            status: self.status,
            dev_features_sel: self.dev_features_sel,
            drv_features_sel: self.drv_features_sel,
            drv_features: self.drv_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    /// Rebuild a transport from saved state. With `replay_in_flight`, buffers
    /// the guest made available but the device had not completed are served
    /// again (the crash path: their completion may have been lost; serving a
    /// block request twice writes the same bytes to the same place).
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn Interrupt>,
        s: &MmioState,
        replay_in_flight: bool,
    ) -> Result<Self, String> {
        if s.version != MMIO_STATE_VERSION {
            return Err(format!("virtio-mmio state version {} is not supported", s.version));
        }
        let mut t = MmioTransport::new(device, mem, irq);
        if s.queues.len() != t.queues.len() {
            return Err(format!("saved {} queues, device has {}", s.queues.len(), t.queues.len()));
        }
        for (q, qs) in t.queues.iter_mut().zip(&s.queues) {
            q.set_size(qs.size);
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = split(qs.desc_table);
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = split(qs.avail_ring);
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(qs.used_ring);
            q.set_used_ring_address(lo, hi);
            q.set_ready(qs.ready);
            let next_used = if replay_in_flight {
                // The used index in guest memory is what the guest was told.
                q.used_idx(&t.mem, std::sync::atomic::Ordering::Acquire).map(|w| w.0).unwrap_or(qs.next_used)
            } else {
                qs.next_used
            };
            q.set_next_used(next_used);
            q.set_next_avail(if replay_in_flight { next_used } else { qs.next_avail });
        }
        t.status = s.status;
        t.dev_features_sel = s.dev_features_sel;
        t.drv_features_sel = s.drv_features_sel;
        t.drv_features = s.drv_features;
        t.queue_sel = s.queue_sel;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        if t.status & S_DRIVER_OK != 0 {
            t.device.start(t.drv_features, &t.queues);
        }
        t.publish();
        Ok(t)
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.drv_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    /// The driver may only configure queues between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & S_FEATURES_OK != 0 && self.status & S_DRIVER_OK == 0
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, never cleared, except by reset.
        if v & self.status != self.status {
            self.status |= S_FAILED;
            return;
        }
        let newly = v & !self.status;
        if newly & S_FEATURES_OK != 0 {
            // Refuse features we never offered, or a driver without VERSION_1.
            let ok = self.drv_features & !self.device_features() == 0 && self.drv_features & VIRTIO_F_VERSION_1 != 0;
            self.status = if ok { v } else { v & !S_FEATURES_OK };
            return;
        }
        if newly & S_DRIVER_OK != 0 {
            let valid =
                self.status & S_FEATURES_OK != 0 && self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                self.status |= S_FAILED;
                return;
            }
            self.device.start(self.drv_features, &self.queues);
        }
        self.status = v;
    }

    /// Offset of QueueNotify, for VMMs that route it to an ioeventfd.
    pub const QUEUE_NOTIFY: u64 = 0x050;

    /// Number of virtqueues (one ioeventfd each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The driver notified queue `index` (through the register or an ioeventfd).
    pub fn notify(&mut self, index: u32) {
        if self.status & S_DRIVER_OK == 0 || self.status & (S_NEEDS_RESET | S_FAILED) != 0 {
            return;
        }
        let i = index as usize;
        self.check_queue(i);
        let mut result = self.serve(i);
        if let Err(e) = &result
            && staunch_fault::recovery_enabled()
        {
            // A failed pass (an injected error, an I/O error of the device
            // model) is retried once from the last completed request.
            let t = std::time::Instant::now();
            self.rewind_to_used();
            let fault = e.clone();
            result = self.serve(i);
            if let Some(o) = &self.observer {
                o(crate::FaultReport { device: "virtio-mmio", fault, recovered: result.is_ok(), latency: t.elapsed() });
            }
        }
        // Check again after serving: a corruption during the pass is caught
        // and its requests served before the guest waits on them.
        if result.is_ok() && self.check_queue(i) {
            result = self.serve(i);
        }
        match result {
            Ok(true) => {
                self.interrupt_status |= INT_USED;
                self.irq.trigger();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "virtio device needs reset");
                self.status |= S_NEEDS_RESET;
                self.interrupt_status |= INT_CONFIG;
                self.config_generation = self.config_generation.wrapping_add(1);
                self.irq.trigger();
            }
        }
    }

    fn serve(&mut self, i: usize) -> Result<bool, String> {
        let Some(q) = self.queues.get_mut(i) else { return Ok(false) };
        if !q.ready() {
            return Ok(false);
        }
        self.device.process_queue(i, q, &self.mem)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device_features();
                match self.dev_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.queue().map(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => self.queue().map(|q| q.ready() as u32).unwrap_or(0),
            0x060 if self.device.signals_directly() => self.interrupt_status | INT_USED,
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        self.write_reg_inner(offset, v);
        // Configuration changes are rare (driver set-up): publish them.
        if !matches!(offset, 0x050 | 0x064) {
            self.publish();
        }
    }

    fn write_reg_inner(&mut self, offset: u64, v: u32) {
        let allowed = self.queue_config_allowed();
        match offset {
            0x014 => self.dev_features_sel = v,
            0x020 if self.status & S_DRIVER != 0 && self.status & S_FEATURES_OK == 0 => match self.drv_features_sel {
                0 => self.drv_features = (self.drv_features & !0xffff_ffff) | v as u64,
                1 => self.drv_features = (self.drv_features & 0xffff_ffff) | ((v as u64) << 32),
                _ => {}
            },
            0x024 => self.drv_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if allowed => {
                if let Some(q) = self.queue() {
                    q.set_size(v.min(u16::MAX as u32) as u16);
                }
            }
            0x044 if allowed => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => self.notify(v),
            // A replayed acknowledgement could clear an interrupt raised
            // since: dropped, it costs at most one spurious interrupt.
            0x064 if crate::access::replaying() => {}
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if allowed => {
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn microreset(&mut self) {
        let n = self.rewind_to_used();
        tracing::warn!(rewound = n, "virtio-mmio microreset: in-flight requests will be served again");
    }

    fn corrupt(&mut self) -> Option<&'static str> {
        let q = self.queues.first_mut()?;
        q.set_next_avail(q.next_avail().wrapping_add(1000));
        Some("queue0.next_avail")
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        }
        DeviceAction::Continue
    }
}
