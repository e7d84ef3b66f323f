#!/usr/bin/env bash
# Backup to and restore from S3 over an emulated WAN: marmoset vs restic
# (and rustic when installed), at several round-trip delays and numbers of
# connections, on the same data and the same server.
#
#   benches/restore_s3.sh [--quick]
#   SIZE_MIB=512 DELAYS="0 20 80" CONNS="1 2 4 8 16" WINDOW_KIB=1024 benches/restore_s3.sh
#
# The S3 server is s3s-fs (a Rust S3 server on a directory) when on PATH or
# in /opt/s3s/bin (`cargo install s3s-fs --features binary --root /opt/s3s`,
# once, outside CI), else moto (Python; it saturates two cores near
# 130 MiB/s, so only the ratios at higher delays mean much). In front of it,
# testing's `delay_proxy` (tokio) adds DELAY ms to every request and, as a
# TCP window does, carries at most WINDOW_KIB (default 1024; 0 for
# unlimited) per connection per round trip, so one connection moves
# WINDOW/DELAY per second at most and parallel connections fill the link.
# Prints a
# markdown table: times, marmoset/restic ratios, and GETs per restored GiB
# against packs per GiB. Ratios, not absolute times, are the result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
if [ "$QUICK" = 1 ]; then
    SIZE_MIB=${SIZE_MIB:-48}; DELAYS=${DELAYS:-"0 20"}; CONNS=${CONNS:-"1 8"}
else
    SIZE_MIB=${SIZE_MIB:-256}; DELAYS=${DELAYS:-"0 20 80"}; CONNS=${CONNS:-"1 2 4 8 16"}
fi
WINDOW_KIB=${WINDOW_KIB:-1024}

apt_need restic python3 bc curl
cargo build --release --workspace --all-targets -q
M="$CARGO_TARGET_DIR/release/marmoset"
PROXY_BIN="$CARGO_TARGET_DIR/release/delay_proxy"
export PATH="$PATH:/opt/s3s/bin:/opt/rustic/bin"

W="${BENCH_DIR:-/var/tmp/marmoset-restore-s3}"
rm -rf "$W"; mkdir -p "$W/data/small" "$W/s3"
# The data: many small files and a few large incompressible ones, two of
# them near-duplicates (shared chunks).
python3 - "$W/data" "$SIZE_MIB" <<'PY'
import os, random, sys
root, size = sys.argv[1], int(sys.argv[2]) << 20
r = random.Random(7)
small = size // 3
i = 0
while small > 0:
    n = r.randint(1, 64 << 10)
    d = os.path.join(root, "small", f"d{i % 50}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(os.urandom(n // 2) + bytes(n - n // 2))
    small -= n; i += 1
big = os.urandom((size - size // 3) // 2)
with open(os.path.join(root, "big1.bin"), "wb") as f: f.write(big)
with open(os.path.join(root, "big2.bin"), "wb") as f: f.write(big[: len(big) // 2] + os.urandom(1 << 20) + big[len(big) // 2 :])
PY

S3=$(free_port)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchbenchbench AWS_REGION=us-east-1
if command -v s3s-fs >/dev/null; then
    SERVER="s3s-fs"
    s3s-fs --host 127.0.0.1 --port "$S3" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3" >/dev/null 2>&1 & SRV=$!
else
    need_moto
    SERVER="moto"
    moto_server -H 127.0.0.1 -p "$S3" >/dev/null 2>&1 & SRV=$!
fi
PIDS="$SRV"
trap 'kill $PIDS 2>/dev/null || true' EXIT
wait_http "$S3" || true
mkdir -p "$W/s3/bench"
curl -s -X PUT "http://127.0.0.1:$S3/bench" >/dev/null || true

export MARMOSET_PASSWORD=bench RESTIC_PASSWORD=bench
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$W/last.err" || { cat "$W/last.err" >&2; return 1; }; e=$(date +%s.%N); echo "$e - $s" | bc -l; }

echo
echo "| delay ms | conns | backup marmoset s | restic s | ratio | restore marmoset s | restic s | ratio | GETs/GiB | packs/GiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for d in $DELAYS; do
    PX=$(free_port)
    if [ "$WINDOW_KIB" -gt 0 ] && [ "$d" -gt 0 ]; then
        "$PROXY_BIN" "$PX" "$S3" "$d" "$WINDOW_KIB" >/dev/null & P=$!
    else
        "$PROXY_BIN" "$PX" "$S3" "$d" >/dev/null & P=$!
    fi
    PIDS="$PIDS $P"
    wait_http "$PX" 50 || true
    for n in $CONNS; do
        run="d${d}c${n}"
        MR="s3:http://127.0.0.1:$PX/bench/m-$run"
        RR="s3:http://127.0.0.1:$PX/bench/r-$run"
        "$M" -q --repo "$MR" --cache-dir "$W/mc-$run" init >/dev/null
        mb=$(secs "$M" -q --repo "$MR" --cache-dir "$W/mc-$run" --s3-connections "$n" backup "$W/data")
        # A cold cache, as on the machine that needs its data back. Each
        # restore gets a target of its own, removed only at the end: ext4
        # makes creating files slow for half a minute where many were just
        # deleted, which would tax whichever tool runs next.
        rm -rf "$W/mc-$run"
        s=$(date +%s.%N)
        "$M" --json --repo "$MR" --cache-dir "$W/mc-$run" --s3-connections "$n" restore latest --threads "$n" --target "$W/out/m-$run" >"$W/restore.json"
        e=$(date +%s.%N); mr=$(echo "$e - $s" | bc -l)
        diff -r "$W/data" "$W/out/m-$run" >/dev/null
        gets=$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); b=v["backend"]; print(b["get"]+b["get_range"])' "$W/restore.json")
        packs=$("$M" --json --repo "$MR" --cache-dir "$W/mc-$run" stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["packs"])')
        restic -r "$RR" init >/dev/null 2>&1
        rb=$(secs restic -r "$RR" -o s3.connections="$n" backup "$W/data")
        rr=$(secs restic -r "$RR" -o s3.connections="$n" restore latest --target "$W/out/r-$run")
        diff -r "$W/data" "$W/out/r-$run$W/data" >/dev/null
        gib=$(echo "$SIZE_MIB / 1024" | bc -l)
        printf '| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f |\n' "$d" "$n" \
            "$mb" "$rb" "$(echo "$mb / $rb" | bc -l)" "$mr" "$rr" "$(echo "$mr / $rr" | bc -l)" \
            "$(echo "$gets / $gib" | bc -l)" "$(echo "$packs / $gib" | bc -l)"
    done
    kill "$P" 2>/dev/null || true
    # Free the space before the next delay; then wait out ext4's slow
    # creation near freshly deleted inodes (see above), so the first tool
    # of the next row is not taxed.
    rm -rf "$W/out" "$W"/mc-* "$W/s3/bench/m-d$d"c* "$W/s3/bench/r-d$d"c*
    if [ "$d" != "${DELAYS##* }" ]; then sync; sleep 35; fi
done
echo
echo "(${SIZE_MIB} MiB: a third small files, two large near-duplicates; server: $SERVER on loopback; delay_proxy adds the delay per request and per ${WINDOW_KIB} KiB window per connection (0: no window); restic $(restic version | awk '{print $2}'))"
rm -rf "$W"
