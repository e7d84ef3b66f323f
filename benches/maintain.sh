#!/usr/bin/env bash
# Garbage collection at scale: a repository with >= 1,000,000 chunks (small
# chunks on purpose), half of its snapshots forgotten, then
# `maintain --full` (both phases) and a quick `maintain`, with wall time and
# peak RSS; `restic prune` on a repository of the same data, same forget.
#
#   benches/maintain.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
apt_need restic time python3
cargo build --release --bin marmoset
M="$CARGO_TARGET_DIR/release/marmoset"

SNAPS=10
MB_PER_SNAP=64
[ "${1:-}" = "--quick" ] && { SNAPS=4; MB_PER_SNAP=8; }
W="${BENCH_DIR:-/var/tmp/marmoset-maint}"
rm -rf "$W"; mkdir -p "$W/data"
echo pw > "$W/pw"
export MARMOSET_PASSWORD_FILE="$W/pw" RESTIC_PASSWORD_FILE="$W/pw" MARMOSET_CACHE_DIR="$W/cache" RESTIC_CACHE_DIR="$W/rcache"

t() { # t LABEL CMD... -> appends "LABEL wall rss_kib"
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$W/t" "$@" > "$W/out.$label" 2>&1 || { cat "$W/out.$label" >&2; exit 1; }
    echo "$label $(cat "$W/t")" >> "$W/times"
}

"$M" -q --repo "$W/m" init --chunk-size 512 --compression 0 >/dev/null
restic -q -r "$W/r" init >/dev/null
for i in $(seq 1 "$SNAPS"); do
    rm -rf "$W/data"; mkdir -p "$W/data"
    head -c "${MB_PER_SNAP}M" /dev/urandom > "$W/data/blob-$i"
    "$M" -q --repo "$W/m" backup --source bench "$W/data" >/dev/null
    restic -q -r "$W/r" backup --host bench "$W/data" >/dev/null
done
CHUNKS=$("$M" --repo "$W/m" --json stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_blobs"])')
log "repository: $CHUNKS chunks in $SNAPS snapshots"
KEEP=$((SNAPS / 2))
"$M" -q --repo "$W/m" forget --keep-last "$KEEP" >/dev/null
restic -q -r "$W/r" forget --keep-last "$KEEP" >/dev/null
t marmoset_full_phase1 "$M" -q --repo "$W/m" maintain --full --safety-margin 0s
t marmoset_full_phase2 "$M" -q --repo "$W/m" maintain --full --safety-margin 0s
t marmoset_quick "$M" -q --repo "$W/m" maintain
t restic_prune restic -q -r "$W/r" prune
t marmoset_check "$M" -q --repo "$W/m" check
t restic_check restic -q -r "$W/r" check
"$M" -q --repo "$W/m" check --read-data >/dev/null

echo
echo "| step | wall s | peak RSS MiB |"
echo "|---|---|---|"
while read -r label wall rss; do
    printf '| %s | %s | %.0f |\n' "$label" "$wall" "$(echo "$rss / 1024" | bc -l)"
done < "$W/times"
echo
echo "marmoset repository chunks: $CHUNKS; sizes after: marmoset $(du -sh "$W/m" | cut -f1), restic $(du -sh "$W/r" | cut -f1)"
rm -rf "$W"
