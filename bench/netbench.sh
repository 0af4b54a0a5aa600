#!/bin/bash
# End-to-end benchmark between two network namespaces (root): TCP throughput, ping RTT and,
# if sockperf is installed, UDP ping-pong latency, for each MODE, printed beside veth measured in
# the same run. Modelled on /work/shared/research/baseline-scripts/netbench.sh. For the full
# table of issue 9 (all paths and workloads, Markdown + JSON + chart) use bench/table.sh.
#
# Usage: bench/netbench.sh [MODE...]          (default: veth ivnet-poll)
#
# Modes:
#   veth        a veth pair (the kernel's own path; the baseline every ratio is taken against)
#   ivnet-poll  two `ivnet agent` processes, one per namespace, over a /dev/shm region file
#               (file backend, the agent's default --poll-us unless POLL_US is set), each
#               bridging its TAP to the rings
#   ivnet-doorbell  `ivnet server` plus two `ivnet agent --socket` (server backend, eventfd
#               doorbells) with --spin-us 0: the agents never busy-poll, every frame to a
#               sleeping agent costs a doorbell and a wake-up
#   ivnet-spin  the same with adaptive polling: after activity the agents spin for the
#               agent's default window (or SPIN_US) before they sleep on the doorbell
#
# Environment:
#   MTU=1500            interface MTU on both ends
#   REPS=3              iperf3 / ping / sockperf repetitions per mode
#   TIME=5              iperf3 and sockperf seconds per repetition
#   IVNET=...           ivnet binary (default: target/release/ivnet beside this script, built
#                       with `cargo build --release` if missing)
#   IVNET_AGENT_ARGS    extra flags for both agents, e.g. "--poll-us 20 --slot-size 4096"
#   IVNET_REGION_SIZE=64M  size of the region file
#   OUT=DIR             keep raw results there (default: a temporary directory, removed)
#   SOCKPERF=0          skip sockperf even if installed
#   SPIN_US=N           --spin-us for ivnet-spin (default: the agent's own default)
#
# Adding a mode: write a function `mode_<name>` (dashes in the name become underscores) that
# creates one end in "$NSA" and one in "$NSB" and sets IFA and IFB to their interface names.
# Processes it starts go into PIDS (killed on exit), files into FILES (removed on exit); see
# `mode_ivnet_poll` and `start_ivnet_agents`. Addresses, MTU and the measurements are common.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
MTU=${MTU:-1500}
REPS=${REPS:-3}
TIME=${TIME:-5}
IVNET_AGENT_ARGS=${IVNET_AGENT_ARGS:-}
IVNET_REGION_SIZE=${IVNET_REGION_SIZE:-64M}
SOCKPERF=${SOCKPERF:-1}
A=10.77.0.1
B=10.77.0.2
# Unique names, so that parallel tests or another run on this machine never collide with ours.
NSA=ivb-a-$$
NSB=ivb-b-$$
PIDS=()
FILES=()
KEEP_OUT=1
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/ivnet-netbench.XXXXXX")
    KEEP_OUT=0
fi
mkdir -p "$OUT"

die() { echo "netbench: $*" >&2; exit 1; }

# ---- modes -------------------------------------------------------------------------------

mode_veth() {
    ip link add vA netns "$NSA" type veth peer name vB netns "$NSB" || return 1
    IFA=vA
    IFB=vB
}

# Starts one `ivnet agent` per namespace on a fresh region file; extra arguments go to both.
# Peer ids are explicit (0 in A, 1 in B) and B starts once A's TAP exists: two agents that
# claim "any free slot" at the same instant can both take slot 0 (see bench/README.md).
start_ivnet_agents() {
    local shm=/dev/shm/ivnet-netbench-$$-$MODE
    rm -f "$shm"
    FILES+=("$shm")
    # shellcheck disable=SC2086  # IVNET_AGENT_ARGS is a list of flags
    ip netns exec "$NSA" "$IVNET" agent --shm "$shm" --size "$IVNET_REGION_SIZE" --peer-id 0 \
        --tap ivA --mtu "$MTU" $IVNET_AGENT_ARGS "$@" >"$OUT/$MODE.agentA.log" 2>&1 &
    PIDS+=($!)
    AGENTS=($!)
    IFA=ivA
    IFB=ivB
    wait_for "TAP ivA in $NSA" 10 ip -n "$NSA" link show ivA || return 1
    # shellcheck disable=SC2086
    ip netns exec "$NSB" "$IVNET" agent --shm "$shm" --size "$IVNET_REGION_SIZE" --peer-id 1 \
        --tap ivB --mtu "$MTU" $IVNET_AGENT_ARGS "$@" >"$OUT/$MODE.agentB.log" 2>&1 &
    PIDS+=($!)
    AGENTS+=($!)
    wait_for "TAP ivB in $NSB" 10 ip -n "$NSB" link show ivB || return 1
}

