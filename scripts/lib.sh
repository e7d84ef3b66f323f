# Shared helpers for scripts/*: quiet apt installs and the cargo target dir.
# shellcheck shell=bash

# Build outputs live outside the clone so CI runs on the same machine reuse
# them; a cold machine simply builds once.
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

# librocksdb-dev: marmoset links Debian's RocksDB (see .cargo/config.toml)
# instead of compiling RocksDB's C++, which was most of a cold build;
# libclang-dev: bindgen generates the bindings from its C header;
# python3: scripts/rocksdb-abi-check.
build_deps() {
    apt_need librocksdb-dev clang libclang-dev python3 pkg-config fuse3 libfuse3-dev attr
    [ -n "${ROCKSDB_COMPILE:-}" ] || scripts/rocksdb-abi-check
}

# need_pip_tool CMD PACKAGE: makes sure CMD (installed by the PyPI PACKAGE)
# is on PATH. Debian's system Python refuses plain `pip install` (PEP 668),
# so fall back to --break-system-packages, then to a private virtualenv.
need_pip_tool() {
    local cmd="$1" pkg="$2"
    command -v "$cmd" >/dev/null && return 0
    log "installing $pkg (pip)"
    python3 -m pip install -q --disable-pip-version-check "$pkg" >/dev/null 2>&1 \
        || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$pkg" >/dev/null 2>&1 \
        || true
    hash -r
    command -v "$cmd" >/dev/null && return 0
    for d in "$HOME/.local/bin" /usr/local/bin; do
        if [ -x "$d/$cmd" ]; then export PATH="$d:$PATH"; return 0; fi
    done
    local venv=/var/cache/marmoset-venv
    apt_need python3-venv
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >/dev/null
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$pkg" >/dev/null 2>&1
    export PATH="$venv/bin:$PATH"
    command -v "$cmd" >/dev/null
}

# need_moto: makes sure `moto_server` (a real S3-compatible server) is on PATH.
need_moto() { need_pip_tool moto_server "moto[server]"; }

# free_port: a TCP port on 127.0.0.1 that nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_http PORT [TENTHS]: waits (up to TENTHS tenths of a second, default
# 100) until something answers HTTP on 127.0.0.1:PORT.
wait_http() {
    for _ in $(seq 1 "${2:-100}"); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
    return 1
}
