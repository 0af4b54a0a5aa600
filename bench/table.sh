#!/bin/bash
# The benchmark table of issue 9 (root): every path between two network namespaces, every
# workload, measured in one run, REPS repetitions, written as Markdown, JSON and an SVG chart of
# the ratios against veth. See bench/README.md ("The benchmark table") for what each row and
# workload is.
#
# Usage: sudo bench/table.sh
#        sudo ROWS="veth ivnet-file-on" WORKLOADS="tcp1500 udp-rr" REPS=1 TIME=2 bench/table.sh
#
# Rows (paths from namespace A, 10.77.0.1, to namespace B, 10.77.0.2):
#   veth                 a veth pair: the kernel's own path, the baseline of every ratio
#   socat                one socat process relaying between two TAPs, one TAP in each namespace
#   crelay-vnet          bench/taprelay.c --vnet: a C TAP relay, one blocking thread per
#                        direction, IFF_VNET_HDR + TUNSETOFFLOAD csum/TSO4/TSO6/TSO_ECN
#   cring                bench/ringrelay.c: two processes, one TAP each (vnet header + TSO),
#                        joined by two shared-memory rings, eventfd wake-ups only for a
#                        sleeper: ivnet's shape with nothing else in it
#   cring-sum-nt         the same with ivnet's integrity rule (checksums completed by a summing
#                        copy into the ring, verified by the receiving kernel) and its
#                        streaming stores
#   (only when named:) crelay: taprelay.c without the virtio-net header and offloads;
#   cring-copy, cring-sum, cring-nt: the ring relay reading into a buffer and copying into the
#   ring, plainly, summing, or with streaming stores; cring-threads: as two threads;
#   cring-early: returning ring room each quarter of the ring consumed, as ivnet does
#   ivnet-file-on|off    two `ivnet agent` on a /dev/shm region file (file backend, polling)
#   ivnet-doorbell-on|off  `ivnet server` and two `ivnet agent --socket --spin-us 0`
#   ivnet-adaptive-on|off  the same with the agent's default spin window (or SPIN_US)
#   (-on: --offload on, -off: --offload off; a binary without --offload runs the -off rows
#   without the flag and marks the -on rows "unsupported")
#   (only when named:) ivnet-file-trust, ivnet-doorbell-trust, ivnet-adaptive-trust: --offload
#   on --trust-peer-checksums (partial checksums cross the ring, as in cring)
#
# Workloads (iperf3 and sockperf between A and B; one scene per row and MTU):
#   tcp1500 tcp9000 tcp65521  iperf3, one TCP stream A -> B, receiver rate, at that MTU
#   tcp1500x4                 iperf3 -P 4 at MTU 1500
#   udp-rr                    sockperf ping-pong, 64 B, round trip p50 and p99 (2 x sockperf's
#                             half round trip)
#   udp64                     iperf3 -u -l 64 -b 0: 64-byte UDP datagrams received per second
#   cpu                       CPU seconds of the relay or both agents per GB moved, during
#                             tcp1500 (always measured with tcp1500; naming it adds tcp1500)
#   stack                     ivnet rows: kernel in A -> `ivnet stack ... recv` peer on the
#                             same segment, STACK_BYTES over one TCP connection
#   idle                      ivnet rows: CPU of each agent over IDLE_TIME s without
#                             traffic, % of one core (the busier agent)
#
# Environment:
#   ROWS, WORKLOADS       subsets of the above (default: all); veth is always added
#   REPS=3                repetitions; round r measures every row once, so background load
#                         spreads over all rows
#   TIME=3                seconds per iperf3 / sockperf measurement
#   IDLE_TIME=2           seconds of the idle window
#   STACK_BYTES=512M      bytes per kernel -> stack transfer (K, M, G suffixes)
#   OUT=DIR               output directory (default bench/results/<date>-<commit>/)
#   IVNET=PATH            ivnet binary (default target/release/ivnet, brought up to date
#                         with `cargo build --release` first)
#   IVNET_AGENT_ARGS      extra flags for every agent, e.g. "--slot-size 4096"
#   IVNET_SERVER_ARGS     extra flags for the doorbell server of the doorbell and adaptive
#                         rows, e.g. "--slots 2048 --max-peers 2" (ring geometry)
#   IVNET_REGION_SIZE=64M region size
#   SPIN_US=N             --spin-us of the adaptive rows (default: the agent's default)
#   TCP_CC=NAME           TCP congestion control in both namespaces, e.g. cubic (default: the
#                         host's net.ipv4.tcp_congestion_control; recorded in the table)
#
# Output in OUT: table.md (also printed), table.json, ratios.svg, samples.tsv (one line per
# measurement: row, workload, round, status, raw file), meta.tsv, run.log, and raw/<row>/
# with every tool's output, the agents' logs, `ivnet status --json` at the end of each ivnet
# scene and `ethtool -k` of both interfaces. Everything else (namespaces, processes, TAPs,
# region files, sockets, the relay binary) is removed on exit, also on Ctrl-C, SIGTERM and
# errors. Names carry this script's PID, so other runs and tests can run at the same time.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ALL_ROWS="veth socat crelay-vnet cring cring-sum-nt ivnet-file-on ivnet-file-off \
ivnet-doorbell-on ivnet-doorbell-off ivnet-adaptive-on ivnet-adaptive-off"
# Measured only when named in ROWS: the relay without offloads, the ring relay's other variants,
# ivnet trusting its peers' checksums.
EXTRA_ROWS="crelay cring-early cring-copy cring-sum cring-nt cring-threads ivnet-file-trust \
ivnet-doorbell-trust ivnet-adaptive-trust"
ALL_WORKLOADS="tcp1500 tcp9000 tcp65521 tcp1500x4 udp-rr udp64 cpu stack idle"
ROWS=${ROWS:-$ALL_ROWS}
WORKLOADS=${WORKLOADS:-$ALL_WORKLOADS}
REPS=${REPS:-3}
TIME=${TIME:-3}
IDLE_TIME=${IDLE_TIME:-2}
STACK_BYTES=${STACK_BYTES:-512M}
IVNET_AGENT_ARGS=${IVNET_AGENT_ARGS:-}
IVNET_SERVER_ARGS=${IVNET_SERVER_ARGS:-}
IVNET_REGION_SIZE=${IVNET_REGION_SIZE:-64M}
A=10.77.0.1
B=10.77.0.2
STACK_IP=10.77.0.9
NSA=ivt-a-$$
NSB=ivt-b-$$
TAPA=ivtA$$ # relay TAPs are created in the root namespace, so their names must be unique
TAPB=ivtB$$
WORK="" # temporary: the relay binary, server sockets
PIDS=() # processes of the current scene
FILES=() # region files of the current scene
FG="" # the measurement running now (killed on exit)

