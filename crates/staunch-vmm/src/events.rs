//! The VMM's structured events (the shared format of every component).

pub use staunch_events::emit;
