#!/usr/bin/env bash
# The test suite: set up, fetch assets, check formatting and lints, run every
# test. Tests named kvm_* need /dev/kvm; without it they are skipped, loudly,
# and reported as skipped, never as passed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$ROOT/scripts/setup.sh"
bash "$ROOT/scripts/assets.sh"
bash "$ROOT/scripts/qemu.sh" >/dev/null
bash "$ROOT/scripts/initramfs.sh" >/dev/null
bash "$ROOT/scripts/etcd.sh" >/dev/null
cd "$ROOT"
export STAUNCH_LINUX_KERNEL="${STAUNCH_LINUX_KERNEL:-$STAUNCH_CACHE/linux/vmlinuz}"

say "cargo fmt --check"
cargo fmt --all --check
(cd guest && cargo fmt --check)
say "cargo clippy --all-targets -- -D warnings"
cargo clippy -q --workspace --all-targets -- -D warnings

skip=()
if [[ ! -e /dev/kvm ]]; then
    n="$(cargo test -q --workspace -- --list 2>/dev/null | grep -c '^kvm_' || true)"
    say "################################################################"
    say "#  /dev/kvm is missing: SKIPPING $n KVM tests (not passed)      "
    say "################################################################"
    skip=(--skip kvm_)
fi
say "cargo test"
cargo test --workspace -- "${skip[@]}"
if ((${#skip[@]})); then say "SKIPPED: $n KVM tests (no /dev/kvm)"; fi
say "all tests passed"
