#!/usr/bin/env bash
# marmoset against restic, borg and rustic, side by side, on the same
# deterministic dataset, on the same disk, encryption on for every tool.
#
#   benches/compare.sh [--quick] [--keep] [--install-rustic]
#
# Phases: initial backup, no-change backup, incremental backup after a
# mutation (files changed/added/removed, and `pgbench -t` on a PostgreSQL
# data directory when PostgreSQL is installed), full restore (verified with
# diff -r), FUSE sequential read of a large file and `ls -R` through the
# mount (page cache dropped first), forget all but the newest snapshot +
# full prune/maintenance, check. Wall time, CPU time (user+sys) and peak RSS
# come from GNU time; repository sizes from du. Prints a markdown table with
# marmoset/peer ratios and writes JSON (machine, versions, figures) to
# benches/results/. Ratios, not absolute times, are the result.
#
# Peers missing from the machine are installed from Debian (restic, borg);
# rustic is used when on PATH or in /opt/rustic/bin and installed from
# crates.io only with --install-rustic (about 18 minutes). A tool that is
# not available is reported and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

QUICK=0
KEEP=0
INSTALL_RUSTIC=0
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        --keep) KEEP=1 ;;
        --install-rustic) INSTALL_RUSTIC=1 ;;
        *) echo "usage: $0 [--quick] [--keep] [--install-rustic]" >&2; exit 2 ;;
    esac
done

apt_need restic borgbackup time python3 fuse3 bc
cargo build --release --bin marmoset -q
MARMOSET="$CARGO_TARGET_DIR/release/marmoset"
export PATH="$PATH:/opt/rustic/bin:$HOME/.cargo/bin"
if ! command -v rustic >/dev/null && [ "$INSTALL_RUSTIC" = 1 ]; then
    log "installing rustic from crates.io (slow)"
    cargo install rustic-rs --locked --root /opt/rustic -q || true
fi

WORK="${BENCH_DIR:-/var/tmp/marmoset-compare}"
for mp in "$WORK"/mnt/*; do fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true; done
rm -rf "$WORK/repos" "$WORK/restore" "$WORK/cache" "$WORK/times" "$WORK/mnt" "$WORK/data"
mkdir -p "$WORK/repos" "$WORK/restore" "$WORK/times" "$WORK/cache" "$WORK/mnt"
chmod 755 "$WORK" # the PostgreSQL server runs as postgres
BASE="$WORK/base-$QUICK"
DATA="$WORK/data"
PGPORT=54329
PG=0
command -v initdb >/dev/null && command -v pgbench >/dev/null && command -v pg_ctl >/dev/null && id postgres >/dev/null 2>&1 && PG=1
[ "$PG" = 0 ] && [ -d /usr/lib/postgresql ] && PATH="$PATH:$(ls -d /usr/lib/postgresql/*/bin | tail -1)" && \
    command -v initdb >/dev/null && command -v pgbench >/dev/null && id postgres >/dev/null 2>&1 && PG=1

pg() { # pg start|stop: the benchmark's PostgreSQL on the dataset's data directory
    case $1 in
        start) touch "$WORK/pg.log"; chown postgres "$WORK/pg.log"
            su postgres -c "pg_ctl -D '$DATA/pg' -o '-k /tmp -p $PGPORT -c listen_addresses=' -w -l '$WORK/pg.log' start" >/dev/null ;;
        stop) su postgres -c "pg_ctl -D '$DATA/pg' -m fast -w stop" >/dev/null ;;
    esac
}

# ---- dataset: generated once (deterministic), copied fresh for every run ----
if [ ! -f "$BASE/.complete" ]; then
    log "generating dataset in $BASE"
    rm -rf "$BASE"
    python3 - "$BASE" "$QUICK" <<'PY'
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
# many small files, like a source tree
src = os.path.join(root, "src")
nfiles = 100000 // (scale * 2) if quick else 100000
for i in range(nfiles):
    d = os.path.join(src, f"pkg{i % 500:03d}", f"mod{i % 17:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i:06d}.rs"), "wb") as f:
        f.write(text(r.randrange(100, 6000)))