RUNLOG=/dev/null # OUT/run.log once OUT exists
say() {
    echo "table: $*" >&2
    echo "table: $*" >>"$RUNLOG"
}
die() {
    say "$*"
    exit 1
}

# ---- arguments, tools, binaries --------------------------------------------------------------

has() { case " $1 " in *" $2 "*) return 0 ;; esac; return 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TAP devices): sudo $0"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS=$REPS: give a whole number >= 1"
[[ "$TIME" =~ ^[1-9][0-9]*$ ]] || die "TIME=$TIME: give whole seconds >= 1"
[[ "$IDLE_TIME" =~ ^[1-9][0-9]*$ ]] || die "IDLE_TIME=$IDLE_TIME: give whole seconds >= 1"
# One space between names (the lists may come with newlines or tabs).
read -r -d '' -a _list <<<"$ROWS"
ROWS="${_list[*]}"
read -r -d '' -a _list <<<"$WORKLOADS"
WORKLOADS="${_list[*]}"
for r in $ROWS; do
    has "$ALL_ROWS $EXTRA_ROWS" "$r" || die "unknown row '$r' (rows: $ALL_ROWS $EXTRA_ROWS)"
done
for w in $WORKLOADS; do
    has "$ALL_WORKLOADS" "$w" || die "unknown workload '$w' (workloads: $ALL_WORKLOADS)"
done
has "$ROWS" veth || ROWS="veth $ROWS" # every ratio needs veth from the same run
has "$WORKLOADS" cpu && ! has "$WORKLOADS" tcp1500 && WORKLOADS="tcp1500 $WORKLOADS"
case $STACK_BYTES in
*[kK]) STACK_N=$((${STACK_BYTES%?} << 10)) ;;
*[mM]) STACK_N=$((${STACK_BYTES%?} << 20)) ;;
*[gG]) STACK_N=$((${STACK_BYTES%?} << 30)) ;;
*) STACK_N=$STACK_BYTES ;;
esac
[[ "$STACK_N" =~ ^[1-9][0-9]*$ ]] || die "STACK_BYTES=$STACK_BYTES: give bytes, e.g. 512M"
CC_AVAIL=$(sysctl -n net.ipv4.tcp_available_congestion_control 2>/dev/null)
if ! has "$CC_AVAIL" "$TCP_CC"; then
    modprobe "tcp_$TCP_CC" 2>/dev/null
    CC_AVAIL=$(sysctl -n net.ipv4.tcp_available_congestion_control 2>/dev/null)
    has "$CC_AVAIL" "$TCP_CC" ||
        die "TCP_CC=$TCP_CC: this kernel has no such congestion control (available: $CC_AVAIL)"
fi

# tool -> Debian package
declare -A PKG=([ip]=iproute2 [ss]=iproute2 [ping]=iputils-ping [iperf3]=iperf3
    [sockperf]=sockperf [socat]=socat [jq]=jq [gcc]=gcc [ethtool]=ethtool [python3]=python3
    [timeout]=coreutils)
