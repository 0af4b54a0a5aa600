#!/bin/sh
# probe-ivshmem.sh [--peek OFF] [--poke OFF VALUE] [--vfio]   (busybox sh, runs INSIDE a guest)
#
# Finds every ivshmem PCI function (vendor 0x1af4, device 0x1110), prints one
# line per device and optionally
#   --peek OFF        reads the u32 at shared-memory offset OFF (BAR2, devmem)
#   --poke OFF VALUE  writes the u32 VALUE at shared-memory offset OFF
#   --vfio            binds the device to vfio-pci and checks /dev/vfio/GROUP
# Peek/poke go through /dev/mem (busybox cannot mmap resource2) and are done
# before the vfio binding. Offsets/values: shell arithmetic (0x.. accepted).
#
# Output (one line each, grep-able on the serial console):
#   IVNET-PROBE dev=0000:00:01.0 kind=doorbell|plain ivposition=N bar0=0x.. bar2=0x.. shm_size=N resource2_size=N iommu_group=N|none
#   IVNET-PROBE peek dev=.. off=0x.. value=0x........
#   IVNET-PROBE poke dev=.. off=0x.. value=0x........
#   IVNET-PROBE vfio dev=.. driver=vfio-pci group=N node=/dev/vfio/N
#   IVNET-PROBE-OK devices=N      (exit 0)   or   IVNET-PROBE-FAIL <reason>  (exit 1)
set -u

fail() { echo "IVNET-PROBE-FAIL $*"; exit 1; }

PEEK="" POKE_OFF="" POKE_VAL="" VFIO=0
while [ $# -gt 0 ]; do
    case "$1" in
        --peek) PEEK=$2; shift 2 ;;
        --poke) POKE_OFF=$2; POKE_VAL=$3; shift 3 ;;
        --vfio) VFIO=1; shift ;;
        *) fail "unknown argument $1" ;;
    esac
done

hex32() { printf '0x%08x' "$(($1))"; }

n=0
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" != 0x1af4 ] || [ "$(cat "$d/device")" != 0x1110 ]; then
        continue
    fi
    n=$((n + 1))
    addr=${d##*/}
    # resource: one line per BAR, "start end flags"
    bar0=$(sed -n 1p "$d/resource" | cut -d' ' -f1)
    bar1=$(sed -n 2p "$d/resource" | cut -d' ' -f1)
    bar2=$(sed -n 3p "$d/resource" | cut -d' ' -f1)
    bar2_end=$(sed -n 3p "$d/resource" | cut -d' ' -f2)
    shm_size=$((bar2_end - bar2 + 1))
    kind=plain
    [ $((bar1)) -ne 0 ] && kind=doorbell          # BAR1 = MSI-X table
    [ -e "$d/resource2" ] || fail "$addr has no resource2"
    r2size=$(stat -c %s "$d/resource2")
    ivpos=$(($(devmem "$(printf '0x%x' $((bar0 + 8)))" 32)))  # IVPosition register
    group=none
    [ -e "$d/iommu_group" ] && group=$(basename "$(readlink "$d/iommu_group")")
    echo "IVNET-PROBE dev=$addr kind=$kind ivposition=$ivpos bar0=$bar0 bar2=$bar2 shm_size=$shm_size resource2_size=$r2size iommu_group=$group"
    [ "$r2size" -eq "$shm_size" ] || fail "resource2 size $r2size != BAR2 size $shm_size"

    if [ -n "$PEEK" ]; then
        v=$(devmem "$(printf '0x%x' $((bar2 + PEEK)))" 32) || fail "devmem peek failed"
        echo "IVNET-PROBE peek dev=$addr off=$(printf '0x%x' $((PEEK))) value=$(hex32 "$v")"
    fi
    if [ -n "$POKE_OFF" ]; then
        devmem "$(printf '0x%x' $((bar2 + POKE_OFF)))" 32 "$((POKE_VAL))" || fail "devmem poke failed"
        echo "IVNET-PROBE poke dev=$addr off=$(printf '0x%x' $((POKE_OFF))) value=$(hex32 "$POKE_VAL")"
    fi

    if [ "$VFIO" = 1 ]; then
        [ "$group" != none ] || fail "$addr has no IOMMU group (boot with intel-iommu + intel_iommu=on)"
        modprobe vfio-pci 2>/dev/null
        echo vfio-pci >"$d/driver_override" || fail "cannot write driver_override"
        if [ -e "$d/driver" ]; then
            echo "$addr" >"$d/driver/unbind" 2>/dev/null
        fi
        echo "$addr" >/sys/bus/pci/drivers_probe
        drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
        [ "$drv" = vfio-pci ] || fail "$addr not bound to vfio-pci (driver=${drv:-none}); see dmesg"
        [ -c "/dev/vfio/$group" ] || fail "/dev/vfio/$group missing"
        echo "IVNET-PROBE vfio dev=$addr driver=$drv group=$group node=/dev/vfio/$group"
    fi
done
[ "$n" -gt 0 ] || fail "no ivshmem device (1af4:1110) found"
echo "IVNET-PROBE-OK devices=$n"
