//! Staunch's config store (`staunch store`): XenStore's data model and wire
//! protocol on a unix socket, durable through a write-ahead log with
//! snapshots. Debian's `xenstore-utils` talk to it unchanged
//! (`XENSTORED_PATH=<socket>`).

pub mod client;
pub mod repl;
pub mod server;
pub mod tree;
pub mod txn;
pub mod wal;
pub mod wire;

pub use server::{Config, StoreError, standby, start};
pub use staunch_events::emit;
pub use tree::Quotas;