missing_pkgs() {
    local t out=()
    for t in "${!PKG[@]}"; do command -v "$t" >/dev/null || out+=("${PKG[$t]}"); done
    [ "${#out[@]}" -eq 0 ] || printf '%s\n' "${out[@]}" | sort -u | paste -sd' '
}
MISSING=$(missing_pkgs)
if [ -n "$MISSING" ]; then
    if command -v apt-get >/dev/null; then
        echo "table: installing missing packages: $MISSING" >&2
        # shellcheck disable=SC2086  # a list of package names
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $MISSING >&2 ||
            { DEBIAN_FRONTEND=noninteractive apt-get update >&2 &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                    $MISSING >&2; }
    fi
    MISSING=$(missing_pkgs)
    [ -z "$MISSING" ] || die "missing packages (install them: apt-get install $MISSING)"
fi
[ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true

IVNET_ROWS=0
for r in $ROWS; do case $r in ivnet-*) IVNET_ROWS=1 ;; esac; done
IVNET_VERSION="-"
OFFLOAD_FLAG=0
TRUST_FLAG=0
if [ "$IVNET_ROWS" = 1 ]; then
    # Without IVNET, the working tree's ivnet, built now if it is not up to date (a binary left
    # from an earlier commit would be measured under this commit's name).
    if [ -z "${IVNET:-}" ] && command -v cargo >/dev/null; then
        echo "table: building ivnet (cargo build --release)" >&2
        (cd "$ROOT" && cargo build --release --quiet) || die "cannot build ivnet; set IVNET=PATH"
    fi
    IVNET=${IVNET:-$ROOT/target/release/ivnet}
    [ -x "$IVNET" ] || die "no ivnet binary at $IVNET (build it with cargo, or set IVNET=PATH)"
    IVNET=$(cd "$(dirname "$IVNET")" && pwd)/$(basename "$IVNET")
    IVNET_VERSION=$("$IVNET" --version 2>/dev/null || echo "?")
    if "$IVNET" agent --help 2>/dev/null | grep -q -- --offload; then OFFLOAD_FLAG=1; fi
    if "$IVNET" agent --help 2>/dev/null | grep -q -- --trust-peer-checksums; then TRUST_FLAG=1; fi
fi

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=0
[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && DIRTY=1
if [ -z "${OUT:-}" ]; then
    OUT=$ROOT/bench/results/$(date +%Y-%m-%dT%H%M)-$COMMIT
    [ "$DIRTY" = 1 ] && OUT=$OUT-dirty
    [ -e "$OUT" ] && OUT=$OUT-$$
fi
mkdir -p "$OUT/raw" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/samples.tsv"
: >"$OUT/run.log"
RUNLOG=$OUT/run.log

# ---- cleanup ---------------------------------------------------------------------------------

# Stops the scene's processes (SIGTERM: agents leave their slot and remove their TAP; then
# SIGKILL after 3 s), deletes the namespaces, the region files and any relay TAP left in the
# root namespace.
teardown() {
    local p end
    [ -n "$FG" ] && kill "$FG" 2>/dev/null
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    end=$((SECONDS + 3))
    for p in "${PIDS[@]}"; do
        while kill -0 "$p" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    PIDS=()
    ip netns del "$NSA" 2>/dev/null
    ip netns del "$NSB" 2>/dev/null
    ip link del "$TAPA" 2>/dev/null
    ip link del "$TAPB" 2>/dev/null
    for p in "${FILES[@]}"; do rm -f "$p"; done
    FILES=()
}
CC_ALLOWED_WAS="" # the host's allowed congestion controls, when this run added TCP_CC
on_exit() {
    teardown
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ -n "$CC_ALLOWED_WAS" ]; then
        sysctl -qw net.ipv4.tcp_allowed_congestion_control="$CC_ALLOWED_WAS"
    fi
}
trap on_exit EXIT
trap 'say "interrupted; cleaning up"; exit 130' INT TERM HUP

# In a namespace other than the host's, even root may only choose a congestion control from the
# host's net.ipv4.tcp_allowed_congestion_control: add TCP_CC to it for this run.
CC_ALLOWED=$(sysctl -n net.ipv4.tcp_allowed_congestion_control 2>/dev/null)
if ! has "$CC_ALLOWED" "$TCP_CC"; then
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$CC_ALLOWED $TCP_CC" ||
        die "TCP_CC=$TCP_CC: cannot add it to net.ipv4.tcp_allowed_congestion_control"
    CC_ALLOWED_WAS=$CC_ALLOWED
    say "added $TCP_CC to net.ipv4.tcp_allowed_congestion_control for this run"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ivnet-table.XXXXXX") || die "mktemp failed"

# ---- helpers -----------------------------------------------------------------------------------

