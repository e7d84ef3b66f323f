#!/usr/bin/env bash
# `marmoset copy` against `restic copy`: the same data backed up by each,
# then copied into a second repository of the same tool (its own password,
# chunker parameters shared: `init --copy-chunker-params` in both), local to
# local and local to a loopback S3 server; then a "next day" (new data and a
# few changed files) backed up and copied again.
#
#   benches/copy.sh [--quick]
#   SIZE_MIB=1024 NEW_MIB=64 benches/copy.sh
#
# Reported per phase: wall and CPU seconds and peak RSS (GNU time), the
# marmoset/restic ratio, and for the daily copy the bytes that reached the
# target against the new data (marmoset: its request counters; restic: the
# target's growth on disk or in the bucket). The S3 server is moto
# (it saturates two cores near 130 MiB/s: the S3 ratio says more than its
# times). Writes benches/results/copy-{quick,full}.json. Ratios, not
# absolute times, are the result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
if [ "$QUICK" = 1 ]; then
    SIZE_MIB=${SIZE_MIB:-48}; NEW_MIB=${NEW_MIB:-8}
else
    SIZE_MIB=${SIZE_MIB:-1024}; NEW_MIB=${NEW_MIB:-64}
fi

apt_need restic python3 bc curl time
cargo build --release --bin marmoset -q
M="$CARGO_TARGET_DIR/release/marmoset"