# large incompressible files
big = os.path.join(root, "big")
os.makedirs(big, exist_ok=True)
for i in range(3):
    with open(os.path.join(big, f"blob{i}.bin"), "wb") as f:
        for _ in range(400 // scale):
            f.write(r.randbytes(1 << 20))
# compressible logs
logs = os.path.join(root, "logs")
os.makedirs(logs, exist_ok=True)
for i in range(6):
    with open(os.path.join(logs, f"app{i}.log"), "wb") as f:
        for _ in range(50 // scale):
            f.write(text(1 << 20))
# near-duplicate of a large file: the same bytes with a few changed regions
with open(os.path.join(big, "blob0.bin"), "rb") as f:
    data = bytearray(f.read())
for k in range(8):
    pos = r.randrange(len(data) - 65536)
    data[pos:pos + 65536] = r.randbytes(65536)
with open(os.path.join(big, "blob0-near-copy.bin"), "wb") as f:
    f.write(data)
PY
    if [ "$PG" = 1 ]; then
        log "pgbench -i (PostgreSQL data directory)"
        mkdir -p "$BASE/pg" && chown postgres "$BASE/pg" && chmod 700 "$BASE/pg"
        su postgres -c "initdb -D '$BASE/pg' -A trust" >/dev/null
        DATA_SAVE=$DATA; DATA=$BASE; pg start
        pgbench -h /tmp -p $PGPORT -U postgres -q -i -s "$([ "$QUICK" = 1 ] && echo 2 || echo 30)" postgres >/dev/null 2>&1
        pg stop; DATA=$DATA_SAVE
    fi
    touch "$BASE/.complete"
fi
cp -a "$BASE" "$DATA"
rm -f "$DATA/.complete"
[ -d "$DATA/pg" ] && PG=1 || PG=0
SIZE=$(du -sb "$DATA" | cut -f1)
NFILES=$(find "$DATA" -type f | wc -l)
log "dataset: $(numfmt --to=iec "$SIZE")B in $NFILES files$([ "$PG" = 1 ] && echo ", with a PostgreSQL data directory")"

mutate() { # the same change for every tool: files edited, added, removed; pgbench -t
    python3 - "$DATA" <<'PY'
import os, random, sys
root = sys.argv[1]
r = random.Random(7)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "src")) for f in fs)
for p in files[::97]:
    with open(p, "ab") as f:
        f.write(b"// changed\n")
for p in files[13::211]:
    os.remove(p)
new = os.path.join(root, "src", "new")
os.makedirs(new, exist_ok=True)
for i in range(200):
    with open(os.path.join(new, f"n{i}.rs"), "wb") as f:
        f.write(r.randbytes(64).hex().encode() * r.randrange(1, 40))
with open(os.path.join(root, "logs", "app0.log"), "ab") as f:
    f.write(b"level=info appended line\n" * 200000)
with open(os.path.join(root, "big", "blob1.bin"), "r+b") as f:
    size = f.seek(0, 2)
    for k in range(4):
        f.seek(r.randrange(size - 4096))
        f.write(r.randbytes(4096))
PY
    if [ "$PG" = 1 ]; then
        pg start
        pgbench -h /tmp -p $PGPORT -U postgres -c 2 -t "$([ "$QUICK" = 1 ] && echo 200 || echo 3000)" postgres >"$WORK/pgbench.out" 2>&1 ||
            { pg stop; cat "$WORK/pgbench.out" >&2; exit 1; }
        pg stop
    fi
}

echo "benchmark-password" > "$WORK/pw"
export RESTIC_PASSWORD_FILE="$WORK/pw" MARMOSET_PASSWORD_FILE="$WORK/pw"
export MARMOSET_CACHE_DIR="$WORK/cache/marmoset" RESTIC_CACHE_DIR="$WORK/cache/restic"
export RUSTIC_PASSWORD_FILE="$WORK/pw" RUSTIC_CACHE_DIR="$WORK/cache/rustic"
export BORG_PASSPHRASE="benchmark-password" BORG_CACHE_DIR="$WORK/cache/borg" BORG_BASE_DIR="$WORK/cache/borgbase"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# measure TOOL PHASE CMD...: CMD under GNU time -> wall, user, sys, max RSS.
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

wait_for() { for _ in $(seq 1 300); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }

# fuse TOOL MOUNTPOINT DATAROOT-IN-MOUNT MOUNT-CMD...: sequential read of
# the big file and ls -R of the small files, page cache dropped first.
fuse() {
    local tool=$1 mp=$2 root=$3
    shift 3
    mkdir -p "$mp"
    "$@" >"$WORK/times/$tool.mount.out" 2>&1 &
    local pid=$!
    if ! wait_for "$root/big/blob2.bin"; then
        log "$tool: mount did not come up, FUSE phases not measured"
        kill $pid 2>/dev/null || true; fusermount3 -u -z "$mp" 2>/dev/null || true
        return 0
    fi
    drop; measure "$tool" fuse_read dd if="$root/big/blob2.bin" of=/dev/null bs=1M
    cmp -s "$root/big/blob2.bin" "$DATA/big/blob2.bin" || { echo "$tool: FUSE read differs" >&2; exit 1; }
    drop; measure "$tool" fuse_ls ls -R "$root/src"
    fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
}

