//! vhost-user for Staunch, shared by the block and net backends and the
//! VMM's frontends: the inflight region (exactly as the vhost-user
//! specification lays it out), a backend server on the `vhost` crate's
//! message parser, and a frontend that reconnects on its own.

pub mod backend;
pub mod blk;
pub mod chain;
pub mod control;
pub mod frontend;
#[doc(hidden)]
pub mod fuzz;
pub mod handoff;
pub mod inflight;
pub mod memory;
pub mod net;
pub mod process;
mod queue;
