# Guest side of tests/two_vms.rs (run by the kit's /init as /ivnet/run.sh; busybox sh).
#
# The host drives the test through a second serial port (ttyS1, a UNIX socket on the host): one
# command per line, "ID<TAB>COMMAND". Each command is eval'd in this shell, so it can call the
# functions below; its output goes to the console (ttyS0) between
#     IVNET-CMD-START ID
#     IVNET-CMD-END ID rc=N
# Results that the host asserts on are printed as "IVNET-T <what> key=value..." lines. Every
# wait in here has a deadline, so a command always ends. The agent runs in the background with
# its log (-v) on the console, so the host sees "peer N is down" etc. as they happen.
# "exit" ends the loop; /init then powers the guest off.

mark() { echo "IVNET-T $*"; }

# Milliseconds since boot.
now_ms() {
    read -r u _ </proc/uptime
    echo $((${u%.*} * 1000 + 1${u#*.} * 10 - 1000))
}

# Sum of the vfio-msix interrupt counts over all CPUs.
msix_count() {
    awk '/vfio-msix/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' \
        /proc/interrupts
}

# msix: prints the vfio-msix lines of /proc/interrupts and their total.
msix() {
    grep vfio-msix /proc/interrupts
    mark "msix total=$(msix_count)"
}

# agent_start CIDR [AGENT FLAGS...]: starts `ivnet -v agent --device auto --bind` in the
# background and waits (30 s) until tap-shm carries CIDR.
agent_start() {
    cidr=$1
    shift
    t0=$(now_ms)
    ivnet -v agent --device auto --bind --address "$cidr" "$@" &
    echo $! >/tmp/agent.pid
    end=$((t0 + 30000))
    until ip addr show dev tap-shm 2>/dev/null | grep -q "inet $cidr "; do
        if ! kill -0 "$(cat /tmp/agent.pid)" 2>/dev/null; then
            mark "agent-exited"
            return 1
        fi
        if [ "$(now_ms)" -gt "$end" ]; then
            mark "agent-timeout"
            return 1
        fi
        sleep 0.1
    done
    ip addr show dev tap-shm
    mark "agent-up cidr=$cidr ms=$(($(now_ms) - t0))"
}

# agent_stop: SIGTERM, then up to 5 s for the agent to leave the segment.
agent_stop() {
    pid=$(cat /tmp/agent.pid) || return 1
    kill "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt 50 ] && { mark "agent-stop-timeout"; return 1; }
        sleep 0.1
    done
    mark "agent-stopped"
}

# reach ADDR SECS: pings once a second until ADDR answers (first contact resolves ARP and
# lets both agents see each other's link up).
reach() {
    t0=$(now_ms)
    end=$((t0 + $2 * 1000))
    until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        if [ "$(now_ms)" -gt "$end" ]; then
            mark "unreachable addr=$1 after_ms=$(($(now_ms) - t0))"
            return 1
        fi
    done
    mark "reachable addr=$1 ms=$(($(now_ms) - t0))"
}

# pings ADDR COUNT: COUNT pings 0.2 s apart; fails unless every one is answered.
pings() {
    out=$(ping -c "$2" -i 0.2 -W 2 "$1" 2>&1)
    echo "$out"
    sent=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    rtt=$(echo "$out" | sed -n 's/^round-trip min\/avg\/max = \([^ ]*\) ms.*/\1/p')
    mark "ping addr=$1 sent=${sent:-0} recv=${recv:-0} rtt_ms=${rtt:-none}"
    [ -n "$sent" ] && [ "$sent" = "$2" ] && [ "$recv" = "$2" ]
}

# rx_listen PORT: receives one TCP stream into /tmp/rx.bin, in the background.
# (busybox nc: with -e the program gets the socket, so the stream ends when the sender closes;
# plain `nc -l >file </dev/null` would half-close at once and the sender would stop early.)
rx_listen() {
    rm -f /tmp/rx.bin
    nc -l -p "$1" -e sh -c 'cat >/tmp/rx.bin' &
    echo $! >/tmp/rx.pid
    i=0
    until netstat -ltn 2>/dev/null | grep -q ":$1 "; do
        i=$((i + 1))
        [ $i -gt 100 ] && { mark "listen-timeout port=$1"; return 1; }
        sleep 0.1
    done
    mark "listening port=$1"
}

# rx_wait SECS: waits for the stream to end; prints its size and SHA-256.
rx_wait() {
    pid=$(cat /tmp/rx.pid)
    end=$(($(now_ms) + $1 * 1000))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(now_ms)" -gt "$end" ]; then
            mark "rx-timeout bytes=$(wc -c </tmp/rx.bin 2>/dev/null)"
            kill "$pid"
            return 1
        fi
        sleep 0.1
    done
    mark "rx bytes=$(wc -c </tmp/rx.bin) sha256=$(sha256sum /tmp/rx.bin | cut -d' ' -f1)"
}

# tx_send ADDR PORT MIB: sends MIB MiB from /dev/urandom; prints size, SHA-256 and duration.
tx_send() {
    dd if=/dev/urandom of=/tmp/tx.bin bs=1048576 count="$3" 2>/dev/null || return 1
    mark "tx-data bytes=$(wc -c </tmp/tx.bin) sha256=$(sha256sum /tmp/tx.bin | cut -d' ' -f1)"
    t0=$(now_ms)
    timeout 120 nc "$1" "$2" </tmp/tx.bin
    rc=$?
    mark "tx-done rc=$rc ms=$(($(now_ms) - t0))"
    return $rc
}

# status_dev: `ivnet status --device auto`, the region read through the device's BAR2
# (sysfs resource2, read-only), and the number of peers it shows up.
status_dev() {
    ivnet status --device auto || return 1
    up=$(ivnet status --device auto --json | grep -c '"state": "up"')
    mark "status peers_up=$up"
}

stty -F /dev/ttyS1 raw -echo || { echo "IVNET-T no-control-port"; exit 1; }
exec 3<>/dev/ttyS1
echo "IVNET-CTL-READY"
while IFS= read -r line <&3; do
    id=${line%%	*}
    cmd=${line#*	}
    [ "$cmd" = exit ] && break
    echo "IVNET-CMD-START $id"
    eval "$cmd"
    echo "IVNET-CMD-END $id rc=$?"
done
echo "IVNET-CTL-EXIT"