TOOLS=(marmoset restic borg)
SKIPPED=()
if command -v rustic >/dev/null; then TOOLS+=(rustic); else SKIPPED+=("rustic (not installed - run with --install-rustic)"); fi
command -v borg >/dev/null || { TOOLS=(marmoset restic); SKIPPED+=("borg (not installable)"); }

for tool in "${TOOLS[@]}"; do
    rm -rf "$DATA"; cp -a "$BASE" "$DATA"; rm -f "$DATA/.complete"
    repo="$WORK/repos/$tool"
    dst="$WORK/restore/$tool"
    mp="$WORK/mnt/$tool"
    log "$tool"
    case $tool in
        marmoset)
            M() { "$MARMOSET" -q --repo "$repo" "$@"; }
            M init >/dev/null
            measure $tool backup "$MARMOSET" -q --repo "$repo" backup "$DATA"
            measure $tool rebackup "$MARMOSET" -q --repo "$repo" backup "$DATA"
            du -sb "$repo" | cut -f1 > "$WORK/times/$tool.size_initial"
            mutate
            measure $tool incremental "$MARMOSET" -q --repo "$repo" backup "$DATA"
            measure $tool restore "$MARMOSET" -q --repo "$repo" restore latest --target "$dst"
            got="$dst"
            fuse $tool "$mp" "$mp/snapshots/$(M --json snapshots | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"][:8])')" \
                "$MARMOSET" -q --repo "$repo" mount "$mp"
            measure $tool prune sh -c "'$MARMOSET' -q --repo '$repo' forget --keep-last 1 >/dev/null &&
                '$MARMOSET' -q --repo '$repo' maintain --full --safety-margin 0s >/dev/null &&
                '$MARMOSET' -q --repo '$repo' maintain --full --safety-margin 0s >/dev/null"
            measure $tool check "$MARMOSET" -q --repo "$repo" check
            ;;
        restic)
            restic -q -r "$repo" init >/dev/null
            measure $tool backup restic -q -r "$repo" backup "$DATA"
            measure $tool rebackup restic -q -r "$repo" backup "$DATA"
            du -sb "$repo" | cut -f1 > "$WORK/times/$tool.size_initial"
            mutate
            measure $tool incremental restic -q -r "$repo" backup "$DATA"
            measure $tool restore restic -q -r "$repo" restore latest --target "$dst"
            got="$dst$DATA"
            fuse $tool "$mp" "$mp/snapshots/latest$DATA" restic -q -r "$repo" mount "$mp"
            measure $tool prune restic -q -r "$repo" forget --keep-last 1 --prune
            measure $tool check restic -q -r "$repo" check
            ;;
        rustic)
            rustic -r "$repo" init >/dev/null 2>&1
            measure $tool backup rustic -r "$repo" backup "$DATA"
            measure $tool rebackup rustic -r "$repo" backup "$DATA"
            du -sb "$repo" | cut -f1 > "$WORK/times/$tool.size_initial"
            mutate
            measure $tool incremental rustic -r "$repo" backup "$DATA"
            measure $tool restore rustic -r "$repo" restore latest "$dst"
            got="$dst"
            [ -d "$dst$DATA" ] && got="$dst$DATA"
            measure $tool prune rustic -r "$repo" forget --keep-last 1 --prune
            measure $tool check rustic -r "$repo" check
            ;;
        borg)
            borg init -e repokey-blake2 "$repo" >/dev/null 2>&1
            measure $tool backup borg create --compression zstd,3 "$repo::a" "$DATA"
            measure $tool rebackup borg create --compression zstd,3 "$repo::b" "$DATA"
            du -sb "$repo" | cut -f1 > "$WORK/times/$tool.size_initial"
            mutate
            measure $tool incremental borg create --compression zstd,3 "$repo::c" "$DATA"
            mkdir -p "$dst"
            measure $tool restore sh -c "cd '$dst' && borg extract '$repo::c'"
            got="$dst$DATA"
            fuse $tool "$mp" "$mp$DATA" borg mount -f "$repo::c" "$mp"
            measure $tool prune sh -c "borg prune --keep-last 1 '$repo' && borg compact '$repo'"
            measure $tool check borg check "$repo"
            ;;
    esac
    du -sb "$repo" | cut -f1 > "$WORK/times/$tool.size_final"
    # Every tool must have restored the mutated data exactly.
    diff -r -q --no-dereference "$DATA" "$got" >/dev/null || { echo "$tool restored data differs" >&2; diff -r -q "$DATA" "$got" | head >&2; exit 1; }
    rm -rf "$dst"
