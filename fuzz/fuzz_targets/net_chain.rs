//! Guest-written rings served by the network backend's receive and
//! transmit queues: a dropped and counted chain, never a panic or an access
//! outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    staunch_vhost::fuzz::net_chains(data);
});
