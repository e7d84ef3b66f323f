#!/usr/bin/env bash
# End-to-end comparison: marmoset vs restic (and borg when installed) on the
# same deterministic dataset, same disk, encryption on.
#
#   benches/e2e.sh [--quick] [--keep]
#
# Phases: initial backup, no-change backup, full restore. For each tool and
# phase it records wall time, CPU time (user+sys) and peak RSS with GNU time,
# then prints a markdown table with marmoset/peer ratios and writes JSON to
# benches/results/. Page cache is warm for every tool alike (the dataset is
# generated just before). Ratios, not absolute times, are the result: the
# machine is shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

QUICK=0
KEEP=0
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        --keep) KEEP=1 ;;
        *) echo "usage: $0 [--quick] [--keep]" >&2; exit 2 ;;
    esac
done

apt_need restic time python3
cargo build --release --bin marmoset
MARMOSET="$CARGO_TARGET_DIR/release/marmoset"

WORK="${BENCH_DIR:-/var/tmp/marmoset-e2e}"
rm -rf "$WORK/repos" "$WORK/restore" "$WORK/cache" "$WORK/times"
mkdir -p "$WORK/repos" "$WORK/restore" "$WORK/times" "$WORK/cache"
DATA="$WORK/data-$QUICK"

# ---- dataset (deterministic, reused between runs) ----
if [ ! -f "$DATA/.complete" ]; then
    log "generating dataset in $DATA"
    rm -rf "$DATA"
    python3 - "$DATA" "$QUICK" <<'PY'
import os, random, sys
root, quick = sys.argv[1], sys.argv[2] == "1"
scale = 16 if quick else 1
r = random.Random(42)
words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"level=info ", b"request_id=", b"GET /api/v1/items ", b"200 ", b"\n"]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += words[r.randrange(len(words))]
        if r.random() < 0.1:
            out += str(r.randrange(1 << 30)).encode()
    return bytes(out[:n])
def noise(n):
    return r.randbytes(n)
# many small source-like files
src = os.path.join(root, "src")
nfiles = 30000 // scale
for i in range(nfiles):
    d = os.path.join(src, f"pkg{i % 300:03d}", f"mod{i % 17:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i:06d}.rs"), "wb") as f:
        f.write(text(r.randrange(200, 16000)))
# large incompressible files
big = os.path.join(root, "big")
os.makedirs(big, exist_ok=True)
for i in range(3):
    with open(os.path.join(big, f"blob{i}.bin"), "wb") as f:
        for _ in range(400 // scale):
            f.write(noise(1 << 20))
# compressible logs
logs = os.path.join(root, "logs")
os.makedirs(logs, exist_ok=True)
for i in range(6):
    with open(os.path.join(logs, f"app{i}.log"), "wb") as f:
        for _ in range(50 // scale):
            f.write(text(1 << 20))
# near-duplicate of a large file: same bytes with a few changed regions
with open(os.path.join(big, "blob0.bin"), "rb") as f:
    data = bytearray(f.read())
for k in range(8):
    pos = r.randrange(len(data) - 65536)
    data[pos:pos + 65536] = noise(65536)
with open(os.path.join(big, "blob0-near-copy.bin"), "wb") as f:
    f.write(data)
PY
    touch "$DATA/.complete"
fi
SIZE=$(du -sb --exclude=.complete "$DATA" | cut -f1)
log "dataset: $(numfmt --to=iec "$SIZE")B in $(find "$DATA" -type f | wc -l) files"

echo "benchmark-password" > "$WORK/pw"
export RESTIC_PASSWORD_FILE="$WORK/pw" MARMOSET_PASSWORD_FILE="$WORK/pw"
export MARMOSET_CACHE_DIR="$WORK/cache/marmoset" RESTIC_CACHE_DIR="$WORK/cache/restic"
export BORG_PASSPHRASE="benchmark-password" BORG_CACHE_DIR="$WORK/cache/borg" BORG_BASE_DIR="$WORK/cache/borgbase"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

# measure TOOL PHASE CMD...: runs CMD under GNU time, records wall/cpu/rss.
measure() {
    local tool=$1 phase=$2
    shift 2
    sync
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/times/$tool.$phase" "$@" >"$WORK/times/$tool.$phase.out" 2>&1 || {
        echo "$tool $phase failed:" >&2
        tail -20 "$WORK/times/$tool.$phase.out" >&2
        exit 1
    }
}

TOOLS=(marmoset restic)
command -v borg >/dev/null && TOOLS+=(borg)
command -v rustic >/dev/null && TOOLS+=(rustic)

for tool in "${TOOLS[@]}"; do
    repo="$WORK/repos/$tool"
    dst="$WORK/restore/$tool"
    log "$tool"
    case $tool in
        marmoset)
            "$MARMOSET" -q --repo "$repo" init >/dev/null
            measure $tool backup "$MARMOSET" -q --repo "$repo" backup "$DATA"
            measure $tool rebackup "$MARMOSET" -q --repo "$repo" backup "$DATA"
            measure $tool restore "$MARMOSET" -q --repo "$repo" restore latest --target "$dst"
            ;;
        restic)
            restic -q -r "$repo" init >/dev/null
            measure $tool backup restic -q -r "$repo" backup "$DATA"
            measure $tool rebackup restic -q -r "$repo" backup "$DATA"
            measure $tool restore restic -q -r "$repo" restore latest --target "$dst"
            ;;
        rustic)
            rustic -r "$repo" init >/dev/null 2>&1
            measure $tool backup rustic -r "$repo" backup "$DATA"
            measure $tool rebackup rustic -r "$repo" backup "$DATA"
            measure $tool restore rustic -r "$repo" restore latest "$dst"
            ;;
        borg)
            borg init -e repokey-blake2 "$repo" >/dev/null 2>&1
            measure $tool backup borg create --compression zstd,3 "$repo::a" "$DATA"
            measure $tool rebackup borg create --compression zstd,3 "$repo::b" "$DATA"
            mkdir -p "$dst"
            measure $tool restore sh -c "cd '$dst' && borg extract '$repo::b'"
            ;;
    esac
    du -sb "$repo" | cut -f1 > "$WORK/times/$tool.reposize"
    # Every tool must restore the data exactly.
    case $tool in
        restic|rustic) got="$dst$DATA" ;;
        borg) got="$dst$DATA" ;;
        *) got="$dst" ;;
    esac
    diff -r -q "$DATA" "$got" >/dev/null || { echo "$tool restored data differs" >&2; exit 1; }
    rm -rf "$dst"
