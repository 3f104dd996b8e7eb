#!/usr/bin/env bash
# Fetch QEMU 10 (qemu-system-x86_64 and qemu-storage-daemon, the latter from
# qemu-utils) from bookworm-backports into $STAUNCH_CACHE/qemu, without
# touching the system's apt sources or installing anything: a private apt
# state resolves what the host lacks, `--download-only` fetches it (and
# `apt-get download` the named packages themselves, in case the host already
# has them installed), and dpkg-deb -x unpacks it. Idempotent. Prints the
# path of qemu-system-x86_64 on stdout (and nothing else); `source
# $STAUNCH_CACHE/qemu/env` before running either binary.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
Q="$STAUNCH_CACHE/qemu"
BIN="$Q/root/usr/bin/qemu-system-x86_64"
QSD="$Q/root/usr/bin/qemu-storage-daemon"
WANT="1:10.0.2+ds-2+deb13u1~bpo12+1"
PKGS=("qemu-system-x86=$WANT" "qemu-utils=$WANT")
# What .version records: the version and what was unpacked, so that a cache
# from before qemu-storage-daemon was fetched is refetched.
MARK="$WANT qemu-system-x86 qemu-utils"
if [[ -x "$BIN" && -x "$QSD" && -f "$Q/.version" && "$(cat "$Q/.version")" == "$MARK" ]]; then
    echo "$BIN"
    exit 0
fi
# The machine's own apt sources for these suites (scripts/apt_sources.sh).
src="$(debian_sources bookworm bookworm-updates bookworm-security bookworm-backports)"
mapfile -t SOURCES <<<"$src"
private_apt "$Q" "${SOURCES[@]}"
say "resolving QEMU $WANT from bookworm-backports (private apt state in $Q)"
apt-get "${APT[@]}" update >&2
apt-get "${APT[@]}" -y install --download-only --no-install-recommends \
    -t bookworm-backports "${PKGS[@]}" >&2 || die "could not download QEMU $WANT"
# install --download-only skips a package the host already has at this
# version (and so would leave it out of the cache): fetch those directly.
(cd "$Q/archives" && apt-get "${APT[@]}" download "${PKGS[@]}") >&2 || die "could not download QEMU $WANT"
rm -rf "$Q/root"
mkdir -p "$Q/root"
for f in "$Q"/archives/*.deb; do dpkg-deb -x "$f" "$Q/root"; done
cat >"$Q/env" <<EOS
export LD_LIBRARY_PATH="$Q/root/usr/lib/x86_64-linux-gnu:$Q/root/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOS
# shellcheck disable=SC1091
source "$Q/env"
"$BIN" --version >&2 || die "unpacked QEMU does not run"
"$QSD" --version >&2 || die "unpacked qemu-storage-daemon does not run"
echo "$MARK" >"$Q/.version"
say "QEMU ready: $BIN (and $QSD)"
echo "$BIN"
