//! Saving and restoring the state KVM holds for a VM and its vCPUs, so a new
//! VM (in this process or a fresh image of it) can continue exactly where the
//! old one stopped. Explicit, versioned structs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

pub const VCPU_STATE_VERSION: u32 = 1;
pub const VM_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what}: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error("state version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
    #[error("restored only {set} of {total} MSRs")]
    Msrs { set: usize, total: usize },
}

fn kerr(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |err| StateError::Kvm { what, err }
}

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub version: u32,
    pub index: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

/// VM-wide KVM state: the clock and the in-kernel interrupt controllers and PIT.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub version: u32,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// The MSRs worth saving: KVM's list, minus those this host refuses to read.
pub fn msr_list(kvm: &Kvm, probe: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let all = kvm.get_msr_index_list().map_err(kerr("get MSR index list"))?;
    let mut ok = Vec::new();
    for idx in all.as_slice() {
        let entry = [kvm_msr_entry { index: *idx, ..Default::default() }];
        if let Ok(mut m) = Msrs::from_entries(&entry) {
            if probe.get_msrs(&mut m) == Ok(1) {
                ok.push(*idx);
            }
        }
    }
    Ok(ok)
}

/// Read a vCPU's state. The vCPU must be out of KVM_RUN with any pending I/O
/// completed (see `vcpu::run`'s pause handling).
pub fn save_vcpu(fd: &VcpuFd, index: u8, msrs: &[u32]) -> Result<VcpuSnapshot, StateError> {
    let entries: Vec<kvm_msr_entry> = msrs.iter().map(|i| kvm_msr_entry { index: *i, ..Default::default() }).collect();
    let mut m = Msrs::from_entries(&entries).map_err(|_| StateError::Msrs { set: 0, total: entries.len() })?;
    let n = fd.get_msrs(&mut m).map_err(kerr("get MSRs"))?;
    Ok(VcpuSnapshot {
        version: VCPU_STATE_VERSION,
        index,
        mp_state: fd.get_mp_state().map_err(kerr("get MP state"))?,
        regs: fd.get_regs().map_err(kerr("get registers"))?,
        sregs: fd.get_sregs().map_err(kerr("get special registers"))?,
        xsave: fd.get_xsave().map_err(kerr("get xsave"))?,
        xcrs: fd.get_xcrs().map_err(kerr("get XCRs"))?,
        msrs: m.as_slice()[..n].to_vec(),
        lapic: fd.get_lapic().map_err(kerr("get LAPIC"))?,
        events: fd.get_vcpu_events().map_err(kerr("get vCPU events"))?,
        debugregs: fd.get_debug_regs().map_err(kerr("get debug registers"))?,
    })
}

/// The time-stamp counter's MSR.
const MSR_IA32_TSC: u32 = 0x10;

/// Write a vCPU's state into a freshly created vCPU (CPUID already set).
/// Order follows what KVM needs: MSRs and special registers before the
/// LAPIC, pending events last. The TSC is moved on by `tsc_advance` ticks:
/// the time the guest spent paused, which it must see pass (as it would
/// if its vCPU had simply not run), not lose.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot, tsc_advance: u64) -> Result<(), StateError> {
    if s.version != VCPU_STATE_VERSION {
        return Err(StateError::Version { found: s.version, expected: VCPU_STATE_VERSION });
    }
    let mut msrs = s.msrs.clone();
    for e in msrs.iter_mut().filter(|e| e.index == MSR_IA32_TSC) {
        e.data = e.data.wrapping_add(tsc_advance);
    }
    let m = Msrs::from_entries(&msrs).map_err(|_| StateError::Msrs { set: 0, total: s.msrs.len() })?;
    let set = fd.set_msrs(&m).map_err(kerr("set MSRs"))?;
    if set != s.msrs.len() {
        return Err(StateError::Msrs { set, total: s.msrs.len() });
    }
    fd.set_sregs(&s.sregs).map_err(kerr("set special registers"))?;
    fd.set_regs(&s.regs).map_err(kerr("set registers"))?;
    // SAFETY: kvm_xsave is the legacy 4 KiB layout KVM_GET_XSAVE produced.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kerr("set xsave"))?;
    fd.set_xcrs(&s.xcrs).map_err(kerr("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs).map_err(kerr("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kerr("set LAPIC"))?;
    fd.set_mp_state(s.mp_state).map_err(kerr("set MP state"))?;
    fd.set_vcpu_events(&s.events).map_err(kerr("set vCPU events"))?;
    Ok(())
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(kerr("get irqchip"))?;
    Ok(c)
}

pub fn save_vm(vm: &VmFd) -> Result<VmSnapshot, StateError> {
    Ok(VmSnapshot {
        version: VM_STATE_VERSION,
        clock: vm.get_clock().map_err(kerr("get clock"))?,
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kerr("get PIT"))?,
    })
}

/// Restore the VM-wide state; the guest's clock moves on by `advance_ns`
/// (the pause), like its TSC.
pub fn restore_vm(vm: &VmFd, s: &VmSnapshot, advance_ns: u64) -> Result<(), StateError> {
    if s.version != VM_STATE_VERSION {
        return Err(StateError::Version { found: s.version, expected: VM_STATE_VERSION });
    }
    vm.set_pit2(&s.pit).map_err(kerr("set PIT"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(kerr("set irqchip"))?;
    }
    // Only the clock value: the flags KVM reports are not accepted back.
    let clock = kvm_clock_data { clock: s.clock.clock.wrapping_add(advance_ns), ..Default::default() };
    vm.set_clock(&clock).map_err(kerr("set clock"))?;
    Ok(())
}
