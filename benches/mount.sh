#!/usr/bin/env bash
# FUSE read performance: sequential read of a large file through
# `marmoset mount` vs `marmoset restore` of the same file vs `restic mount`,
# and `ls -R` / `find` over a many-file snapshot through both mounts.
# Page caches are dropped before every measurement (cold reads).
#
#   benches/mount.sh [--quick]      (default: 1 GiB file, 100k small files)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
apt_need restic fuse3 python3
cargo build --release --bin marmoset
M="$CARGO_TARGET_DIR/release/marmoset"

BIG_MB=1024
FILES=100000
[ "${1:-}" = "--quick" ] && { BIG_MB=128; FILES=5000; }
W="${BENCH_DIR:-/var/tmp/marmoset-mount}"
for mp in "$W/mnt-m" "$W/mnt-r"; do fusermount3 -u -z "$mp" 2>/dev/null || true; done
rm -rf "$W"; mkdir -p "$W/data/small" "$W/mnt-m" "$W/mnt-r" "$W/out"
echo pw > "$W/pw"
export MARMOSET_PASSWORD_FILE="$W/pw" RESTIC_PASSWORD_FILE="$W/pw" MARMOSET_CACHE_DIR="$W/cache" RESTIC_CACHE_DIR="$W/rcache"

head -c "${BIG_MB}M" /dev/urandom > "$W/data/big.bin"
python3 - "$W/data/small" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i % 500:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}"), "w") as f:
        f.write(str(i))
PY
"$M" -q --repo "$W/m" init >/dev/null
"$M" -q --repo "$W/m" backup "$W/data" >/dev/null
restic -q -r "$W/r" init >/dev/null
restic -q -r "$W/r" backup "$W/data" >/dev/null

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { # secs CMD...: wall seconds of CMD
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
wait_for() { for _ in $(seq 1 200); do [ -e "$1" ] && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; exit 1; }

"$M" -q --repo "$W/m" mount "$W/mnt-m" >/dev/null 2>&1 &
MPID=$!
restic -q -r "$W/r" mount "$W/mnt-r" >/dev/null 2>&1 &
RPID=$!
trap 'kill $MPID $RPID 2>/dev/null; fusermount3 -u -z "$W/mnt-m" 2>/dev/null; fusermount3 -u -z "$W/mnt-r" 2>/dev/null; true' EXIT
wait_for "$W/mnt-m/snapshots"
wait_for "$W/mnt-r/snapshots"
MBIG=$(ls -d "$W"/mnt-m/snapshots/*/ | head -1)big.bin
RSNAP=$(ls -d "$W"/mnt-r/snapshots/*/ | grep -v latest | head -1)
RBIG="$RSNAP${W#/}/data/big.bin"
wait_for "$RBIG"

drop; T_RESTORE=$(secs "$M" -q --repo "$W/m" restore "latest:/big.bin" --target "$W/out")
drop; T_MOUNT=$(secs dd if="$MBIG" of=/dev/null bs=1M)
drop; T_RESTIC=$(secs dd if="$RBIG" of=/dev/null bs=1M)
cmp "$MBIG" "$W/data/big.bin"
drop; T_LS_M=$(secs ls -R "$(dirname "$MBIG")/small")
drop; T_LS_R=$(secs ls -R "$RSNAP${W#/}/data/small")
drop; T_FIND_M=$(secs find "$(dirname "$MBIG")/small" -name 'f0999*')
drop; T_FIND_R=$(secs find "$RSNAP${W#/}/data/small" -name 'f0999*')

python3 - "$BIG_MB" "$FILES" "$T_RESTORE" "$T_MOUNT" "$T_RESTIC" "$T_LS_M" "$T_LS_R" "$T_FIND_M" "$T_FIND_R" <<'PY'
import sys
mb, files = int(sys.argv[1]), int(sys.argv[2])
restore, mount, restic, lsm, lsr, fm, fr = map(float, sys.argv[3:])
print(f"\n| measurement ({mb} MiB file, {files} small files) | marmoset mount | marmoset restore | restic mount | ratios |")
print("|---|---|---|---|---|")
print(f"| sequential read MiB/s | {mb/mount:.0f} | {mb/restore:.0f} | {mb/restic:.0f} | mount/restore {restore/mount:.2f}, mount vs restic {restic/mount:.2f}x |")
print(f"| ls -R seconds | {lsm:.2f} | - | {lsr:.2f} | restic/marmoset {lsr/lsm:.2f}x |")
print(f"| find seconds | {fm:.2f} | - | {fr:.2f} | restic/marmoset {fr/fm:.2f}x |")
PY
