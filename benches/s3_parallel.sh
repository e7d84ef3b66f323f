#!/usr/bin/env bash
# Parallel upload scaling under latency: a backup into a real S3-compatible
# server (moto) behind a proxy that delays every request by a round trip
# (tc netem is not available here), with 1, 2, 4, 8 and 16 parallel uploads.
#
#   benches/s3_parallel.sh [SIZE_MIB] [RTT_MS]     (defaults: 1024, 50)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_moto
cargo build --release --bin marmoset
M="$CARGO_TARGET_DIR/release/marmoset"
SIZE=${1:-1024}
RTT=${2:-50}
W="${BENCH_DIR:-/var/tmp/marmoset-s3bench}"
rm -rf "$W"; mkdir -p "$W/data"
head -c "${SIZE}M" /dev/urandom > "$W/data/big.bin"

S3=$(free_port); PX=$(free_port)
moto_server -H 127.0.0.1 -p "$S3" >/dev/null 2>&1 & MOTO=$!
python3 testing/src/fault_proxy.py "$PX" "$S3" 0 1 "$RTT" >/dev/null & PROXY=$!
trap 'kill $MOTO $PROXY 2>/dev/null || true' EXIT
wait_http "$S3" || true
curl -s -X PUT "http://127.0.0.1:$S3/bench" >/dev/null

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench MARMOSET_PASSWORD=bench MARMOSET_CACHE_DIR="$W/cache"
echo
echo "| parallel uploads | seconds | MiB/s | speed-up vs 1 |"
echo "|---|---|---|---|"
BASE=""
for n in 1 2 4 8 16; do
    # Fresh repository each time so every run uploads everything.
    "$M" -q --repo "s3:http://127.0.0.1:$S3/bench/run$n" init >/dev/null
    s=$(date +%s.%N)
    "$M" -q --repo "s3:http://127.0.0.1:$PX/bench/run$n" --s3-connections "$n" backup "$W/data" >/dev/null
    e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l)
    [ -z "$BASE" ] && BASE=$t
    printf '| %s | %.2f | %.0f | %.2fx |\n' "$n" "$t" "$(echo "$SIZE / $t" | bc -l)" "$(echo "$BASE / $t" | bc -l)"
done
echo
echo "(${SIZE} MiB incompressible data, ${RTT} ms added to every request, moto on loopback)"
rm -rf "$W"