mode_ivnet_poll() {
    local extra=()
    if [ -n "${POLL_US:-}" ]; then extra=(--poll-us "$POLL_US"); fi
    start_ivnet_agents "${extra[@]}"
}

# Starts `ivnet server` (the doorbell server) on a fresh region and one `ivnet agent --socket`
# per namespace (server backend: peer ids, region and eventfd doorbells come from the server, as
# for QEMU guests); extra arguments go to both agents.
start_ivnet_server_agents() {
    local shm=/dev/shm/ivnet-netbench-$$-$MODE sock=$OUT/$MODE.sock
    rm -f "$shm" "$sock"
    FILES+=("$shm" "$sock")
    "$IVNET" -v server --socket "$sock" --shm "$shm" --size "$IVNET_REGION_SIZE" \
        >"$OUT/$MODE.server.log" 2>&1 &
    PIDS+=($!)
    wait_for "doorbell server on $sock" 10 test -S "$sock" || return 1
    # Server-assigned ids follow the join order, so A (started first) is peer 0.
    # shellcheck disable=SC2086  # IVNET_AGENT_ARGS is a list of flags
    ip netns exec "$NSA" "$IVNET" agent --socket "$sock" --tap ivA --mtu "$MTU" \
        $IVNET_AGENT_ARGS "$@" >"$OUT/$MODE.agentA.log" 2>&1 &
    PIDS+=($!)
    AGENTS=($!)
    IFA=ivA
    IFB=ivB
    wait_for "TAP ivA in $NSA" 10 ip -n "$NSA" link show ivA || return 1
    # shellcheck disable=SC2086
    ip netns exec "$NSB" "$IVNET" agent --socket "$sock" --tap ivB --mtu "$MTU" \
        $IVNET_AGENT_ARGS "$@" >"$OUT/$MODE.agentB.log" 2>&1 &
    PIDS+=($!)
    AGENTS+=($!)
    wait_for "TAP ivB in $NSB" 10 ip -n "$NSB" link show ivB || return 1
}

# Doorbells only: the agents never busy-poll (--spin-us 0); every frame to a sleeping agent
# costs an eventfd write and a wake-up.
mode_ivnet_doorbell() {
    start_ivnet_server_agents --spin-us 0
}

# Adaptive: after activity the agents busy-poll for the spin window (the agent's default, or
# SPIN_US) before they arm the doorbell and sleep.
mode_ivnet_spin() {
    local extra=()
    if [ -n "${SPIN_US:-}" ]; then extra=(--spin-us "$SPIN_US"); fi
    start_ivnet_server_agents "${extra[@]}"
}

# ---- plumbing ------------------------------------------------------------------------------

# wait_for WHAT SECONDS CMD...: polls CMD every 50 ms until it succeeds or the time is up.
wait_for() {
    local what=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "netbench: timed out after ${secs}s waiting for $what" >&2
            return 1
        fi
        sleep 0.05
    done
}

teardown() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do
        local end=$((SECONDS + 3))
        while kill -0 "$p" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    PIDS=()
    ip netns del "$NSA" 2>/dev/null
    ip netns del "$NSB" 2>/dev/null
    for p in "${FILES[@]}"; do rm -f "$p"; done
    FILES=()
}