done

python3 - "$WORK/times" "$SIZE" "$QUICK" "${TOOLS[@]}" <<'PY'
import json, os, platform, subprocess, sys, datetime
times, size, quick, tools = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
phases = ["backup", "rebackup", "restore"]
res = {}
for t in tools:
    res[t] = {}
    for p in phases:
        wall, user, sys_, rss = open(os.path.join(times, f"{t}.{p}")).read().split()[-4:]
        res[t][p] = {"wall_s": float(wall), "cpu_s": float(user) + float(sys_), "peak_rss_kib": int(rss)}
    res[t]["repo_bytes"] = int(open(os.path.join(times, f"{t}.reposize")).read())
m = res["marmoset"]
print(f"\ndataset {size / 2**30:.2f} GiB{' (quick)' if quick else ''}\n")
hdr = "| phase | " + " | ".join(f"{t} wall s / cpu s / RSS MiB" for t in tools) + " | " + " | ".join(f"marmoset/{t} time" for t in tools if t != "marmoset") + " |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
for p in phases:
    cells = [f"{res[t][p]['wall_s']:.2f} / {res[t][p]['cpu_s']:.2f} / {res[t][p]['peak_rss_kib'] / 1024:.0f}" for t in tools]
    ratios = [f"{m[p]['wall_s'] / max(res[t][p]['wall_s'], 1e-9):.2f}x" for t in tools if t != "marmoset"]
    print(f"| {p} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
print("| repo size MiB | " + " | ".join(f"{res[t]['repo_bytes'] / 2**20:.0f}" for t in tools) + " | " + " | ".join(f"{m['repo_bytes'] / res[t]['repo_bytes']:.2f}x" for t in tools if t != "marmoset") + " |")
print("\nratios < 1 mean marmoset is faster/smaller.")
def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"
out = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "quick": quick, "dataset_bytes": size,
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu": next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")},
    "versions": {t: ver([t, "version"] if t in ("restic", "rustic") else [t, "--version"]) for t in tools},
    "results": res,
}
os.makedirs("benches/results", exist_ok=True)
name = f"benches/results/e2e-{datetime.date.today().isoformat()}{'-quick' if quick else ''}.json"
json.dump(out, open(name, "w"), indent=2)
print(f"wrote {name}")
PY
[ "$KEEP" = 1 ] || rm -rf "$WORK/repos" "$WORK/cache"