# wait_for WHAT SECONDS CMD...: polls CMD every 50 ms until it succeeds or the time is up. With
# WAIT_PID set, gives up at once when that process has exited (it will not get any better).
wait_for() {
    local what=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ -n "${WAIT_PID:-}" ] && ! kill -0 "$WAIT_PID" 2>/dev/null; then
            echo "table: gave up waiting for $what: process $WAIT_PID has exited" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$end" ]; then
            echo "table: timed out after ${secs}s waiting for $what" >&2
            return 1
        fi
        sleep 0.05
    done
}

# run_fg SECONDS CMD...: runs CMD with a time limit, in the background so that a signal to this
# script is handled at once (the trap kills it).
run_fg() {
    local secs=$1 rc
    shift
    timeout -k 5 "$secs" "$@" &
    FG=$!
    wait "$FG"
    rc=$?
    FG=""
    return $rc
}

# cpu_ns PID...: nanoseconds on CPU of all threads of these processes so far.
cpu_ns() {
    local p total=0 f v
    for p in "$@"; do
        for f in /proc/"$p"/task/*/schedstat; do
            read -r v _ <"$f" 2>/dev/null && total=$((total + v))
        done
    done
    echo "$total"
}

# ctxt: context switches on the whole machine so far (the relay's or agents' and iperf3's).
ctxt() { awk '$1 == "ctxt" { print $2 }' /proc/stat; }

# record ROW WORKLOAD STATUS FILE [NOTE]: one line of samples.tsv.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$ROUND" "$3" "${4:-}" "${5:-}" >>"$OUT/samples.tsv"
}

uses() { has "$WORKLOADS" "$1"; }

# ---- rows: each sets up one path between NSA and NSB and sets IFA, IFB, CPU_PIDS, REGION --------

# A relay started in the root namespace creates TAPA and TAPB; move one into each namespace.
move_relay_taps() {
    WAIT_PID=${CPU_PIDS[0]} wait_for "TAPs $TAPA and $TAPB" 10 \
        sh -c "ip link show $TAPA && ip link show $TAPB" || return 1
    ip link set "$TAPA" netns "$NSA" && ip link set "$TAPB" netns "$NSB" || return 1
    IFA=$TAPA
    IFB=$TAPB
}

row_veth() {
    ip link add vA netns "$NSA" type veth peer name vB netns "$NSB" || return 1
    IFA=vA
    IFB=vB
}

# socat exits when a write fails, and writing to a TAP that is down fails (EIO): so the TAPs
# stay down until both are in their namespaces (no iff-up), where IPv6 is off, so that nothing
# is sent before both ends are up.
row_socat() {
    socat -b 131072 TUN,tun-type=tap,tun-name="$TAPA",iff-no-pi \
        TUN,tun-type=tap,tun-name="$TAPB",iff-no-pi >"$LOG.relay.log" 2>&1 &
    PIDS+=($!)
    CPU_PIDS=($!)
    move_relay_taps
}

row_crelay_vnet() {
    "$WORK/taprelay" --vnet "$TAPA" "$TAPB" >"$LOG.relay.log" 2>&1 &
    PIDS+=($!)
    CPU_PIDS=($!)
    move_relay_taps
}

row_crelay() {
    "$WORK/taprelay" "$TAPA" "$TAPB" >"$LOG.relay.log" 2>&1 &
    PIDS+=($!)
    CPU_PIDS=($!)
    move_relay_taps
}

# The ring relay: CPU_PIDS gets both processes (the second is forked after the TAPs exist).
cring_row() {
    "$WORK/ringrelay" "$@" "$TAPA" "$TAPB" >"$LOG.relay.log" 2>&1 &
    PIDS+=($!)
    CPU_PIDS=($!)
    move_relay_taps || return 1
    case " $* " in *" --threads "*) return 0 ;; esac
    local child
    WAIT_PID=${CPU_PIDS[0]} wait_for "the ring relay's second process" 5 pgrep -P "${CPU_PIDS[0]}" ||
        return 1
    child=$(pgrep -P "${CPU_PIDS[0]}" | head -1)
    CPU_PIDS+=("$child")
    PIDS+=("$child")
}
row_cring() { cring_row; }
row_cring_copy() { cring_row --copy; }
row_cring_threads() { cring_row --threads; }
row_cring_sum() { cring_row --sum; }
row_cring_nt() { cring_row --nt; }
row_cring_early() { cring_row --early-room; }
row_cring_sum_nt() { cring_row --sum --nt; }

# start_agent NS TAP LOG ARGS...: one `ivnet agent` in NS; returns once its TAP exists.
start_agent() {
    local ns=$1 tap=$2 log=$3
    shift 3
    # shellcheck disable=SC2086  # IVNET_AGENT_ARGS is a list of flags
    ip netns exec "$ns" "$IVNET" agent --tap "$tap" --mtu "$MTU" "$@" $IVNET_AGENT_ARGS \
        >"$log" 2>&1 &
    PIDS+=($!)
    CPU_PIDS+=($!)
    WAIT_PID=$! wait_for "TAP $tap in $ns (agent log: $log)" 10 ip -n "$ns" link show "$tap"
}

# ivnet_row BACKEND OFFLOAD: file | doorbell | adaptive, on | off | trust.
ivnet_row() {
    local backend=$1 offload=$2 flags=()
    case $offload in
    on) flags+=(--offload on) ;;
    trust) flags+=(--offload on --trust-peer-checksums) ;;
    off) [ "$OFFLOAD_FLAG" = 1 ] && flags+=(--offload off) ;;
    esac
    REGION=/dev/shm/ivnet-table-$$-$ROW-$MTU
    rm -f "$REGION"
    FILES+=("$REGION")
    CPU_PIDS=()
    IFA=ivA
    IFB=ivB
    if [ "$backend" = file ]; then
        # Explicit peer ids, and B only once A's TAP exists: two agents claiming "any free
        # slot" at the same instant could both take slot 0 (bench/README.md, history).
        STACK_ARGS=(--shm "$REGION" --peer-id 2)
        start_agent "$NSA" ivA "$LOG.agentA.log" --shm "$REGION" --size "$IVNET_REGION_SIZE" \
            --peer-id 0 "${flags[@]}" || return 1
        start_agent "$NSB" ivB "$LOG.agentB.log" --shm "$REGION" --size "$IVNET_REGION_SIZE" \
            --peer-id 1 "${flags[@]}" || return 1
        return 0
    fi
    local sock=$WORK/$ROW-$MTU.sock spin=()
    rm -f "$sock"
    if [ "$backend" = doorbell ]; then
        spin=(--spin-us 0)
    elif [ -n "${SPIN_US:-}" ]; then
        spin=(--spin-us "$SPIN_US")
    fi
    STACK_ARGS=(--socket "$sock" "${spin[@]}")
    # shellcheck disable=SC2086  # IVNET_SERVER_ARGS is a list of flags
    "$IVNET" server --socket "$sock" --shm "$REGION" --size "$IVNET_REGION_SIZE" \
        $IVNET_SERVER_ARGS >"$LOG.server.log" 2>&1 &
    PIDS+=($!)
    WAIT_PID=$! wait_for "doorbell server on $sock (log: $LOG.server.log)" 10 test -S "$sock" ||
        return 1
    start_agent "$NSA" ivA "$LOG.agentA.log" --socket "$sock" "${spin[@]}" "${flags[@]}" ||
        return 1
    start_agent "$NSB" ivB "$LOG.agentB.log" --socket "$sock" "${spin[@]}" "${flags[@]}"
}

# ---- workloads ---------------------------------------------------------------------------------

# iperf3_run WORKLOAD FILE ARGS...: one iperf3 client run A -> B; 0 if it produced a result.
iperf3_run() {
    local file=$2
    shift 2
    run_fg $((TIME + 30)) ip netns exec "$NSA" iperf3 -c "$B" -p 5201 -t "$TIME" -J "$@" \
        >"$file" 2>&1
    jq -e '.end.sum_received.bits_per_second // .end.sum.packets' "$file" >/dev/null 2>&1 &&
        ! jq -e '.error' "$file" >/dev/null 2>&1
}

w_tcp() {
    local name=$1 file=$LOG.$1.json
    shift
    local c0 c1 x0 x1
    c0=$(cpu_ns "${CPU_PIDS[@]}")
    x0=$(ctxt)
    if iperf3_run "$name" "$file" "$@"; then
        c1=$(cpu_ns "${CPU_PIDS[@]}")
        x1=$(ctxt)
        record "$ROW" "$name" ok "$file"
        if [ "$name" = tcp1500 ]; then
            # The path's own CPU (none for veth) and the machine's context switches.
            {
                [ "${#CPU_PIDS[@]}" -gt 0 ] && printf 'cpu_ns %s\npids %s\n' "$((c1 - c0))" \
                    "${CPU_PIDS[*]}"
                printf 'switches %s\niperf3 %s\n' "$((x1 - x0))" "$file"
            } >"$LOG.cpu"
            record "$ROW" cpu ok "$LOG.cpu"
        fi
        progress "$name $(jq -r '.end.sum_received.bits_per_second / 1e9 * 100 | round / 100' \
            "$file") Gbit/s"
    else
        record "$ROW" "$name" failed "$file" "iperf3 failed"
        [ "$name" = tcp1500 ] && record "$ROW" cpu failed "$file" "iperf3 failed"
        progress "$name FAILED ($file)"
    fi
}

w_udp64() {
    local file=$LOG.udp64.json
    if iperf3_run udp64 "$file" -u -l 64 -b 0; then
        record "$ROW" udp64 ok "$file"
        progress "udp64 $(jq -r '(.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds
            / 1000 | round' "$file") kpps received"
    else
        record "$ROW" udp64 failed "$file" "iperf3 failed"
        progress "udp64 FAILED ($file)"
    fi
}

w_udp_rr() {
    local file=$LOG.udp-rr.txt
    run_fg $((TIME + 30)) ip netns exec "$NSA" sockperf ping-pong -i "$B" -p 11111 -t "$TIME" \
        -m 64 >"$file" 2>&1
    if grep -q 'percentile 50.000 =' "$file"; then
        record "$ROW" udp-rr ok "$file"
        progress "udp-rr p50 $(awk '/percentile 50.000 =/ {print 2 * $NF}' "$file") us RTT"
    else
        record "$ROW" udp-rr failed "$file" "sockperf failed"
        progress "udp-rr FAILED ($file)"
    fi
}

# Kernel in A sends STACK_BYTES to an `ivnet stack` peer that joins the same segment.
w_stack() {
    local file=$LOG.stack.txt send=$LOG.stack-send.log pid
    "$IVNET" stack "${STACK_ARGS[@]}" --ip "$STACK_IP/24" recv --tcp 5001 >"$file" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if WAIT_PID=$pid wait_for "the stack peer $STACK_IP to answer ping (log: $file)" 15 \
        ip netns exec "$NSA" ping -c 1 -W 1 "$STACK_IP" &&
        run_fg 300 ip netns exec "$NSA" socat -u -b 262144 \
            OPEN:/dev/zero,readbytes="$STACK_N" TCP:"$STACK_IP":5001 >"$send" 2>&1 &&
        wait_for "the stack peer to finish" 30 sh -c "! kill -0 $pid" &&
        grep -q '^received .* Gbit/s' "$file"; then
        record "$ROW" stack ok "$file"
        progress "stack $(sed -n 's/.*(\([0-9.]*\) Gbit\/s).*/\1/p' "$file") Gbit/s"
    else
        record "$ROW" stack failed "$file" "see also $send"
        progress "stack FAILED ($file, $send)"
    fi
    kill "$pid" 2>/dev/null
}