done

MARMOSET_BIN="$MARMOSET" python3 - "$WORK/times" "$SIZE" "$NFILES" "$QUICK" "$PG" "$(IFS=';'; echo "${SKIPPED[*]:-}")" "${TOOLS[@]}" <<'PY'
import json, os, platform, subprocess, sys, datetime
times, size, nfiles, quick, pg, skipped, tools = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1", sys.argv[6], sys.argv[7:]
phases = ["backup", "rebackup", "incremental", "restore", "fuse_read", "fuse_ls", "prune", "check"]
res = {}
for t in tools:
    res[t] = {}
    for p in phases:
        f = os.path.join(times, f"{t}.{p}")
        if not os.path.exists(f):
            continue
        wall, user, sys_, rss = open(f).read().split()[-4:]
        res[t][p] = {"wall_s": float(wall), "cpu_s": float(user) + float(sys_), "peak_rss_kib": int(rss)}
    for k in ("size_initial", "size_final"):
        res[t][k] = int(open(os.path.join(times, f"{t}.{k}")).read())
m = res["marmoset"]
peers = [t for t in tools if t != "marmoset"]
print(f"\ndataset {size / 2**30:.2f} GiB, {nfiles} files{' (quick)' if quick else ''}{', PostgreSQL data directory + pgbench mutation' if pg else ''}\n")
hdr = "| phase | " + " | ".join(f"{t} wall s / cpu s / RSS MiB" for t in tools) + " | " + " | ".join(f"marmoset/{t} wall" for t in peers) + " |"
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
def cell(t, p):
    r = res[t].get(p)
    if not r:
        return "n/a"
    if p.startswith("fuse"):
        return f"{r['wall_s']:.2f}"
    return f"{r['wall_s']:.2f} / {r['cpu_s']:.2f} / {r['peak_rss_kib'] / 1024:.0f}"
def ratio(t, p):
    a, b = m.get(p), res[t].get(p)
    if not a or not b:
        return "n/a"
    return f"{a['wall_s'] / max(b['wall_s'], 1e-3):.2f}x"
names = {"backup": "initial backup", "rebackup": "no-change backup", "incremental": "incremental after mutation",
         "restore": "full restore", "fuse_read": "FUSE read of a large file (wall s)", "fuse_ls": "FUSE ls -R (wall s)",
         "prune": "forget + prune/maintenance", "check": "check"}
for p in phases:
    print(f"| {names[p]} | " + " | ".join(cell(t, p) for t in tools) + " | " + " | ".join(ratio(t, p) for t in peers) + " |")
for k, label in (("size_initial", "repository MiB after first backups"), ("size_final", "repository MiB after prune")):
    print(f"| {label} | " + " | ".join(f"{res[t][k] / 2**20:.0f}" for t in tools) + " | " + " | ".join(f"{m[k] / res[t][k]:.2f}x" for t in peers) + " |")
print("\nratios < 1 mean marmoset is faster or smaller.")
if skipped:
    print("skipped: " + skipped.replace(";", ", "))
def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"
versions = {t: ver([t, "version"] if t in ("restic",) else [t, "--version"]) for t in tools if t != "marmoset"}
versions["marmoset"] = ver([os.environ.get("MARMOSET_BIN", "marmoset"), "--version"])
out = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "quick": quick, "dataset_bytes": size, "dataset_files": nfiles, "postgresql": pg,
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                "cpu": next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    "versions": versions, "skipped": [s for s in skipped.split(";") if s],
    "results": res,
}
os.makedirs("benches/results", exist_ok=True)
name = f"benches/results/compare-{datetime.date.today().isoformat()}{'-quick' if quick else ''}.json"
json.dump(out, open(name, "w"), indent=2)
print(f"wrote {name}")
PY
rm -rf "$DATA"
[ "$KEEP" = 1 ] || rm -rf "$WORK/repos" "$WORK/cache"
