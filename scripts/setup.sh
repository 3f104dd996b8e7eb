#!/usr/bin/env bash
# One-time (idempotent) machine setup: checks the toolchain and KVM, installs
# what the project needs from Debian if it is missing. Safe to re-run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: Staunch's asset scripts need a Debian-based host"
need_pkgs=()
command -v cc >/dev/null || need_pkgs+=(gcc)
# Debian's real XenStore clients: the config store's conformance tests.
command -v xenstore-read >/dev/null || need_pkgs+=(xenstore-utils)
# ip(8): the network tests' namespaces, bridges and taps.
command -v ip >/dev/null || need_pkgs+=(iproute2)
if ((${#need_pkgs[@]})); then
    [[ "$(id -u)" == 0 ]] || die "need root to install: ${need_pkgs[*]}"
    say "installing ${need_pkgs[*]}"
    # Wait for another apt (a second setup, unattended upgrades) rather than fail.
    lock=(-o DPkg::Lock::Timeout=300)
    apt-get "${lock[@]}" install -y -q "${need_pkgs[@]}" >&2 || { apt-get "${lock[@]}" update -q >&2 && apt-get "${lock[@]}" install -y -q "${need_pkgs[@]}" >&2; }
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >&2 || true
if [[ -e /dev/kvm ]]; then
    [[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm exists but this user cannot open it (add yourself to the kvm group)"
else
    say "WARNING: /dev/kvm is missing: VMs cannot run here; KVM tests will be SKIPPED"
fi