# CPU of each agent over IDLE_TIME seconds without traffic, 1 s after the last frame.
w_idle() {
    local file=$LOG.idle p
    run_fg 5 sleep 1
    local before=() after=()
    for p in "${CPU_PIDS[@]}"; do before+=("$(cpu_ns "$p")"); done
    local t0=$EPOCHREALTIME
    run_fg $((IDLE_TIME + 5)) sleep "$IDLE_TIME"
    local t1=$EPOCHREALTIME i=0
    for p in "${CPU_PIDS[@]}"; do after+=("$(cpu_ns "$p")"); done
    {
        echo "seconds $(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
        for p in "${CPU_PIDS[@]}"; do
            echo "pid $p cpu_ns $((after[i] - before[i]))"
            i=$((i + 1))
        done
    } >"$file"
    if [ "${#CPU_PIDS[@]}" -gt 0 ]; then
        record "$ROW" idle ok "$file"
        progress "idle $(awk '/^seconds/ {s = $2} /^pid/ {v = $4 / 1e7 / s; if (v > m) m = v}
            END {printf "%.2f", m}' "$file")% of a core (busier agent)"
    else
        record "$ROW" idle failed "$file" "no agent processes"
    fi
}

progress() { say "  [$((SECONDS - T0))s] round $ROUND/$REPS $ROW mtu $MTU: $*"; }

