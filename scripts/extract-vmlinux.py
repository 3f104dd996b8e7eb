#!/usr/bin/env python3
"""Extract the ELF vmlinux from a bzImage: find the compressed payload via the
setup header (payload_offset/payload_length) and decompress it with the
matching command-line tool."""
import subprocess
import sys

src, dst = sys.argv[1], sys.argv[2]
d = open(src, "rb").read()
if d[0x202:0x206] != b"HdrS":
    sys.exit(f"{src}: not a bzImage")
setup_sects = d[0x1F1] or 4
pm = (setup_sects + 1) * 512
off = int.from_bytes(d[0x248:0x24C], "little")
length = int.from_bytes(d[0x24C:0x250], "little")
payload = d[pm + off : pm + off + length]
tools = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\xfd7zXZ", ["xz", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
]
for magic, cmd in tools:
    if payload.startswith(magic):
        out = subprocess.run(cmd, input=payload, stdout=subprocess.PIPE, check=False).stdout
        if not out.startswith(b"\x7fELF"):
            sys.exit(f"{src}: {cmd[0]} did not yield an ELF")
        open(dst, "wb").write(out)
        print(f"extracted {dst} ({len(out)} bytes, {cmd[0]})", file=sys.stderr)
        break
else:
    sys.exit(f"{src}: unknown payload compression {payload[:4].hex()}")
