#!/usr/bin/env bash
# Backup at the limits of the machine: marmoset beside restic (and rustic
# when installed) on the cases that stress memory and cores rather than
# average throughput.
#
#   benches/limits.sh [--quick] [--tiny N[,N...]] [--cases tiny,huge,sparse,large,index]
#
#   tiny    N files of 16-600 bytes, 1000 per directory (default 100 000,
#           1 000 000 and 2 000 000; --quick 20 000): initial backup,
#           no-change backup, restore. Peak RSS must not grow with N: the
#           initial backup's peak is also printed against the smallest N's.
#   huge    one incompressible file (4 GiB; --quick 256 MiB): backup. One
#           file must keep every core busy.
#   sparse  one sparse file, 10 GiB holding 64 MiB of data (--quick 1 GiB
#           holding 16 MiB): backup and restore; the restored copy must be
#           sparse as well.
#   large   a tree of a few large files, half of them compressible text
#           (8 x 512 MiB; --quick 4 x 64 MiB): backup.
#   index   a repository of 10 000 000 chunks (--quick 200 000), built by
#           `synth_repo` (two snapshots, 1000 one-chunk files per
#           directory): `check`, then `forget` of one snapshot and
#           `maintain --full`. marmoset only: peers cannot share the data.
#
# The page cache is dropped before every phase. Wall time, CPU seconds
# (user+sys) per wall second, and peak RSS come from GNU time. Prints a
# markdown table with marmoset/peer ratios and writes JSON to
# benches/results/limits-<machine>[-quick].json. Ratios are the result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

QUICK=0
TINY=""
CASES="tiny,huge,sparse,large,index"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --tiny) TINY="$2"; shift ;;
        --cases) CASES="$2"; shift ;;
        *) echo "usage: $0 [--quick] [--tiny N[,N...]] [--cases tiny,huge,sparse,large,index]" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$TINY" ] || TINY=$([ "$QUICK" = 1 ] && echo 20000 || echo 100000,1000000,2000000)

apt_need restic time python3
# The whole workspace, as scripts/test builds it (synth_repo lives in the
# testing crate): building one package alone would resolve other features.
cargo build --release --workspace --all-targets -q
# MARMOSET_BIN: measure a copy of the binary while the tree is rebuilt.
MARMOSET="${MARMOSET_BIN:-$CARGO_TARGET_DIR/release/marmoset}"
export PATH="$PATH:/opt/rustic/bin:$HOME/.cargo/bin"
TOOLS=(marmoset restic)
command -v rustic >/dev/null && TOOLS+=(rustic)

WORK="${BENCH_DIR:-/var/tmp/marmoset-limits}"
mkdir -p "$WORK"
rm -rf "$WORK/repos" "$WORK/restore" "$WORK/cache" "$WORK/times"
mkdir -p "$WORK/repos" "$WORK/restore" "$WORK/cache" "$WORK/times"
echo "benchmark-password" > "$WORK/pw"
export RESTIC_PASSWORD_FILE="$WORK/pw" MARMOSET_PASSWORD_FILE="$WORK/pw" RUSTIC_PASSWORD_FILE="$WORK/pw"
export MARMOSET_CACHE_DIR="$WORK/cache/marmoset" RESTIC_CACHE_DIR="$WORK/cache/restic" RUSTIC_CACHE_DIR="$WORK/cache/rustic"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# measure NAME CMD...: GNU time's wall, user, sys (s) and peak RSS (KiB).
measure() {
    local name=$1
    shift
    drop
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/times/$name" "$@" >"$WORK/times/$name.out" 2>&1 || {
        echo "$name failed:" >&2
        tail -20 "$WORK/times/$name.out" >&2
        exit 1
    }
}

