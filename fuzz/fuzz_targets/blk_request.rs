//! Guest-written rings and block requests served by the block backend: a
//! virtio error status or a skipped chain, never a panic or an access
//! outside guest memory and the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    staunch_vhost::fuzz::blk_requests(data);
});