W="${BENCH_DIR:-/var/tmp/marmoset-copy-bench}"
rm -rf "$W"; mkdir -p "$W/data" "$W/times"
# Many small text files, a few large incompressible ones (two of them
# near-duplicates) and compressible logs.
python3 - "$W/data" "$SIZE_MIB" <<'PY'
import os, random, sys
root, size = sys.argv[1], int(sys.argv[2]) << 20
r = random.Random(11)
small = size // 5
i = 0
while small > 0:
    n = r.randint(100, 16 << 10)
    d = os.path.join(root, "src", f"pkg{i % 200}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}.rs"), "wb") as f:
        f.write((b"fn item_%d() -> u64 { %d }\n" % (i, r.randrange(1 << 30))) * (n // 30 + 1))
    small -= n; i += 1
big = size * 3 // 5 // 2
blob = b"".join(r.randbytes(1 << 20) for _ in range(big >> 20))
os.makedirs(os.path.join(root, "big"), exist_ok=True)
with open(os.path.join(root, "big", "a.bin"), "wb") as f: f.write(blob)
with open(os.path.join(root, "big", "b.bin"), "wb") as f: f.write(blob[: big // 2] + r.randbytes(1 << 20) + blob[big // 2 :])
os.makedirs(os.path.join(root, "logs"), exist_ok=True)
with open(os.path.join(root, "logs", "app.log"), "wb") as f:
    n = 0
    while n < size // 5:
        line = b"level=info request_id=%d GET /api/v1/items 200\n" % r.randrange(1 << 40)
        f.write(line); n += len(line)
PY
SIZE=$(du -sb "$W/data" | cut -f1)

S3=$(free_port)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchbenchbench AWS_REGION=us-east-1
need_moto
moto_server -H 127.0.0.1 -p "$S3" >/dev/null 2>&1 & SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
wait_http "$S3" || true
curl -s -X PUT "http://127.0.0.1:$S3/bench" >/dev/null

echo bench > "$W/pw"
export MARMOSET_PASSWORD_FILE="$W/pw" MARMOSET_FROM_PASSWORD_FILE="$W/pw" MARMOSET_CACHE_DIR="$W/mcache"
export RESTIC_PASSWORD_FILE="$W/pw" RESTIC_FROM_PASSWORD_FILE="$W/pw" RESTIC_CACHE_DIR="$W/rcache"

# measure NAME CMD...: GNU time's wall, user, sys, max RSS into times/NAME.
measure() {
    local name=$1; shift
    sync
    /usr/bin/time -f '%e %U %S %M' -o "$W/times/$name" "$@" >"$W/times/$name.out" 2>&1 || {
        echo "$name failed:" >&2; tail -20 "$W/times/$name.out" >&2; exit 1
    }
}

MA="$W/m-a"; RA="$W/r-a"
"$M" -q --repo "$MA" init >/dev/null
restic -q -r "$RA" init >/dev/null
measure m.backup "$M" -q --repo "$MA" backup "$W/data"
measure r.backup restic -q -r "$RA" backup "$W/data"

# s3 growth in bytes under a prefix of the bucket (moto keeps it in memory).
s3_bytes() {
    python3 - "$S3" "$1" <<'PY'
import sys, urllib.request, re
port, prefix = sys.argv[1], sys.argv[2]
total, token = 0, None
while True:
    url = f"http://127.0.0.1:{port}/bench?list-type=2&prefix={prefix}/"
    if token: url += "&continuation-token=" + urllib.request.quote(token)
    body = urllib.request.urlopen(url).read().decode()
    total += sum(int(s) for s in re.findall(r"<Size>(\d+)</Size>", body))
    m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
    if not m: break
    token = m.group(1)
print(total)
PY
}
size_of() { case $1 in s3:*) s3_bytes "${1##*/}" ;; *) du -sb "$1" | cut -f1 ;; esac; }

for kind in local s3; do
    if [ "$kind" = local ]; then MB="$W/m-b"; RB="$W/r-b"
    else MB="s3:http://127.0.0.1:$S3/bench/m-b"; RB="s3:http://127.0.0.1:$S3/bench/r-b"; fi
    "$M" -q --repo "$MB" init --from-repo "$MA" --copy-chunker-params >/dev/null
    restic -q -r "$RB" init --from-repo "$RA" --copy-chunker-params >/dev/null
    measure "m.copy-$kind" "$M" -q --repo "$MB" copy --from-repo "$MA"
    measure "r.copy-$kind" restic -q -r "$RB" copy --from-repo "$RA"
done

# The next day: new data and a few changed small files, backed up by both.
python3 - "$W/data" "$NEW_MIB" <<'PY'
import os, random, sys
root, new = sys.argv[1], int(sys.argv[2]) << 20
r = random.Random(12)
with open(os.path.join(root, "big", "day2.bin"), "wb") as f:
    for _ in range(new >> 20): f.write(r.randbytes(1 << 20))
for i in range(0, 200, 10):
    p = os.path.join(root, "src", f"pkg{i}", f"f{i}.rs")
    if os.path.exists(p):
        with open(p, "ab") as f: f.write(b"// changed\n")
PY
"$M" -q --repo "$MA" backup "$W/data" >/dev/null
restic -q -r "$RA" backup "$W/data" >/dev/null
for kind in local s3; do
    if [ "$kind" = local ]; then MB="$W/m-b"; RB="$W/r-b"
    else MB="s3:http://127.0.0.1:$S3/bench/m-b"; RB="s3:http://127.0.0.1:$S3/bench/r-b"; fi
    mb0=$(size_of "$MB"); rb0=$(size_of "$RB")
    measure "m.daily-$kind" "$M" -q --json --repo "$MB" copy --from-repo "$MA"
    measure "r.daily-$kind" restic -q -r "$RB" copy --from-repo "$RA"
    echo "$(( $(size_of "$MB") - mb0 ))" > "$W/times/m.daily-$kind.grown"
    echo "$(( $(size_of "$RB") - rb0 ))" > "$W/times/r.daily-$kind.grown"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["backend"]["target"]["bytes_up"])' \
        "$W/times/m.daily-$kind.out" > "$W/times/m.daily-$kind.up"
done
# Both copies restore what the source has.
"$M" -q --repo "$W/m-b" restore latest --target "$W/restore-m" >/dev/null
diff -r "$W/data" "$W/restore-m"/ >/dev/null || { echo "marmoset copy restores different data" >&2; exit 1; }
"$M" -q --repo "$W/m-b" check --read-data >/dev/null

mkdir -p benches/results
python3 - "$W/times" "$SIZE" "$NEW_MIB" "$QUICK" "$(restic version | cut -d' ' -f2)" <<'PY'
import json, os, sys, platform
d, size, new_mib, quick, restic = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
def t(name):
    w, u, s, rss = open(os.path.join(d, name)).read().split()
    return {"wall_s": float(w), "cpu_s": float(u) + float(s), "rss_mib": int(rss) / 1024}
def num(name):
    return int(open(os.path.join(d, name)).read().strip())
rows, out = [], {"quick": quick, "dataset_bytes": size, "new_bytes": new_mib << 20,
                 "restic": restic, "machine": platform.node(), "phases": {}}
for phase in ["backup", "copy-local", "copy-s3", "daily-local", "daily-s3"]:
    m, r = t(f"m.{phase}"), t(f"r.{phase}")
    out["phases"][phase] = {"marmoset": m, "restic": r, "ratio": m["wall_s"] / r["wall_s"]}
    rows.append((phase, m, r))
for kind in ["local", "s3"]:
    out["phases"][f"daily-{kind}"].update({
        "marmoset_bytes_up": num(f"m.daily-{kind}.up"),
        "marmoset_target_growth": num(f"m.daily-{kind}.grown"),
        "restic_target_growth": num(f"r.daily-{kind}.grown"),
    })
print(f"\ndataset {size / 2**20:.0f} MiB, next day {new_mib} MiB new{' (quick)' if quick else ''}\n")
print("| phase | marmoset s | cpu/wall | RSS MiB | restic s | cpu/wall | RSS MiB | ratio |")
print("|---|---|---|---|---|---|---|---|")
for phase, m, r in rows:
    print(f"| {phase} | {m['wall_s']:.2f} | {m['cpu_s']/max(m['wall_s'],0.01):.2f} | {m['rss_mib']:.0f} | "
          f"{r['wall_s']:.2f} | {r['cpu_s']/max(r['wall_s'],0.01):.2f} | {r['rss_mib']:.0f} | {m['wall_s']/r['wall_s']:.2f} |")
new = new_mib << 20
for kind in ["local", "s3"]:
    p = out["phases"][f"daily-{kind}"]
    print(f"\ndaily copy {kind}: marmoset sent {p['marmoset_bytes_up'] / new:.3f}x the new data "
          f"(target grew {p['marmoset_target_growth'] / new:.3f}x); restic's target grew {p['restic_target_growth'] / new:.3f}x")
name = "copy-quick.json" if quick else "copy-full.json"
json.dump(out, open(os.path.join("benches/results", name), "w"), indent=1)
PY
[ -n "${KEEP:-}" ] || rm -rf "$W"
