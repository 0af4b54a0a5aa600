#!/usr/bin/env bash
# scripts/demo.sh: ivnet's main job, end to end, on this machine.
#
# Two network namespaces stand in for two VMs. Each runs an `ivnet agent` whose TAP (tap-shm)
# is its only link; the agents move the Ethernet frames through one shared-memory region file
# in /dev/shm. The demo pings both ways, sends a checksummed TCP transfer (and an iperf3 run if
# iperf3 is installed), shows `ivnet status`, and removes everything it made on exit, also on
# Ctrl-C or failure.
#
# Needs root (namespaces and TAP devices). Builds ivnet with `cargo build --release` when
# needed (IVNET=/path/to/ivnet uses that binary instead). The only thing it may install is a
# missing basic tool (iproute2, iputils-ping) with apt-get, and it says so when it does.
#
# Usage: sudo scripts/demo.sh
set -euo pipefail

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: needs root: it creates network namespaces and TAP interfaces." >&2
    echo "         Run it as: sudo $0" >&2
    exit 1
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=$$
NS_A="ivdemo-a-$TAG"
NS_B="ivdemo-b-$TAG"
REGION="/dev/shm/ivnet-demo-$TAG"
ADDR_A=10.99.0.1
ADDR_B=10.99.0.2
PORT=5555
WORK=$(mktemp -d /tmp/ivnet-demo.XXXXXX)
AGENT_PIDS=()
CREATED_NS=()

