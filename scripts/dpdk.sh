#!/usr/bin/env bash
# Fetch Debian 12's DPDK (dpdk-testpmd, in dpdk-dev, and its PMDs, among them the vhost
# PMD that serves vhost-user) into $STAUNCH_CACHE/dpdk, the way qemu.sh
# fetches QEMU: a private apt state, --download-only, dpkg-deb -x; nothing is
# installed on the system. Idempotent. Prints the path of dpdk-testpmd.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
D="$STAUNCH_CACHE/dpdk"
BIN="$D/root/usr/bin/dpdk-testpmd"
if [[ -x "$BIN" && -f "$D/.done" ]]; then
    echo "$BIN"
    exit 0
fi
# The machine's own apt sources for these suites (scripts/apt_sources.sh).
src="$(debian_sources bookworm bookworm-security)"
mapfile -t SOURCES <<<"$src"
private_apt "$D" "${SOURCES[@]}"
say "resolving dpdk (private apt state in $D)"
apt-get "${APT[@]}" update >&2
apt-get "${APT[@]}" -y install --download-only --no-install-recommends dpdk-dev >&2 || die "could not download dpdk"
(cd "$D/archives" && apt-get "${APT[@]}" download dpdk-dev) >&2 || die "could not download dpdk"
rm -rf "$D/root"
mkdir -p "$D/root"
for f in "$D"/archives/*.deb; do dpkg-deb -x "$f" "$D/root"; done
touch "$D/.done"
say "DPDK ready: $BIN"
echo "$BIN"