# ---- datasets: generated once per size, kept between runs ----
gen_tiny() { # DIR N
    [ -f "$1/.complete" ] && return 0
    log "generating $2 tiny files in $1"
    rm -rf "$1"
    python3 - "$1" "$2" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
r = random.Random(17)
for d in range((n + 999) // 1000):
    p = os.path.join(root, f"d{d // 100:03d}", f"s{d % 100:02d}")
    os.makedirs(p)
    for i in range(min(1000, n - d * 1000)):
        with open(os.path.join(p, f"f{i:04d}"), "wb") as f:
            f.write(r.randbytes(r.randrange(8, 300)).hex().encode()[: r.randrange(16, 601)])
PY
    touch "$1/.complete"
}

gen_huge() { # DIR MiB
    [ -f "$1/.complete" ] && return 0
    log "generating one incompressible file of $2 MiB"
    rm -rf "$1" && mkdir -p "$1"
    head -c "$(( $2 << 20 ))" /dev/urandom > "$1/huge.bin"
    touch "$1/.complete"
}

gen_sparse() { # DIR MiB-total MiB-data
    [ -f "$1/.complete" ] && return 0
    log "generating a sparse file of $2 MiB holding $3 MiB"
    rm -rf "$1" && mkdir -p "$1"
    python3 - "$1/sparse.img" "$2" "$3" <<'PY'
import os, random, sys
path, total, data = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3]) << 20
r = random.Random(5)
extent = 4 << 20
with open(path, "wb") as f:
    f.truncate(total)
    # data extents spread over the file, like a database's or VM image's
    for k in range(data // extent):
        f.seek((k * (total // (data // extent))) // 4096 * 4096)
        f.write(r.randbytes(extent))
PY
    touch "$1/.complete"
}

gen_large() { # DIR COUNT MiB
    [ -f "$1/.complete" ] && return 0
    log "generating $2 large files of $3 MiB"
    rm -rf "$1" && mkdir -p "$1"
    python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys
root, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
r = random.Random(9)
words = [b"ts=1700000000 ", b"level=info ", b"msg=compacted ", b"block ", b"series=", b"\n"]
for i in range(count):
    with open(os.path.join(root, f"segment{i:02d}"), "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            if i % 2 == 0:
                f.write(r.randbytes(n))
            else:
                buf = bytearray()
                while len(buf) < n:
                    buf += words[r.randrange(len(words))] + str(r.randrange(1 << 40)).encode()
                f.write(bytes(buf[:n]))
            left -= n
PY
    touch "$1/.complete"
}

# run_tool TOOL CASE SRC PHASES: backup [rebackup] [restore] for one tool.
run_tool() {
    local tool=$1 case=$2 src=$3 phases=$4
    local repo="$WORK/repos/$tool-$case" dst="$WORK/restore/$tool-$case"
    rm -rf "$repo" "$dst" "$WORK/cache/$tool"
    case $tool in
        marmoset)
            "$MARMOSET" -q --repo "$repo" init >/dev/null
            B=("$MARMOSET" -q --repo "$repo" backup "$src")
            R=("$MARMOSET" -q --repo "$repo" restore latest --target "$dst") ;;
        restic)
            restic -q -r "$repo" init >/dev/null
            B=(restic -q -r "$repo" backup "$src")
            R=(restic -q -r "$repo" restore latest --target "$dst") ;;
        rustic)
            rustic -q -r "$repo" init >/dev/null 2>&1
            B=(rustic -q -r "$repo" backup "$src")
            R=(rustic -q -r "$repo" restore latest "$dst") ;;
    esac
    measure "$tool.$case.backup" "${B[@]}"
    case " $phases " in *" rebackup "*) measure "$tool.$case.rebackup" "${B[@]}" ;; esac
    case " $phases " in *" restore "*)
        measure "$tool.$case.restore" "${R[@]}"
        # restic and rustic restore the full source path below the target
        local got="$dst"
        [ -d "$dst$src" ] && got="$dst$src"
        diff -rq "$src" "$got" >/dev/null || { echo "$tool $case: restored copy differs" >&2; exit 1; }
        du -sk "$got" | cut -f1 > "$WORK/times/$tool.$case.restore.restored_kib"
        ;;
    esac
    rm -rf "$dst" "$repo"
}

run_case() { # CASE SRC PHASES
    for tool in "${TOOLS[@]}"; do
        log "$1: $tool"
        run_tool "$tool" "$1" "$2" "$3"
    done
}

# run_index N: check and maintain --full on a synthetic repository.
run_index() {
    local n=$1 pristine="$WORK/data/synth-$1" repo="$WORK/repos/marmoset-index$1"
    if [ ! -f "$pristine/.complete" ]; then
        log "generating a repository of $n chunks"
        rm -rf "$pristine" && mkdir -p "$pristine"
        "$CARGO_TARGET_DIR/release/synth_repo" "$pristine/repo" "$WORK/pw" "$pristine/cache" "$n" 2>/dev/null
        touch "$pristine/.complete"
    fi
    rm -rf "$repo" "$WORK/cache/marmoset"
    cp -a "$pristine/repo" "$repo"
    log "index$n: marmoset"
    measure "marmoset.index$n.check" "$MARMOSET" -q --repo "$repo" check
    "$MARMOSET" -q --repo "$repo" forget --keep-tag most >/dev/null
    measure "marmoset.index$n.maintain" "$MARMOSET" -q --repo "$repo" maintain --full
    rm -rf "$repo"
}

