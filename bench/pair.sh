#!/bin/bash
# Paired A/B of two ivnet binaries (root): ROUNDS rounds, each measuring one table row with
# binary A and right after it with binary B (the order alternates between rounds), each call with
# its own veth baseline. On this noisy VM a whole table cannot separate a 10-20% change; the
# ratio to a veth measured seconds before, compared round by round, can.
#
# Usage: sudo bench/pair.sh A_BINARY B_BINARY
#        sudo ROUNDS=8 ROW=ivnet-adaptive-on WORKLOADS="tcp1500 tcp65521 cpu" TCP_CC=cubic \
#            bench/pair.sh /tmp/ivnet-before target/release/ivnet
#
# Environment: ROUNDS (8), ROW (ivnet-doorbell-on; any row of bench/table.sh), WORKLOADS
# ("tcp1500 cpu"), TIME (3), TCP_CC (passed to table.sh; default the host's), OUT (default
# bench/results/pair-<date>/). Writes OUT/pair.md (also printed) and OUT/pair.tsv, and keeps
# every call's table.sh output in OUT/<a|b>-r<round>/. Each call of table.sh cleans up after
# itself; Ctrl-C stops the running call, which cleans up too.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
die() {
    echo "pair: $*" >&2
    exit 1
}
[ $# = 2 ] || die "usage: sudo $0 A_BINARY B_BINARY (see the comment at the top)"
[ "$(id -u)" = 0 ] || die "needs root (bench/table.sh does): sudo $0 $*"
for f in "$1" "$2"; do
    if ! [ -f "$f" ] || ! [ -x "$f" ]; then die "'$f' is not an executable file"; fi
done
A=$(realpath "$1")
B=$(realpath "$2")
ROUNDS=${ROUNDS:-8}
ROW=${ROW:-ivnet-doorbell-on}
WORKLOADS=${WORKLOADS:-tcp1500 cpu}
TIME=${TIME:-3}
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS: give a whole number >= 1"
OUT=${OUT:-$HERE/results/pair-$(date -u +%Y-%m-%dT%H%M)}
mkdir -p "$OUT" || die "cannot create $OUT"

CHILD=""
trap '[ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null; wait; echo "pair: interrupted" >&2; exit 130' INT TERM HUP

printf 'label\tbinary\tround\tworkload\tvalue\tveth\tratio\tcpu_s_per_gb\n' >"$OUT/pair.tsv"
echo "pair: A = $A, B = $B; $ROUNDS rounds of $ROW ($WORKLOADS), TIME=$TIME; output in $OUT" >&2
for round in $(seq 1 "$ROUNDS"); do
    order="a b"
    [ $((round % 2)) = 0 ] && order="b a"
    for label in $order; do
        bin=$A
        [ "$label" = b ] && bin=$B
        dir=$OUT/$label-r$round
        IVNET=$bin ROWS=$ROW WORKLOADS=$WORKLOADS REPS=1 TIME=$TIME OUT=$dir \
            "$HERE/table.sh" >"$dir.log" 2>&1 &
        CHILD=$!
        wait "$CHILD"
        rc=$?
        CHILD=""
        [ "$rc" = 0 ] || echo "pair: round $round, $label: table.sh failed ($dir.log)" >&2
        python3 - "$dir/table.json" "$label" "$bin" "$round" "$ROW" >>"$OUT/pair.tsv" <<'PY'
import json, sys
path, label, binary, rnd, row = sys.argv[1:]
try:
    rows = json.load(open(path))["rows"]
except (OSError, ValueError, KeyError):
    sys.exit(0)  # the failure is reported above; the round is left out
w = rows.get(row, {}).get("workloads", {})
v = rows.get("veth", {}).get("workloads", {})
cpu = w.get("cpu", {}).get("median")
for key, m in w.items():
    if key == "cpu" or m.get("median") is None or v.get(key, {}).get("median") is None:
        continue
    a, b = m["median"], v[key]["median"]
    print(label, binary, rnd, key, a, b, a / b, cpu if key == "tcp1500" else "", sep="\t")
PY
        echo "pair: round $round/$ROUNDS $label done" >&2
    done
done

python3 - "$OUT/pair.tsv" "$A" "$B" "$ROW" >"$OUT/pair.md" <<'PY'
import csv, statistics, sys
path, a_bin, b_bin, row = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
keys = sorted({r["workload"] for r in rows})
lower_better = {"udp-rr-p50", "udp-rr-p99", "switches"}
print(f"## Paired runs of `{row}`: A = `{a_bin}`, B = `{b_bin}`\n")
print("Ratio of each call's figure to veth measured in the same call; median over rounds, then")
print("in how many rounds measured with both B was better than A.\n")
print("| workload | A / veth | B / veth | B over A | B better in |")
print("|---|---|---|---|---|")
for k in keys:
    by = {(r["label"], r["round"]): float(r["ratio"]) for r in rows if r["workload"] == k}
    a = [v for (l, _), v in by.items() if l == "a"]
    b = [v for (l, _), v in by.items() if l == "b"]
    both = [r for (l, r) in by if l == "a" and ("b", r) in by]
    def b_better(r):
        a_q, b_q = by[("a", r)], by[("b", r)]
        return b_q < a_q if k in lower_better else b_q > a_q
    better = sum(1 for r in both if b_better(r))
    if a and b:
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {k} | {ma:.3f} | {mb:.3f} | {mb / ma:.2f}x | {better} of {len(both)} |")
cpu = {l: [float(r["cpu_s_per_gb"]) for r in rows if r["label"] == l and r["cpu_s_per_gb"]]
       for l in ("a", "b")}
if cpu["a"] and cpu["b"]:
    print(f"| CPU s/GB (median) | {statistics.median(cpu['a']):.2f} |"
          f" {statistics.median(cpu['b']):.2f} | | |")
PY
cat "$OUT/pair.md"
