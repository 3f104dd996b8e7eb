#!/bin/sh
# Build the test guest by hand (the host build does the same from build.rs).
set -e
cd "$(dirname "$0")"
export CARGO_ENCODED_RUSTFLAGS="$(printf '%s\037' -C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-no-pie "-C" "link-arg=-Wl,-T,$PWD/link.ld,--build-id=none" -C relocation-model=static -C no-redzone=yes -C target-cpu=x86-64 | sed 's/\x1f$//')"
cargo build --release --target-dir "${1:-../target/guest}"