RAN=()
IFS=, read -r -a want <<<"$CASES"
for c in "${want[@]}"; do
    case $c in
        tiny)
            IFS=, read -r -a sizes <<<"$TINY"
            for n in "${sizes[@]}"; do
                gen_tiny "$WORK/data/tiny-$n" "$n"
                run_case "tiny$n" "$WORK/data/tiny-$n" "backup rebackup restore"
                RAN+=("tiny$n")
            done ;;
        huge)
            mib=$([ "$QUICK" = 1 ] && echo 256 || echo 4096)
            gen_huge "$WORK/data/huge-$mib" "$mib"
            run_case huge "$WORK/data/huge-$mib" "backup"
            RAN+=(huge) ;;
        sparse)
            read -r total data <<<"$([ "$QUICK" = 1 ] && echo "1024 16" || echo "10240 64")"
            gen_sparse "$WORK/data/sparse-$total" "$total" "$data"
            run_case sparse "$WORK/data/sparse-$total" "backup restore"
            RAN+=(sparse) ;;
        large)
            read -r count mib <<<"$([ "$QUICK" = 1 ] && echo "4 64" || echo "8 512")"
            gen_large "$WORK/data/large-$count-$mib" "$count" "$mib"
            run_case large "$WORK/data/large-$count-$mib" "backup"
            RAN+=(large) ;;
        index)
            n=$([ "$QUICK" = 1 ] && echo 200000 || echo 10000000)
            run_index "$n"
            RAN+=("index$n") ;;
        *) echo "unknown case $c" >&2; exit 2 ;;
    esac
done

RESULT="benches/results/limits-$(hostname -s)$([ "$QUICK" = 1 ] && echo -quick || true).json"
python3 - "$WORK/times" "$RESULT" "$QUICK" "${TOOLS[*]}" "${RAN[*]}" <<'PY'
import json, os, platform, subprocess, sys
times, out, quick, tools, cases = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4].split(), sys.argv[5].split()
def read(tool, case, phase):
    p = os.path.join(times, f"{tool}.{case}.{phase}")
    if not os.path.exists(p):
        return None
    wall, user, sys_, rss = open(p).read().split()[-4:]
    wall, cpu = float(wall), float(user) + float(sys_)
    r = {"wall_s": wall, "cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / wall, 2) if wall > 0 else None,
         "peak_rss_mib": round(int(rss) / 1024, 1)}
    kib = p + ".restored_kib"
    if os.path.exists(kib):
        r["restored_allocated_mib"] = round(int(open(kib).read()) / 1024, 1)
    return r
def version(tool):
    try:
        return subprocess.run([tool, "version" if tool != "marmoset" else "--version"], capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"
res = {"machine": platform.node(), "cores": os.cpu_count(), "quick": quick,
       "versions": {t: version(t) for t in tools}, "cases": {}}
print("| case | phase | marmoset wall | CPU/wall | peak RSS | " + " | ".join(f"vs {t} (wall, RSS)" for t in tools[1:]) + " |")
print("|---|---|---|---|---|" + "---|" * (len(tools) - 1))
for case in cases:
    res["cases"][case] = {}
    for phase in ["backup", "rebackup", "restore", "check", "maintain"]:
        figs = {t: read(t, case, phase) for t in tools}
        if not figs.get("marmoset"):
            continue
        res["cases"][case][phase] = figs
        m = figs["marmoset"]
        cells = []
        for t in tools[1:]:
            p = figs.get(t)
            cells.append(f"{m['wall_s'] / p['wall_s']:.2f}x, {m['peak_rss_mib'] / p['peak_rss_mib']:.2f}x" if p else "-")
        extra = f" ({m['restored_allocated_mib']} MiB allocated)" if "restored_allocated_mib" in m else ""
        print(f"| {case} | {phase} | {m['wall_s']:.1f} s{extra} | {m['cpu_per_wall']} | {m['peak_rss_mib']:.0f} MiB | " + " | ".join(cells) + " |")
tiny = sorted((int(c[4:]), c) for c in cases if c.startswith("tiny") and res["cases"][c].get("backup"))
if len(tiny) > 1:
    base_n, base = tiny[0]
    base_rss = res["cases"][base]["backup"]["marmoset"]["peak_rss_mib"]
    res["tiny_rss_growth"] = {}
    for n, c in tiny[1:]:
        ratio = res["cases"][c]["backup"]["marmoset"]["peak_rss_mib"] / base_rss
        res["tiny_rss_growth"][c] = round(ratio, 3)
        print(f"marmoset initial backup peak RSS, {n} files / {base_n} files: {ratio:.2f}x")
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(f"\nratios are marmoset / peer: below 1 is better. JSON: {out}")
PY
