//! `staunch host`: the supervisor of a host (DESIGN.md, "The host"). It
//! starts the config store and its standby, then every VM's backends and
//! VMM as the store's definitions say, detects deaths (pidfd) and hangs
//! (heartbeats), recovers in dependency order within restart budgets, and
//! adopts what runs when it restarts itself.

pub mod component;
pub mod config;
pub mod def;
pub mod notify;
pub mod probe;
pub mod proc;
mod reconcile;
pub mod renew;
pub mod state;
pub mod status;
pub mod storeio;
pub mod supervisor;

pub use config::HostConfig;
pub use supervisor::{HostError, Supervisor};
