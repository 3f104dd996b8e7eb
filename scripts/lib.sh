# Shared by the project's scripts.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STAUNCH_CACHE="${STAUNCH_CACHE:-$ROOT/.cache}"
mkdir -p "$STAUNCH_CACHE"
say() { printf '\033[1m[staunch]\033[0m %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# A private apt state in $1 with the sources given as the other arguments:
# sets APT=(options) for apt-get; nothing on the system is changed.
private_apt() {
    local dir="$1"
    shift
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    printf '%s\n' "$@" >"$dir/sources.list"
    APT=(-q -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::Cache::archives=$dir/archives"
        -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
}

source "$ROOT/scripts/apt_sources.sh"
