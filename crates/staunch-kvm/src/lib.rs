//! Staunch's KVM core: guest RAM in memfds, the VM, and vCPU threads driven as
//! an explicit state machine. Exits reach the VMM already decoded through
//! [`ExitHandler`]; device models never see KVM.

pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use memory::{GuestRam, MemError};
pub use vcpu::{ExitHandler, StopReason, VcpuControl, VcpuError, VcpuState};
pub use vm::{Vm, VmError};
