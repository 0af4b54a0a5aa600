#!/bin/bash
# Guest side of tests/systemd_guests.rs, started at boot by ivnet-test.service in a Debian guest
# that booted systemd and has the ivnet package installed. Nothing is typed into the guest: the
# agent comes up from its unit, systemd-networkd gives tap-shm its address, and this script
# checks what a user would check, printing "IVNET-T <what> key=value..." lines on the console
# (the host asserts on them). Every wait has a deadline, so the script always ends with
# "IVNET-T done" or "IVNET-T fail step=...".
#
# /etc/ivnet-test.env (per guest, from the host) sets ROLE (a or b), SELF and PEER (addresses
# without prefix), PORT and MIB (the TCP transfer from A to B). Guest A then restarts, kills
# and stops its agent; B only answers.
set -u
# shellcheck source=/dev/null
. /etc/ivnet-test.env

mark() { echo "IVNET-T $*"; }
ms() { date +%s%3N; }
up() { cut -d' ' -f1 /proc/uptime; }
fail() {
    mark "fail step=$1 ${2:-}"
    systemctl --no-pager status ivnet-agent 2>&1 | tail -n 20
    journalctl -b --no-pager -o short-monotonic -u ivnet-agent 2>&1 | tail -n 60
    ip -d link show dev tap-shm 2>&1
    ip addr show dev tap-shm 2>&1
    ip neigh 2>&1
    ivnet status 2>&1
    dmesg 2>&1 | grep -i -E 'vfio|dmar|iommu' | tail -n 20
    mark "fail-end"
    exit 1
}
# wait_for SECS CMD...: runs CMD every 0.2 s until it succeeds; false after SECS.
wait_for() {
    local end=$(( $(ms) + $1 * 1000 ))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(ms)" -gt "$end" ] && return 1
        sleep 0.2
    done
}
has_addr() { ip -4 addr show dev tap-shm 2>/dev/null | grep -q "inet $SELF/"; }
agent_pid() { systemctl show -p MainPID --value ivnet-agent; }
# new_agent_pid OLD: the agent runs under another pid than OLD.
new_agent() {
    local p
    p=$(agent_pid)
    [ "$p" != 0 ] && [ "$p" != "$1" ] && systemctl is-active --quiet ivnet-agent
}
reach() { wait_for "$1" ping -c 1 -W 1 "$PEER"; }

mark "booted uptime=$(up) role=$ROLE"

# ---- the service path: unit active, address from networkd, the peer reachable -------------
wait_for 120 systemctl is-active --quiet ivnet-agent ||
    fail agent-active "state=$(systemctl is-active ivnet-agent)"
mark "agent-active uptime=$(up) pid=$(agent_pid)"
wait_for 60 has_addr || fail address "$(ip addr show dev tap-shm 2>&1 | tr '\n' ' ')"
mark "address uptime=$(up) cidr=$(ip -4 -o addr show dev tap-shm | awk '{print $4}')"
reach 120 || fail first-ping
mark "first-ping uptime=$(up)"
out=$(ping -c 5 -i 0.2 -W 2 "$PEER" 2>&1)
recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) received.*/\1/p')
mark "pings sent=5 recv=${recv:-0}"

# The journal shows the peer coming up (the agent's log: "peer N (MAC) is up").
wait_for 30 sh -c "journalctl -b --no-pager -u ivnet-agent | grep -q ') is up'" || fail journal
line=$(journalctl -b --no-pager -o cat -u ivnet-agent | grep ') is up' | head -n 1)
mark "journal-peer-up line=${line// /_}"

# `ivnet status` asks the agent over its control socket (vfio-pci holds the device).
st=$(ivnet status --json) || fail status "$(ivnet status 2>&1)"
peers_up=$(echo "$st" | grep -c '"state": "up"')
tap=$(echo "$st" | sed -n 's/.*"tap": "\([^"]*\)".*/\1/p' | head -n 1)
ivnet status
ivnet status | grep -q "addresses: $PEER/" || fail status-addresses "$(ivnet status)"
backend=$(echo "$st" | sed -n 's/.*"backend": "\([^"]*\)".*/\1/p' | head -n 1)
slot_mac=$(echo "$st" | sed -n 's/.*"mac": "\([^"]*\)".*/\1/p' | tail -n 1)
mark "status peers_up=$peers_up tap=$tap peer_address=yes backend=${backend// /_} slot_mac=$slot_mac tap_mac=$(cat /sys/class/net/tap-shm/address)"
journalctl -b --no-pager -o cat -u ivnet-agent | grep -i -E 'vfio|sysfs|bound|warn' | head -n 10

# What the package put in place.
pkg=ok
for f in /usr/bin/ivnet /etc/ivnet/ivnet.toml /usr/share/doc/ivnet/README.md \
    /usr/share/doc/ivnet/examples/tap-shm.network /usr/share/man/man1/ivnet.1.gz \
    /usr/share/bash-completion/completions/ivnet /usr/lib/modules-load.d/ivnet.conf \
    /usr/lib/systemd/network/70-ivnet-tap.link; do
    [ -e "$f" ] || { pkg="missing:$f"; break; }
