//! The KVM VM: irqchip, PIT, memory slots, vCPU creation with CPUID.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {err} (is KVM enabled, and may this user open it?)")]
    Open { path: String, err: kvm_ioctls::Error },
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM {what} failed: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error("vCPU count {0} is out of range (1 to {1})")]
    VcpuCount(u8, u8),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    cpuid: CpuId,
}

pub const MAX_VCPUS: u8 = 64;
/// Where KVM's TSS and identity map go (just below 4 GiB, outside RAM).
const TSS_ADDR: usize = 0xfffb_d000;

impl Vm {
    /// Open KVM at `path` (normally /dev/kvm) and build a VM over `ram`.
    pub fn new(path: &str, ram: &GuestRam) -> Result<Self, VmError> {
        let kvm = Kvm::new_with_path(std::ffi::CString::new(path).unwrap_or_default())
            .map_err(|err| VmError::Open { path: path.to_string(), err })?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        let t = std::time::Instant::now();
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "KVM_CREATE_VM");
        fd.set_tss_address(TSS_ADDR).map_err(kvm_err("set TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        for (slot, region) in ram.mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping lives as long as `ram`, which the VMM keeps
            // for the VM's whole life.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
            tracing::debug!(us = t.elapsed().as_micros() as u64, slot, "memory slot registered");
        }
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "supported CPUID read");
        Ok(Vm { kvm, fd, cpuid })
    }

    /// Create vCPU `index` with CPUID that names its APIC id.
    pub fn create_vcpu(&self, index: u8, count: u8) -> Result<VcpuFd, VmError> {
        let vcpu = self.fd.create_vcpu(index as u64).map_err(kvm_err("create vCPU"))?;
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24);
                    e.ebx = (e.ebx & 0xff00_ffff) | ((count as u32) << 16);
                    e.ecx |= 1 << 31; // running under a hypervisor
                }
                0xb | 0x1f => e.edx = index as u32,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        Ok(vcpu)
    }
}

// Used by the region iteration above.
trait AsPtr {
    fn as_ptr(&self) -> *mut u8;
}
impl AsPtr for vm_memory::GuestRegionMmap {
    fn as_ptr(&self) -> *mut u8 {
        self.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap_or(std::ptr::null_mut())
    }
}
