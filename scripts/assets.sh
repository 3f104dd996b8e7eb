#!/usr/bin/env bash
# Fetch the guest assets in assets/manifest into $STAUNCH_CACHE (idempotent).
# Packages come from Debian's archive with `apt-get download` and are unpacked
# with dpkg-deb -x: nothing is installed on the host.
#   scripts/assets.sh [linux|busybox]
#   scripts/assets.sh --deb KIND   # print the path of KIND's verified .deb
set -euo pipefail
source "$(dirname "$0")/lib.sh"
deb_only=0
if [[ "${1:-}" == --deb ]]; then
    deb_only=1
    shift
    [[ -n "${1:-}" ]] || die "usage: assets.sh --deb KIND"
fi
want="${1:-all}"
debs="$STAUNCH_CACHE/debs"
mkdir -p "$debs"

fetch_deb() { # package version sha256 -> prints path of the verified .deb
    local pkg="$1" ver="$2" sum="$3" f
    f="$(ls "$debs/${pkg}_${ver//:/%3a}"_*.deb 2>/dev/null | head -1 || true)"
    if [[ -z "$f" ]]; then
        say "downloading $pkg $ver"
        if ! (cd "$debs" && apt-get download -q "$pkg=$ver" >&2); then
            say "WARNING: $pkg $ver is no longer in the archive; the manifest pin is stale."
            say "WARNING: falling back to the archive's current version (update assets/manifest)."
            [[ "$(id -u)" == 0 ]] && apt-get update -q >&2 || true
            (cd "$debs" && apt-get download -q "$pkg" >&2) || die "cannot download $pkg"
            sum=any
        fi
        f="$(ls -t "$debs/${pkg}"_*.deb | head -1)"
    fi
    local got
    got="$(sha256sum "$f" | cut -d' ' -f1)"
    if [[ "$sum" != any && "$sum" != PENDING && "$got" != "$sum" ]]; then
        rm -f "$f"
        die "$f: sha256 $got does not match the manifest ($sum)"
    fi
    [[ "$sum" == PENDING || "$sum" == any ]] && say "sha256 of $(basename "$f"): $got"
    echo "$f"
}

while read -r kind name pkg ver sum; do
    [[ -z "$kind" || "$kind" == \#* ]] && continue
    [[ "$want" != all && "$want" != "$kind" ]] && continue
    if ((deb_only)); then
        fetch_deb "$pkg" "$ver" "$sum"
        exit 0
    fi
    case "$kind" in
    linux)
        out="$STAUNCH_CACHE/linux"
        if [[ -s "$out/vmlinuz" && -s "$out/vmlinux" && -f "$out/.version" && "$(cat "$out/.version")" == "$pkg $ver" ]]; then
            continue
        fi
        deb="$(fetch_deb "$pkg" "$ver" "$sum")"
        tmp="$(mktemp -d)"
        dpkg-deb -x "$deb" "$tmp"
        mkdir -p "$out"
        cp "$tmp"/boot/vmlinuz-* "$out/vmlinuz"
        rm -rf "$tmp"
        # Also the uncompressed ELF vmlinux inside the bzImage: decompressing
        # takes minutes where guest kernel code is emulated (KVM-PVM).
        python3 "$ROOT/scripts/extract-vmlinux.py" "$out/vmlinuz" "$out/vmlinux"
        echo "$pkg $ver" >"$out/.version"
        say "Linux kernel ready: $out/vmlinuz ($pkg $ver)"
        ;;
    busybox)
        # The static busybox of the Linux guest's initramfs (scripts/initramfs.sh).
        out="$STAUNCH_CACHE/busybox"
        if [[ -x "$out/busybox" && -f "$out/.version" && "$(cat "$out/.version")" == "$pkg $ver" ]]; then
            continue
        fi
        deb="$(fetch_deb "$pkg" "$ver" "$sum")"
        tmp="$(mktemp -d)"
        dpkg-deb -x "$deb" "$tmp"
        mkdir -p "$out"
        cp "$tmp/bin/busybox" "$out/busybox"
        rm -rf "$tmp"
        echo "$pkg $ver" >"$out/.version"
        say "busybox ready: $out/busybox ($pkg $ver)"
        ;;
    *) die "unknown asset kind $kind in assets/manifest" ;;
    esac
done <"$ROOT/assets/manifest"
((deb_only)) && die "no $want in assets/manifest"
true
