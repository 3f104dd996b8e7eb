# Shared by the project's scripts.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STAUNCH_CACHE="${STAUNCH_CACHE:-$ROOT/.cache}"
mkdir -p "$STAUNCH_CACHE"
say() { printf '\033[1m[staunch]\033[0m %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
