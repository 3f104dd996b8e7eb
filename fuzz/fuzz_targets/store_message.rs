//! The config store's message parser and the argument parsing behind every
//! request: arbitrary bytes must give an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use staunch_store::tree::{Caller, Perm, valid_path};
use staunch_store::wire::{self, Op};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(m) = wire::read_msg(&mut r) {
        let _ = Op::from_u32(m.header.ty);
        if let Ok(parts) = wire::strings(&m.payload) {
            for p in &parts {
                let _ = valid_path(p);
                let _ = Perm::parse(p);
                let _ = Caller { dom: m.header.tx_id }.path(p);
            }
        }
        let _ = wire::split_first(&m.payload);
        let _ = wire::one_string(&m.payload);
    }
});
