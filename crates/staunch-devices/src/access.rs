//! Which guest access a device is serving: the stamp of the vCPU exit (see
//! `staunch_kvm::vcpu::PendingWrite`) and whether it is a replay of one a
//! crash cut short. Set by the VMM around each dispatch; a device with side
//! effects outside the VM (the UART's console) records the stamp of what it
//! did and skips a replay of something it already did.

use std::cell::Cell;

thread_local! {
    static STAMP: Cell<u64> = const { Cell::new(0) };
    static REPLAY: Cell<bool> = const { Cell::new(false) };
}

/// The exit this thread serves from now on (0: none).
pub fn set_stamp(stamp: u64) {
    STAMP.with(|s| s.set(stamp));
}

pub fn stamp() -> u64 {
    STAMP.with(|s| s.get())
}

/// True while [`replay`] runs on this thread.
pub fn replaying() -> bool {
    REPLAY.with(|r| r.get())
}

/// Run `f` as the replay of the access stamped `stamp`.
pub fn replay<R>(stamp: u64, f: impl FnOnce() -> R) -> R {
    set_stamp(stamp);
    REPLAY.with(|r| r.set(true));
    let out = f();
    REPLAY.with(|r| r.set(false));
    set_stamp(0);
    out
}
