#!/usr/bin/env bash
# Build the initramfs of the real-Linux end-to-end tests (Debian's kernel
# under QEMU, disk served by `staunch blk`, network by `staunch net`) into
# $STAUNCH_CACHE/initramfs/initramfs.cpio.gz: Debian's static busybox, the
# kernel's virtio modules (from the cached linux-image .deb), the guest
# program staunch-linux-blk built statically, and an /init that loads the
# modules, runs the program on /dev/vda with the kernel command line's
# staunch.* parameters, prints `STAUNCH done code=N` and powers off.
# Idempotent: rebuilt only when an input changed. Prints the path on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
out="$STAUNCH_CACHE/initramfs"
img="$out/initramfs.cpio.gz"
mkdir -p "$out"

bash "$ROOT/scripts/assets.sh" busybox
bb="$STAUNCH_CACHE/busybox/busybox"
kdeb="$(bash "$ROOT/scripts/assets.sh" --deb linux)"

# The guest program, in its own target directory so that the static flags
# never reach the host's builds.
gt="$STAUNCH_CACHE/linuxguest-target"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols cargo build -q --release -p staunch-linuxguest \
    --target x86_64-unknown-linux-gnu --target-dir "$gt") >&2 || die "could not build staunch-linux-blk"
prog="$gt/x86_64-unknown-linux-gnu/release/staunch-linux-blk"
if command -v file >/dev/null; then
    file -L "$prog" | grep -Eq "statically linked|static-pie linked" || die "$prog is not statically linked: $(file -L "$prog")"
elif readelf -l "$prog" | grep -q INTERP; then
    die "$prog is not statically linked (it has an ELF interpreter)"
fi

# The modules in load order (modules.dep is not shipped): virtio-pci needs
# the first four, virtio-blk virtio and virtio_ring, virtio-net failover and
# net_failover.
mods=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net)

key="$( (basename "$kdeb" && printf '%s\n' "${mods[@]}" && cat "$bb" "$prog" "$0") | sha256sum | cut -d' ' -f1)"
if [[ -s "$img" && -f "$out/.inputs" && "$(cat "$out/.inputs")" == "$key" ]]; then
    echo "$img"
    exit 0
fi

say "building the initramfs ($img)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/deb"
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$bb" "$root/bin/busybox"
for a in $("$bb" --list); do
    [[ -e "$root/bin/$a" ]] || ln -s busybox "$root/bin/$a"
done
for m in "${mods[@]}"; do
    f="$(find "$tmp/deb/lib/modules" -name "$m.ko" | head -1)"
    [[ -n "$f" ]] || die "$m.ko is not in $(basename "$kdeb")"
    cp "$f" "$root/lib/modules/"
done
cp "$prog" "$root/bin/staunch-linux-blk"
cat >"$root/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
for m in ${mods[*]}; do
    insmod /lib/modules/\$m.ko || echo "STAUNCH init: insmod \$m failed"
done
# staunch.net=ADDR/LEN: the network test. eth0 gets the address, a TCP
# echo service listens on port 7 (busybox nc, one cat per connection), and
# the guest stays up until the test ends it.
net=""
for a in \$(cat /proc/cmdline); do
    case "\$a" in staunch.net=*) net="\${a#staunch.net=}" ;; esac
done
if [ -n "\$net" ]; then
    ip link set lo up
    ip link set eth0 up && ip addr add "\$net" dev eth0 || echo "STAUNCH net error: no eth0"
    nc -ll -p 7 -e cat &
    echo "STAUNCH net up addr=\$net"
    while true; do sleep 3600; done
fi
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 100 ]; do
    sleep 0.1
    i=\$((i + 1))
done
args=""
for a in \$(cat /proc/cmdline); do
    case "\$a" in staunch.*) args="\$args \$a" ;; esac
done
/bin/staunch-linux-blk /dev/vda \$args
echo "STAUNCH done code=\$?"
poweroff -f
EOF
chmod 755 "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9n >"$img.tmp"
mv "$img.tmp" "$img"
echo "$key" >"$out/.inputs"
say "initramfs ready: $img ($(du -k "$img" | cut -f1) KiB)"
echo "$img"
