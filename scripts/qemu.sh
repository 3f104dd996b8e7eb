#!/usr/bin/env bash
# Fetch QEMU 10 from bookworm-backports into $STAUNCH_CACHE/qemu, without
# touching the system's apt sources or installing anything: a private apt
# state resolves what the host lacks, `--download-only` fetches it, and
# dpkg-deb -x unpacks it. Idempotent. Prints the path of qemu-system-x86_64.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
Q="$STAUNCH_CACHE/qemu"
BIN="$Q/root/usr/bin/qemu-system-x86_64"
WANT="1:10.0.2+ds-2+deb13u1~bpo12+1"
if [[ -x "$BIN" && -f "$Q/.version" && "$(cat "$Q/.version")" == "$WANT" ]]; then
    echo "$BIN"
    exit 0
fi
private_apt "$Q" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" \
    "deb http://deb.debian.org/debian bookworm-backports main"
say "resolving QEMU $WANT from bookworm-backports (private apt state in $Q)"
apt-get "${APT[@]}" update >&2
apt-get "${APT[@]}" -y install --download-only --no-install-recommends \
    -t bookworm-backports "qemu-system-x86=$WANT" >&2 || die "could not download QEMU $WANT"
rm -rf "$Q/root"
mkdir -p "$Q/root"
for f in "$Q"/archives/*.deb; do dpkg-deb -x "$f" "$Q/root"; done
cat >"$Q/env" <<EOS
export LD_LIBRARY_PATH="$Q/root/usr/lib/x86_64-linux-gnu:$Q/root/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOS
# shellcheck disable=SC1091
source "$Q/env"
"$BIN" --version >&2 || die "unpacked QEMU does not run"
echo "$WANT" >"$Q/.version"
say "QEMU ready: $BIN"
echo "$BIN"