on_exit() {
    teardown
    [ "$KEEP_OUT" = 1 ] || rm -rf "$OUT"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# CPU ticks (user+system) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

median() { sort -n | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
minmax() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {if (NR) printf "%s-%s", lo, hi; else printf "-"}'; }

run_mode() {
    MODE=$1
    local fn=mode_${MODE//-/_}
    declare -F "$fn" >/dev/null || die "unknown mode '$MODE' (known: $(declare -F | sed -n 's/^declare -f mode_//p' | tr _ - | tr '\n' ' '))"
    IFA=""
    IFB=""
    AGENTS=()
    if ! ip netns add "$NSA" || ! ip netns add "$NSB"; then
        die "cannot create namespaces $NSA/$NSB"
    fi
    ip -n "$NSA" link set lo up
    ip -n "$NSB" link set lo up
    "$fn" || { echo "netbench: mode $MODE: setup failed (logs in $OUT)" >&2; teardown; return 1; }
    if ! { ip -n "$NSA" link set "$IFA" mtu "$MTU" up && ip -n "$NSB" link set "$IFB" mtu "$MTU" up \
        && ip -n "$NSA" addr add "$A/24" dev "$IFA" && ip -n "$NSB" addr add "$B/24" dev "$IFB"; }; then
        echo "netbench: mode $MODE: addressing failed" >&2
        teardown
        return 1
    fi
    if ! wait_for "$MODE: ping $A -> $B" 15 ip netns exec "$NSA" ping -c 1 -W 1 "$B"; then
        teardown
        return 1
    fi
    ip netns exec "$NSA" ethtool -k "$IFA" 2>/dev/null \
        | grep -E "^(tcp-segmentation-offload|generic-receive-offload|tx-checksumming):" \
        | tr -s ' \n' ' ' >"$OUT/$MODE.offloads"

    ip netns exec "$NSB" iperf3 -s -p 5201 >/dev/null 2>&1 &
    PIDS+=($!)
    wait_for "iperf3 server" 5 ip netns exec "$NSB" sh -c "ss -ltn | grep -q ':5201 '"
    local have_sockperf=0
    if [ "$SOCKPERF" = 1 ] && command -v sockperf >/dev/null; then
        have_sockperf=1
        ip netns exec "$NSB" sockperf sr -i "$B" -p 11111 >/dev/null 2>&1 &
        PIDS+=($!)
        wait_for "sockperf server" 5 ip netns exec "$NSB" sh -c "ss -lun | grep -q ':11111 '"
    fi

    local t0 a0=0 p
    t0=$(date +%s.%N)
    for p in "${AGENTS[@]}"; do a0=$((a0 + $(cpu_ticks "$p"))); done
    local r
    for r in $(seq 1 "$REPS"); do
        ip netns exec "$NSA" ping -q -c 200 -i 0.01 "$B" | tail -1 >>"$OUT/$MODE.ping"
        ip netns exec "$NSA" iperf3 -c "$B" -p 5201 -t "$TIME" -J >"$OUT/$MODE.tcp.$r.json" 2>&1
        jq -r '"\(.end.sum_received.bits_per_second / 1e9) \(.end.sum_sent.retransmits)"' \
            "$OUT/$MODE.tcp.$r.json" >>"$OUT/$MODE.tcp" 2>/dev/null \
            || echo "netbench: $MODE: iperf3 run $r failed: $(head -c 300 "$OUT/$MODE.tcp.$r.json")" >&2
        if [ "$have_sockperf" = 1 ]; then
            ip netns exec "$NSA" sockperf pp -i "$B" -p 11111 -t "$TIME" -m 64 >"$OUT/$MODE.sockperf.$r" 2>&1
            # sockperf reports half the round trip; keep the round trip.
            awk '/percentile 50.000 =/ {print 2 * $NF}' "$OUT/$MODE.sockperf.$r" >>"$OUT/$MODE.udp"
        fi
    done
    local a1=0 secs
    for p in "${AGENTS[@]}"; do a1=$((a1 + $(cpu_ticks "$p"))); done
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
    if [ "${#AGENTS[@]}" -gt 0 ]; then
        echo "$a0 $a1 $secs $(getconf CLK_TCK)" | awk '{printf "%.0f", 100 * ($2 - $1) / $4 / $3}' >"$OUT/$MODE.agentcpu"
    fi
    teardown
}

# ratio A B: A / B with two decimals, "-" if either is missing.
ratio() {
    if [ -n "$2" ] && [ "$1" != "-" ] && [ "$2" != "-" ]; then
        awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else printf "-"}'
    else
        printf -- "-"
    fi
}

summarize() {
    local veth_tcp="" veth_ping="" veth_udp="" m
    printf '\n%-14s %-24s %6s %15s %11s %9s %8s %8s %8s\n' "mode" "TCP Gbit/s med [min-max]" \
        "retr" "ping min/avg us" "UDP RTT p50" "agent CPU" "TCP/veth" "ping/veth" "UDP/veth"
    for m in "$@"; do
        local tcp="-" rng="" retr="-" pmin="-" pavg="-" udp="-" cpu="-"
        if [ -s "$OUT/$m.tcp" ]; then
            tcp=$(awk '{printf "%.2f\n", $1}' "$OUT/$m.tcp" | median)
            rng=$(awk '{printf "%.2f\n", $1}' "$OUT/$m.tcp" | minmax)
            retr=$(awk '{print $2}' "$OUT/$m.tcp" | median)
        fi
        if [ -s "$OUT/$m.ping" ]; then
            # rtt min/avg/max/mdev = 0.035/0.056/... ms
            pmin=$(sed -n 's|.* = \([0-9.]*\)/\([0-9.]*\)/.*|\1|p' "$OUT/$m.ping" | awk '{printf "%.0f\n", $1 * 1000}' | median)
            pavg=$(sed -n 's|.* = \([0-9.]*\)/\([0-9.]*\)/.*|\2|p' "$OUT/$m.ping" | awk '{printf "%.0f\n", $1 * 1000}' | median)
        fi
        [ -s "$OUT/$m.udp" ] && udp=$(median <"$OUT/$m.udp")
        [ -s "$OUT/$m.agentcpu" ] && cpu="$(cat "$OUT/$m.agentcpu")%"
        if [ "$m" = veth ]; then veth_tcp=$tcp; veth_ping=$pavg; veth_udp=$udp; fi
        local rt rp ru
        rt=$(ratio "$tcp" "$veth_tcp")
        rp=$(ratio "$pavg" "$veth_ping")
        ru=$(ratio "$udp" "$veth_udp")
        printf '%-14s %-24s %6s %15s %11s %9s %8s %8s %8s\n' "$m" "$tcp [$rng]" "$retr" \
            "$pmin/$pavg" "$udp" "$cpu" "$rt" "$rp" "$ru"
    done
    echo
    echo "TCP: iperf3 -t $TIME, one stream, receiver rate, median [min-max] of $REPS; retr: median"
    echo "retransmits per run. ping: -c 200 -i 0.01, medians of min and avg. UDP RTT p50: sockperf"
    echo "ping-pong, 64 B, 2 x its half-RTT p50, in us. agent CPU: both agents together, % of one"
    echo "CPU. Ratios: to veth measured in this run (throughput: higher is better; latency: lower)."
    for m in "$@"; do
        [ -s "$OUT/$m.offloads" ] && echo "offloads $m: $(cat "$OUT/$m.offloads")"
    done
}

# ---- main ----------------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TAP devices)"
for tool in ip iperf3 ping jq ss awk; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ $# -gt 0 ] || set -- veth ivnet-poll
case " $* " in
*" veth "*) ;;
*) set -- veth "$@" ;; # the baseline is always measured in the same run
esac
case " $* " in
*" ivnet"*)
    IVNET=${IVNET:-$ROOT/target/release/ivnet}
    if [ ! -x "$IVNET" ]; then
        (cd "$ROOT" && cargo build --release --quiet) || die "cannot build ivnet"
    fi
    ;;
esac

echo "netbench $(date -u +%Y-%m-%dT%H:%MZ): modes $*; MTU $MTU; $REPS x ${TIME}s; $(nproc) CPUs;" \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)${IVNET:+; ivnet $IVNET $IVNET_AGENT_ARGS}"
DONE=()
for m in "$@"; do
    if run_mode "$m"; then DONE+=("$m"); else echo "netbench: mode $m skipped" >&2; fi
done
summarize "${DONE[@]}"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$KEEP_OUT" = 1 ]; then echo "raw results in $OUT"; fi