# ---- scenes ------------------------------------------------------------------------------------

# scene ROW MTU: sets up ROW at MTU, runs the workloads of that MTU, records the agents' status
# and the interfaces' offloads, tears down. A failure is recorded and the run goes on.
scene() {
    ROW=$1
    MTU=$2
    local dir=$OUT/raw/$ROW wl=()
    mkdir -p "$dir"
    LOG=$dir/mtu$MTU.r$ROUND
    case $MTU in
    1500)
        for w in idle tcp1500 tcp1500x4 udp-rr udp64 stack; do
            uses "$w" || continue
            case $w in stack | idle) [[ $ROW == ivnet-* ]] || continue ;; esac
            wl+=("$w")
        done
        ;;
    *) wl=(tcp"$MTU") ;;
    esac
    [ "${#wl[@]}" -gt 0 ] || return 0 # e.g. veth when only ivnet-only workloads are chosen
    IFA=""
    IFB=""
    CPU_PIDS=()
    REGION=""
    STACK_ARGS=()
    local fn=row_${ROW//-/_} ok=1
    case $ROW in ivnet-*-on | ivnet-*-off | ivnet-*-trust)
        local rest=${ROW#ivnet-}
        fn="ivnet_row ${rest%-*} ${rest##*-}"
        ;;
    esac
    if ! ip netns add "$NSA" || ! ip netns add "$NSB"; then
        ok=0
    else
        ip -n "$NSA" link set lo up
        ip -n "$NSB" link set lo up
        # IPv4 only: no router solicitations or duplicate address detection between the
        # measurements (and none that a relay could see before both of its ends are up).
        local ns
        # The congestion control is per namespace and starts as the host's; set it anyway so
        # that the one recorded in the table is the one measured.
        for ns in "$NSA" "$NSB"; do
            ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
                net.ipv6.conf.default.disable_ipv6=1 >>"$LOG.setup.log" 2>&1
            ip netns exec "$ns" sysctl -qw net.ipv4.tcp_congestion_control="$TCP_CC" \
                >>"$LOG.setup.log" 2>&1 || ok=0
        done
        # shellcheck disable=SC2086  # fn is a function name and its arguments
        $fn >>"$LOG.setup.log" 2>&1 || ok=0
    fi
    if [ "$ok" = 1 ] && ! {
        ip -n "$NSA" link set "$IFA" mtu "$MTU" up && ip -n "$NSB" link set "$IFB" mtu "$MTU" up &&
            ip -n "$NSA" addr add "$A/24" dev "$IFA" && ip -n "$NSB" addr add "$B/24" dev "$IFB"
    } >>"$LOG.setup.log" 2>&1; then
        ok=0
    fi
    if [ "$ok" = 1 ] && ! wait_for "ping $A -> $B" 15 ip netns exec "$NSA" ping -c 1 -W 1 "$B" \
        2>>"$LOG.setup.log"; then
        ok=0
    fi
    if [ "$ok" = 1 ]; then
        ip netns exec "$NSB" iperf3 -s -p 5201 >"$LOG.iperf3-server.log" 2>&1 &
        PIDS+=($!)
        ip netns exec "$NSB" sockperf server -i "$B" -p 11111 >"$LOG.sockperf-server.log" 2>&1 &
        PIDS+=($!)
        wait_for "iperf3 and sockperf servers in $NSB" 10 ip netns exec "$NSB" sh -c \
            "ss -ltn | grep -q ':5201 ' && ss -lun | grep -q ':11111 '" 2>>"$LOG.setup.log" ||
            ok=0
    fi
    if [ "$ok" = 0 ]; then
        progress "setup FAILED (log: $LOG.setup.log)"
        for w in "${wl[@]}"; do
            record "$ROW" "$w" failed "$LOG.setup.log" "setup failed"
            [ "$w" = tcp1500 ] && record "$ROW" cpu failed "$LOG.setup.log" "setup failed"
        done
        teardown
        return
    fi
    if [ "$ROUND" = 1 ]; then
        { ip netns exec "$NSA" ethtool -k "$IFA"; } >"$dir/ethtool-A.mtu$MTU.txt" 2>&1
        { ip netns exec "$NSB" ethtool -k "$IFB"; } >"$dir/ethtool-B.mtu$MTU.txt" 2>&1
    fi
    for w in "${wl[@]}"; do
        case $w in
        tcp1500x4) w_tcp tcp1500x4 -P 4 ;;
        tcp*) w_tcp "$w" ;;
        udp64) w_udp64 ;;
        udp-rr) w_udp_rr ;;
        stack) w_stack ;;
        idle) w_idle ;;
        esac
    done
    if [ -n "$REGION" ]; then
        "$IVNET" status --shm "$REGION" --json >"$dir/status.mtu$MTU.r$ROUND.json" 2>&1
    fi
    teardown
}