# ------------------------------------------------------------------------------------------
# Cleanup: always, whatever happened.
# ------------------------------------------------------------------------------------------
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    say "Cleaning up"
    local pid
    for pid in "${AGENT_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${AGENT_PIDS[@]}"; do
        # Up to 3 s for a clean leave (the agent marks itself down and removes its TAP).
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            info "agent $pid did not stop on SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    [ ${#AGENT_PIDS[@]} -gt 0 ] && info "stopped agents ${AGENT_PIDS[*]}"
    local ns
    for ns in "${CREATED_NS[@]}"; do
        # Anything still running in the namespace (a listener, iperf3) goes with it.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null && info "deleted namespace $ns"
    done
    if [ -e "$REGION" ]; then rm -f "$REGION" && info "removed $REGION"; fi
    # Agent logs help after a failure, not after Ctrl-C (130) or SIGTERM (143).
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ] && [ -d "$WORK" ]; then
        for f in "$WORK"/agent-*.log; do
            [ -s "$f" ] || continue
            echo "----- $(basename "$f") -----"
            cat "$f"
        done
    fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        say "Demo finished: everything it created is gone."
    elif [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
        echo "demo.sh: stopped early; cleaned up." >&2
    else
        echo "demo.sh: FAILED (exit $rc); cleaned up." >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "demo.sh: interrupted" >&2; exit 130' INT
trap 'echo "demo.sh: terminated" >&2; exit 143' TERM

# ------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------
need_pkgs=()
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v ping >/dev/null || need_pkgs+=(iputils-ping)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing tools (${need_pkgs[*]}) and no apt-get to install them"
    say "Installing missing tools with apt-get: ${need_pkgs[*]}"
    apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 || {
        apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null
    } || die "apt-get install ${need_pkgs[*]} failed"
fi
[ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true
[ -e /dev/net/tun ] || die "/dev/net/tun is missing: load the tun module (modprobe tun)"

if [ -n "${IVNET:-}" ]; then
    [ -x "$IVNET" ] || die "IVNET=$IVNET is not an executable"
else
    IVNET="$REPO/target/release/ivnet"
    if command -v cargo >/dev/null; then
        say "Building ivnet (cargo build --release; quick when it is up to date)"
        (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    elif [ ! -x "$IVNET" ]; then
        die "ivnet is not built and cargo is not installed (get Rust from https://rustup.rs)"
    else
        info "cargo not found; using the existing $IVNET"
    fi
fi
info "binary: $IVNET"

# ------------------------------------------------------------------------------------------
# Namespaces, region, agents
# ------------------------------------------------------------------------------------------
say "Creating two network namespaces: $NS_A and $NS_B (two 'VMs')"
for ns in "$NS_A" "$NS_B"; do
    ip netns add "$ns"
    CREATED_NS+=("$ns")
    ip -n "$ns" link set lo up
done

start_agent() { # ns peer-id address
    local log="$WORK/agent-$2.log"
    ip netns exec "$1" "$IVNET" -v agent --shm "$REGION" --size 64M --peer-id "$2" \
        --address "$3/24" >"$log" 2>&1 &
    AGENT_PIDS+=($!)
    info "peer $2 in $1: ivnet agent --shm $REGION --size 64M --peer-id $2 --address $3/24 (pid $!)"
}

wait_ready() { # ns address pid
    for _ in $(seq 100); do
        kill -0 "$3" 2>/dev/null || die "the agent in $1 exited early (see its log below)"
        if ip -n "$1" -o addr show dev tap-shm 2>/dev/null | grep -q " $2/"; then
            return 0
        fi
        sleep 0.1
    done
    die "the agent in $1 did not bring up tap-shm with $2 within 10 s"
}

say "Starting two agents on one shared region file, $REGION (64 MiB)"
start_agent "$NS_A" 0 "$ADDR_A"
start_agent "$NS_B" 1 "$ADDR_B"
wait_ready "$NS_A" "$ADDR_A" "${AGENT_PIDS[0]}"
wait_ready "$NS_B" "$ADDR_B" "${AGENT_PIDS[1]}"
info "both TAPs are up:"
for ns in "$NS_A" "$NS_B"; do
    info "  $ns: $(ip -n "$ns" -o -4 addr show dev tap-shm | awk '{print $2, $4}')"
done

# ------------------------------------------------------------------------------------------
# Ping
# ------------------------------------------------------------------------------------------
say "Pinging $ADDR_B from $NS_A and $ADDR_A from $NS_B"
# The first exchange also resolves ARP; give it a few seconds.
for _ in $(seq 20); do
    ip netns exec "$NS_A" ping -n -q -c 1 -W 0.5 "$ADDR_B" >/dev/null 2>&1 && break
done
ip netns exec "$NS_A" ping -n -c 3 -i 0.2 -W 1 "$ADDR_B" | sed 's/^/    /'
ip netns exec "$NS_B" ping -n -c 3 -i 0.2 -W 1 "$ADDR_A" | sed 's/^/    /'

# ------------------------------------------------------------------------------------------
# TCP transfer with a checksum
# ------------------------------------------------------------------------------------------
SIZE_MB=32
say "Sending $SIZE_MB MiB of random bytes over TCP from $NS_A to $ADDR_B:$PORT"
head -c "${SIZE_MB}M" /dev/urandom >"$WORK/sent"
# A one-shot listener in B: socat when installed, else Perl (perl-base is part of every Debian).
if command -v socat >/dev/null; then
    info "listener: socat"
    ip netns exec "$NS_B" timeout 60 socat -u "TCP-LISTEN:$PORT,bind=$ADDR_B,reuseaddr" \
        "CREATE:$WORK/received" &
else
    info "listener: perl"
    # shellcheck disable=SC2016  # Perl code, not shell: no expansion wanted
    ip netns exec "$NS_B" timeout 60 perl -MIO::Socket::INET -e '
        my ($addr, $port, $out) = @ARGV;
        my $l = IO::Socket::INET->new(LocalAddr => $addr, LocalPort => $port, Listen => 1,
                                      ReuseAddr => 1) or die "listen: $!\n";
        my $c = $l->accept or die "accept: $!\n";
        open(my $f, ">:raw", $out) or die "$out: $!\n";
        binmode $c; my $buf;
        while (my $n = sysread($c, $buf, 1 << 20)) { print $f $buf or die "write: $!\n" }
        close $f or die "close: $!\n";' "$ADDR_B" "$PORT" "$WORK/received" &
fi
LISTENER=$!
for _ in $(seq 100); do
    ip netns exec "$NS_B" ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q . && break
    sleep 0.05
done
# The sender is plain bash: /dev/tcp needs no extra package.
start=$(date +%s.%N)
ip netns exec "$NS_A" timeout 60 bash -c "cat '$WORK/sent' > /dev/tcp/$ADDR_B/$PORT" ||
    die "the sender failed"
wait "$LISTENER" || die "the listener failed"
end=$(date +%s.%N)
sum_sent=$(sha256sum <"$WORK/sent" | cut -d' ' -f1)
sum_recv=$(sha256sum <"$WORK/received" | cut -d' ' -f1)
info "sent     $(stat -c %s "$WORK/sent") bytes, sha256 $sum_sent"
info "received $(stat -c %s "$WORK/received") bytes, sha256 $sum_recv"
info "took $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f s", b - a }')"
[ "$sum_sent" = "$sum_recv" ] || die "checksums differ: the transfer was corrupted"
info "checksums match"

if command -v iperf3 >/dev/null; then
    say "iperf3 for 3 s from $NS_A to $NS_B"
    ip netns exec "$NS_B" timeout 30 iperf3 -s -1 -B "$ADDR_B" >/dev/null 2>&1 &
    IPERF=$!
    for _ in $(seq 100); do
        ip netns exec "$NS_B" ss -Hltn "sport = :5201" 2>/dev/null | grep -q . && break
        sleep 0.05
    done
    ip netns exec "$NS_A" timeout 30 iperf3 -c "$ADDR_B" -t 3 -f g | grep -E 'sender|receiver' |
        sed 's/^/    /' || info "iperf3 failed (the checksummed transfer above is what counts)"
    wait "$IPERF" 2>/dev/null || true
else
    info "(iperf3 is not installed; skipping the throughput run)"
fi

# ------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------
say "ivnet status --shm $REGION"
"$IVNET" status --shm "$REGION" | sed 's/^/    /'
