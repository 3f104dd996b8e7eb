#!/usr/bin/env bash
# Fetch Debian's etcd-server (the config store benchmark's peer) into
# $STAUNCH_CACHE/etcd without installing it (no service gets started):
# a private apt state downloads the package, dpkg-deb -x unpacks it.
# Idempotent. Prints the path of the etcd binary.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
E="$STAUNCH_CACHE/etcd"
BIN="$E/root/usr/bin/etcd"
WANT="3.4.23-4+b4"
if [[ -x "$BIN" && -f "$E/.version" && "$(cat "$E/.version")" == "$WANT" ]]; then
    echo "$BIN"
    exit 0
fi
# The machine's own apt sources for these suites (scripts/apt_sources.sh).
src="$(debian_sources bookworm)"
mapfile -t SOURCES <<<"$src"
private_apt "$E" "${SOURCES[@]}"
say "fetching etcd-server $WANT (private apt state in $E)"
apt-get "${APT[@]}" update >&2
(cd "$E/archives" && apt-get "${APT[@]}" download "etcd-server=$WANT" >&2) || die "could not download etcd-server $WANT"
rm -rf "$E/root"
mkdir -p "$E/root"
dpkg-deb -x "$E"/archives/etcd-server_*.deb "$E/root"
"$BIN" --version >&2 || die "unpacked etcd does not run"
echo "$WANT" >"$E/.version"
say "etcd ready: $BIN"
echo "$BIN"