done
mark "package files=$pkg agent=$(systemctl is-enabled ivnet-agent) server=$(systemctl is-enabled ivnet-server) timer=$(systemctl is-enabled ivnet-metrics.timer) vfio_pci=$(test -d /sys/module/vfio_pci && echo loaded) tun=$(test -d /sys/module/tun && echo loaded)"

# ---- TCP from A to B, SHA-256 on both ends --------------------------------------------------
if [ "$ROLE" = b ]; then
    nc -l "$PORT" </dev/null >/tmp/rx.bin &
    rx=$!
    mark "listening port=$PORT"
    end=$(( $(ms) + 300000 ))
    while kill -0 "$rx" 2>/dev/null; do
        [ "$(ms)" -gt "$end" ] && { kill "$rx"; fail rx "bytes=$(stat -c %s /tmp/rx.bin)"; }
        sleep 0.2
    done
    mark "rx bytes=$(stat -c %s /tmp/rx.bin) sha256=$(sha256sum /tmp/rx.bin | cut -d' ' -f1)"
    mark "done"
    exit 0
fi
head -c "$((MIB * 1048576))" /dev/urandom >/tmp/tx.bin
mark "tx-data bytes=$(stat -c %s /tmp/tx.bin) sha256=$(sha256sum /tmp/tx.bin | cut -d' ' -f1)"
t0=$(ms)
# B may not listen yet: retry while the connection is refused.
wait_for 120 nc -N "$PEER" "$PORT" </tmp/tx.bin || fail tx
mark "tx-done ms=$(( $(ms) - t0 ))"

# ---- metrics for node_exporter: the timer's service by hand, then the timer -----------------
systemctl start ivnet-metrics.service || fail metrics "$(systemctl status ivnet-metrics.service 2>&1 | tail -n 5)"
prom=/var/lib/prometheus/node-exporter/ivnet.prom
grep -q '^ivnet_peer_up{' "$prom" || fail metrics "no ivnet_peer_up in $prom"
lines=$(grep -c '^ivnet_peer_up{' "$prom")
info=$(grep -c '^ivnet_agent_info{' "$prom")
# The timer (as `systemctl enable --now ivnet-metrics.timer` would start it) writes it again.
rm -f "$prom"
systemctl start ivnet-metrics.timer || fail metrics-timer
wait_for 60 test -s "$prom" || fail metrics-timer "no $prom from the timer: $(systemctl list-timers --all --no-pager 2>&1 | grep ivnet)"
mark "metrics peer_up_lines=$lines agent_info=$info timer=fired"

# ---- the agent restarted by systemctl: networkd restores the address, traffic resumes -------
old=$(agent_pid)
t0=$(ms)
systemctl restart ivnet-agent || fail restart
wait_for 60 new_agent "$old" || fail restart-active
active=$(( $(ms) - t0 ))
wait_for 60 has_addr || fail restart-address
addr=$(( $(ms) - t0 ))
reach 60 || fail restart-ping
mark "restart active_ms=$active address_ms=$addr resumed_ms=$(( $(ms) - t0 ))"

# ---- SIGKILL: systemd restarts it (Restart=on-failure) --------------------------------------
old=$(agent_pid)
t0=$(ms)
kill -KILL "$old"
wait_for 60 new_agent "$old" || fail sigkill-restart "pid=$(agent_pid) state=$(systemctl is-active ivnet-agent)"
active=$(( $(ms) - t0 ))
wait_for 60 has_addr || fail sigkill-address
reach 60 || fail sigkill-ping
mark "sigkill old_pid=$old new_pid=$(agent_pid) active_ms=$active resumed_ms=$(( $(ms) - t0 ))"

# ---- SIGSTOP: the watchdog (WatchdogSec=) restarts it ---------------------------------------
wd=$(systemctl show -p WatchdogUSec --value ivnet-agent)
if [ -z "$wd" ] || [ "$wd" = 0 ] || [ "$wd" = infinity ]; then
    mark "sigstop skipped=no-watchdog watchdog=${wd:-none}"
else
    old=$(agent_pid)
    t0=$(ms)
    kill -STOP "$old"
    wait_for 180 new_agent "$old" || { kill -CONT "$old"; fail sigstop-restart "watchdog=$wd"; }
    active=$(( $(ms) - t0 ))
    logged=no
    journalctl -b --no-pager -u ivnet-agent | grep -qi 'watchdog timeout' && logged=yes
    wait_for 60 has_addr || fail sigstop-address
    reach 60 || fail sigstop-ping
    mark "sigstop watchdog=$wd old_pid=$old new_pid=$(agent_pid) active_ms=$active logged=$logged resumed_ms=$(( $(ms) - t0 ))"
fi
mark "done"
