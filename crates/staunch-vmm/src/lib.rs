//! One VM: configuration, assembly of memory, KVM, devices and vCPU threads,
//! and the control handle (pause, resume, stop) other threads use.

pub mod api;
pub mod config;
mod crash;
mod devices;
pub mod events;
pub mod handover;
pub mod record;
pub mod serial_out;
pub mod vm;

pub use config::{ConfigError, DiskConfig, NetConfig, SerialConfig, VmConfig};
pub use vm::{RunningVm, VmEvent, VmExit, VmmError};
