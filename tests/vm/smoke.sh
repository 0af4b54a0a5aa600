#!/usr/bin/env bash
# smoke.sh [KITDIR]
#
# End-to-end check of the guest kit on this machine (no ivshmem server needed):
# builds the kit (cached), boots one guest (TCG unless KVM really works) with
# intel-iommu (intremap=on) and an ivshmem-plain device backed by a fresh
# /dev/shm file, and inside the guest runs guest/probe-ivshmem.sh, which
#   - finds the device, reads IVPosition from BAR0,
#   - reads a word the host wrote into the shared memory,
#   - writes a word the host then checks in the /dev/shm file,
#   - binds the device to vfio-pci and checks /dev/vfio/GROUP.
# KITDIR defaults to $IVNET_VM_CACHE/kit. Prints "vm-smoke: N passed, M failed".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${IVNET_VM_CACHE:-/var/tmp/ivnet-vm-cache}
KIT=${1:-$CACHE/kit}

"$HERE/build-guest.sh" "$KIT"

SHM=/dev/shm/ivnet-smoke-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ivnet-smoke.XXXXXX")
trap 'rm -rf "$WORK" "$SHM"' EXIT

truncate -s 16M "$SHM"
# host -> guest: u32 0x1a2b3c4d (little endian) at offset 0x100
printf '\x4d\x3c\x2b\x1a' | dd of="$SHM" bs=1 seek=256 conv=notrunc status=none
cat >"$WORK/run.sh" <<'EOF'
sh /ivnet/probe-ivshmem.sh --peek 0x100 --poke 0x200 0xcafef00d --vfio
EOF

passed=0 failed=0
check() {
    # check NAME COMMAND...: run a check and count it
    if "${@:2}"; then
        echo "vm-smoke: ok   $1"; passed=$((passed + 1))
    else
        echo "vm-smoke: FAIL $1"; failed=$((failed + 1))
    fi
}

rc=0
start=$(date +%s%N)
"$HERE/run-guest.sh" --kit "$KIT" --name smoke --timeout 180 \
    --plain "$SHM" --shm-size 16M \
    --file "$HERE/guest/probe-ivshmem.sh:/ivnet/probe-ivshmem.sh" \
    --script "$WORK/run.sh" --log "$WORK/console.log" >/dev/null || rc=$?
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "vm-smoke: guest exited rc=$rc after ${elapsed_ms} ms"

console=$WORK/console.log
check "guest script succeeded"   test "$rc" -eq 0
check "device found"             grep -q 'IVNET-PROBE dev=.* kind=plain' "$console"
check "host->guest shm word"     grep -q 'IVNET-PROBE peek .* value=0x1a2b3c4d' "$console"
check "guest->host shm word"     test "$(od -An -tx4 -j 512 -N 4 "$SHM" | tr -d ' ')" = cafef00d
check "bound to vfio-pci"        grep -q 'IVNET-PROBE vfio .*driver=vfio-pci' "$console"
check "probe ok"                 grep -q 'IVNET-PROBE-OK' "$console"
if [[ $failed -ne 0 ]]; then
    echo "---- guest console ----"
    cat "$console"
fi
echo "vm-smoke: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
