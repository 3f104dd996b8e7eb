//! The block backend's vhost-user message handling: whatever a frontend
//! sends ends in a reply, an error or a closed connection, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| staunch_vhost::fuzz::vhost_messages(data));