# ---- main --------------------------------------------------------------------------------------

if has "$ROWS" crelay || has "$ROWS" crelay-vnet; then
    gcc -O2 -Wall -pthread -o "$WORK/taprelay" "$HERE/taprelay.c" 2>"$WORK/gcc.log" ||
        die "cannot compile bench/taprelay.c: $(cat "$WORK/gcc.log")"
fi
if [[ " $ROWS " == *" cring"* ]]; then
    gcc -O2 -Wall -pthread -o "$WORK/ringrelay" "$HERE/ringrelay.c" 2>"$WORK/gcc.log" ||
        die "cannot compile bench/ringrelay.c: $(cat "$WORK/gcc.log")"
fi

MTUS=()
for w in tcp1500 tcp1500x4 udp-rr udp64 stack idle; do
    if uses "$w"; then
        MTUS+=(1500)
        break
    fi
done
uses tcp9000 && MTUS+=(9000)
uses tcp65521 && MTUS+=(65521)

# Rows that run, and the estimate, in tenths of a second, from runs on this 2-core VM: per
# scene 0.7 s of setup and teardown; per iperf3 run TIME + 0.1 s; per sockperf run TIME + 2.5 s
# (sockperf waits 2 s before it starts); per idle window IDLE_TIME + 1.3 s; per stack transfer
# STACK_BYTES at 4 Gbit/s + 0.7 s.
RUN_ROWS=()
EST=0
for r in $ROWS; do
    if [[ $r == ivnet-*-on || $r == ivnet-*-trust ]] && [ "$OFFLOAD_FLAG" = 0 ]; then
        ROUND=- record "$r" - unsupported "" "this ivnet binary has no --offload flag"
        say "row $r: unsupported (this ivnet binary has no --offload flag): skipped"
        continue
    fi
    if [[ $r == ivnet-*-trust ]] && [ "$TRUST_FLAG" = 0 ]; then
        ROUND=- record "$r" - unsupported "" "this ivnet binary has no --trust-peer-checksums"
        say "row $r: unsupported (this ivnet binary has no --trust-peer-checksums): skipped"
        continue
    fi
    RUN_ROWS+=("$r")
    EST=$((EST + 7 * ${#MTUS[@]}))
    for w in tcp1500 tcp9000 tcp65521 tcp1500x4 udp64; do
        uses $w && EST=$((EST + TIME * 10 + 1))
    done
    uses udp-rr && EST=$((EST + TIME * 10 + 25))
    if [[ $r == ivnet-* ]]; then
        uses idle && EST=$((EST + IDLE_TIME * 10 + 13))
        uses stack && EST=$((EST + STACK_N * 80 / 4000000000 + 7))
    fi
done
EST=$((EST * REPS / 10))

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# cpu_ticks: "steal total" jiffies of all CPUs so far: the share the hypervisor gave to others
# while this VM wanted to run (a run with much of it is one to repeat).
cpu_ticks() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat; }
TICKS_START=$(cpu_ticks)
{
    printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'commit\t%s\n' "$COMMIT"
    printf 'dirty\t%s\n' "$DIRTY"
    printf 'cpu\t%s\n' "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'load_start\t%s\n' "$LOAD_START"
    printf 'ivnet\t%s\n' "${IVNET:--}"
    printf 'ivnet_version\t%s\n' "$IVNET_VERSION"
    printf 'offload_flag\t%s\n' "$OFFLOAD_FLAG"
    printf 'agent_args\t%s\n' "$IVNET_AGENT_ARGS"
    printf 'server_args\t%s\n' "$IVNET_SERVER_ARGS"
    printf 'spin_us\t%s\n' "${SPIN_US:-default}"
    printf 'region_size\t%s\n' "$IVNET_REGION_SIZE"
    printf 'tcp_cc\t%s\n' "$TCP_CC"
    printf 'reps\t%s\n' "$REPS"
    printf 'time\t%s\n' "$TIME"
    printf 'idle_time\t%s\n' "$IDLE_TIME"
    printf 'stack_bytes\t%s\n' "$STACK_N"
    printf 'rows\t%s\n' "$ROWS"
    printf 'workloads\t%s\n' "$WORKLOADS"
    printf 'tools\t%s; sockperf %s; %s; %s\n' "$(iperf3 --version | head -1)" \
        "$(sockperf --version 2>&1 | sed -n 's/.*version \([^ ]*\).*/\1/p' | head -1)" \
        "$(socat -V | sed -n 's/^socat version \([^ ]*\).*/socat \1/p')" \
        "$(gcc --version | head -1)"
    printf 'estimate_s\t%s\n' "$EST"
} >"$OUT/meta.tsv"

say "$(date -u +%H:%M:%SZ) commit $COMMIT$([ "$DIRTY" = 1 ] && echo " (dirty)"), $(nproc) CPUs," \
    "load $LOAD_START; ${IVNET:+ivnet $IVNET_VERSION ($( [ "$OFFLOAD_FLAG" = 1 ] && echo \
    "has --offload" || echo "no --offload")), }REPS=$REPS TIME=$TIME"
say "rows: ${RUN_ROWS[*]}; workloads: $WORKLOADS"
say "expected duration: about $((EST / 60)) min $((EST % 60)) s; output in $OUT"
[ "$EST" -le 900 ] ||
    say "that is over 15 minutes: lower REPS or TIME, or choose ROWS/WORKLOADS subsets"

T0=$SECONDS
for ROUND in $(seq 1 "$REPS"); do
    for r in "${RUN_ROWS[@]}"; do
        for m in "${MTUS[@]}"; do scene "$r" "$m"; done
    done
done
printf 'load_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.tsv"
printf 'steal_pct\t%s\n' "$(echo "$TICKS_START $(cpu_ticks)" |
    awk '$4 > $2 { printf "%.1f", ($3 - $1) * 100 / ($4 - $2) }')" >>"$OUT/meta.tsv"
printf 'duration_s\t%s\n' "$((SECONDS - T0))" >>"$OUT/meta.tsv"
say "measured in $((SECONDS - T0)) s"

python3 "$HERE/table.py" "$OUT" || die "table.py failed on $OUT"
echo
cat "$OUT/table.md"
echo
echo "table: written $OUT/table.md, table.json, ratios.svg (raw results in $OUT/raw)"
