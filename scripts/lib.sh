# Shared helpers for scripts/*: quiet apt installs and the cargo target dir.
# shellcheck shell=bash

# Build outputs live outside the clone so CI runs on the same machine reuse
# the (slow, C++) RocksDB build; a cold machine simply builds once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/marmoset-target}"
export CARGO_TERM_QUIET=true

log() { printf '==> %s\n' "$*" >&2; }

# apt_need PKG...: installs the Debian packages that are missing, quietly.
apt_need() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ ! -f /var/lib/marmoset-apt-updated ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
        $sudo apt-get update -qq >/dev/null
        $sudo touch /var/lib/marmoset-apt-updated 2>/dev/null || true
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

build_deps() {
    apt_need clang libclang-dev pkg-config fuse3 libfuse3-dev attr
}

# pip_need MODULE SPEC: installs a Python package when its module is missing.
pip_need() {
    python3 -c "import $1" 2>/dev/null && return 0
    log "installing $2 (pip)"
    python3 -m pip install -q --disable-pip-version-check "$2" >/dev/null 2>&1
}
