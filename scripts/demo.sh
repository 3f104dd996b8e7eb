#!/usr/bin/env bash
# The main job: set up, build, and run `staunch demo` (boots the test guest
# with a disk, shows it working, pauses and resumes it, checks its disk).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
say "building (release)"
cargo build --release -q -p staunch
exec "$ROOT/target/release/staunch" demo "$@"
