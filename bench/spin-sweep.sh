#!/bin/bash
# Measures the agent's spin window (--spin-us) to choose its default: for each window, runs
# netbench.sh's `ivnet-spin` mode beside veth (one netbench run per window and round, so every
# figure has a baseline measured minutes apart at most), ROUNDS times with the windows
# interleaved so that background load spreads evenly over them, and prints per window the
# medians over the rounds: UDP round trip (sockperf ping-pong p50), ping average, TCP
# throughput and agent CPU, each beside veth as a ratio.
#
# Usage: bench/spin-sweep.sh [US...]          (default: 0 10 25 50 100 200; root)
#
# Environment: ROUNDS=5, TIME=3 (seconds per iperf3 and sockperf run), OUT=DIR to keep the raw
# netbench results (default: a temporary directory, removed); MTU, IVNET, IVNET_AGENT_ARGS as
# for netbench.sh.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-5}
TIME=${TIME:-3}
[ $# -gt 0 ] || set -- 0 10 25 50 100 200
KEEP=1
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/ivnet-spin-sweep.XXXXXX")
    KEEP=0
fi
mkdir -p "$OUT"
trap '[ "$KEEP" = 1 ] || rm -rf "$OUT"' EXIT
trap 'exit 130' INT TERM
command -v sockperf >/dev/null || echo "spin-sweep: sockperf is not installed: no UDP round trips" >&2

median() { sort -n | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
minmax() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {if (NR) printf "%s-%s", lo, hi; else printf "-"}'; }
# ping_avg FILE: the average of ping's "rtt min/avg/max/mdev = a/b/c/d ms" line, in us.
ping_avg() { sed -n 's|.* = [0-9.]*/\([0-9.]*\)/.*|\1|p' "$1" 2>/dev/null | awk '{printf "%.0f\n", $1 * 1000}'; }

echo "spin-sweep $(date -u +%Y-%m-%dT%H:%MZ): windows $* us; $ROUNDS rounds of netbench.sh ivnet-spin" \
    "beside veth, TIME=$TIME; $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    for us in "$@"; do
        d=$OUT/$us.$r
        if ! OUT=$d SPIN_US=$us REPS=1 TIME=$TIME SOCKPERF=1 "$HERE/netbench.sh" ivnet-spin \
            >"$d.log" 2>&1; then
            echo "spin-sweep: round $r, --spin-us $us failed (see $d.log)" >&2
        fi
        # One line per run: window, UDP RTT ivnet, veth; ping avg ivnet, veth; TCP ivnet, veth;
        # agent CPU; UDP RTT p90 ivnet.
        echo "$us $(cat "$d/ivnet-spin.udp" 2>/dev/null || echo -) $(cat "$d/veth.udp" 2>/dev/null || echo -)" \
            "$(ping_avg "$d/ivnet-spin.ping" || echo -) $(ping_avg "$d/veth.ping" || echo -)" \
            "$(awk '{print $1}' "$d/ivnet-spin.tcp" 2>/dev/null || echo -)" \
            "$(awk '{print $1}' "$d/veth.tcp" 2>/dev/null || echo -)" \
            "$(cat "$d/ivnet-spin.agentcpu" 2>/dev/null || echo -)" \
            "$(awk '/percentile 90.000 =/ {print 2 * $NF}' "$d/ivnet-spin.sockperf.1" 2>/dev/null || echo -)" \
            >>"$OUT/runs"
    done
    echo "round $r of $ROUNDS done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
done

printf '\n%8s %12s %22s %12s %11s %10s %10s %9s %9s\n' "spin-us" "UDP RTT p50" \
    "UDP/veth med [min-max]" "UDP RTT p90" "ping avg" "ping/veth" "TCP Gb/s" "TCP/veth" "agent CPU"
for us in "$@"; do
    rows=$(awk -v u="$us" '$1 == u && $2 != "-" && $3 != "-"' "$OUT/runs")
    [ -n "$rows" ] || { printf '%8s %12s\n' "$us" "(no data)"; continue; }
    udp=$(awk '{print $2}' <<<"$rows" | median)
    r_udp=$(awk '{printf "%.2f\n", $2 / $3}' <<<"$rows" | median)
    r_rng=$(awk '{printf "%.2f\n", $2 / $3}' <<<"$rows" | minmax)
    ping=$(awk '$4 != "-" {print $4}' <<<"$rows" | median)
    r_ping=$(awk '$4 != "-" && $5 > 0 {printf "%.2f\n", $4 / $5}' <<<"$rows" | median)
    tcp=$(awk '$6 != "-" {printf "%.2f\n", $6}' <<<"$rows" | median)
    r_tcp=$(awk '$6 != "-" && $7 > 0 {printf "%.2f\n", $6 / $7}' <<<"$rows" | median)
    cpu=$(awk '$8 != "-" {print $8}' <<<"$rows" | median)
    p90=$(awk '$9 != "" && $9 != "-" {print $9}' <<<"$rows" | median)
    printf '%8s %12s %22s %12s %11s %10s %10s %9s %9s\n' "$us" "$udp" "$r_udp [$r_rng]" "$p90" \
        "$ping" "$r_ping" "$tcp" "$r_tcp" "$cpu%"
done
echo
echo "Medians over $ROUNDS rounds; each ratio is taken against veth measured in the same netbench"
echo "run. UDP RTT: sockperf ping-pong, 64 B, p50 and p90 (2 x sockperf's half round trip), us."
echo "ping: -c 200 -i 0.01, average, us. TCP: iperf3 -t $TIME, one stream. agent CPU: both agents"
echo "over the whole run, % of one CPU."
[ "$KEEP" = 1 ] && echo "raw results in $OUT"
exit 0
