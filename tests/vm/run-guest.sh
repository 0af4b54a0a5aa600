#!/usr/bin/env bash
# run-guest.sh --kit KITDIR [options] [-- EXTRA_QEMU_ARGS...]
#
# Boots one ivnet test guest (kit made by build-guest.sh) in QEMU, streams its
# serial console to stdout (and --log FILE), and exits with the guest
# script's exit code (parsed from "IVNET-GUEST-DONE rc=N"), 124 on timeout,
# or 125 when the guest never reported DONE. See README.md for the markers.
#
# Options:
#   --kit DIR           output dir of build-guest.sh (vmlinuz, initramfs.cpio.gz)
#   --script FILE       guest script, becomes /ivnet/run.sh (run by /init)
#   --file SRC:DEST     extra file for the guest, e.g. ./agent:/bin/ivnet-agent
#                       (repeatable; DEST is an absolute guest path)
#   --name NAME         guest hostname (kernel arg ivnet.name=NAME)
#   --doorbell SOCK     add ivshmem-doorbell on a chardev socket to an
#                       ivshmem-server at SOCK (server must already listen)
#   --vectors N         MSI-X vectors of the doorbell device (default 2)
#   --plain FILE        add ivshmem-plain backed by FILE (e.g. /dev/shm/x;
#                       QEMU creates it if absent, size --shm-size)
#   --shm-size SIZE     size for --plain (default 16M; power of two)
#   --no-iommu          no intel-iommu device / intel_iommu=on (sysfs-only use)
#   --unsafe-interrupts IOMMU without interrupt remapping (intremap=off) and
#                       vfio_iommu_type1.allow_unsafe_interrupts=1
#   --append ARGS       extra kernel command-line words
#   --mem SIZE          guest RAM (default 512M)
#   --smp N             guest CPUs (default 1)
#   --accel A           auto|tcg|kvm (default $IVNET_VM_ACCEL or auto: KVM only
#                       if a probe boot under KVM succeeds, cached per host boot)
#   --timeout SECS      kill the guest after SECS (default 300)
#   --log FILE          also write the console to FILE
#   --make-initrd FILE  write the combined initramfs (base + overlay) to FILE
#                       and exit (with --print-cmd: print a command using FILE)
#   --print-cmd         print the QEMU command line (shell-quoted) and exit;
#                       without --make-initrd it names the base initramfs only
#
# Env: IVNET_VM_CACHE (default /var/tmp/ivnet-vm-cache) holds the KVM probe
# result; IVNET_VM_ACCEL overrides --accel's default; QEMU overrides the binary.
set -euo pipefail

PROG=run-guest.sh
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

KIT="" SCRIPT="" NAME="" DOORBELL="" VECTORS=2 PLAIN="" SHM_SIZE=16M
IOMMU=on UNSAFE=0 APPEND="" MEM=512M SMP=1 ACCEL=${IVNET_VM_ACCEL:-auto}
TIMEOUT=300 LOGFILE="" PRINT=0 MAKE_INITRD=""
FILES=()
EXTRA=()
CACHE=${IVNET_VM_CACHE:-/var/tmp/ivnet-vm-cache}
QEMU=${QEMU:-qemu-system-x86_64}

need() { [[ $# -ge 2 ]] || die "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --kit) need "$@"; KIT=$2; shift 2 ;;
        --script) need "$@"; SCRIPT=$2; shift 2 ;;
        --file) need "$@"; FILES+=("$2"); shift 2 ;;
        --name) need "$@"; NAME=$2; shift 2 ;;
        --doorbell) need "$@"; DOORBELL=$2; shift 2 ;;
        --vectors) need "$@"; VECTORS=$2; shift 2 ;;
        --plain) need "$@"; PLAIN=$2; shift 2 ;;
        --shm-size) need "$@"; SHM_SIZE=$2; shift 2 ;;
        --no-iommu) IOMMU=off; shift ;;
        --unsafe-interrupts) UNSAFE=1; shift ;;
        --append) need "$@"; APPEND=$2; shift 2 ;;
        --mem) need "$@"; MEM=$2; shift 2 ;;
        --smp) need "$@"; SMP=$2; shift 2 ;;
        --accel) need "$@"; ACCEL=$2; shift 2 ;;
        --timeout) need "$@"; TIMEOUT=$2; shift 2 ;;
        --log) need "$@"; LOGFILE=$2; shift 2 ;;
        --print-cmd) PRINT=1; shift ;;
        --make-initrd) need "$@"; MAKE_INITRD=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ -n $KIT ]] || die "--kit KITDIR is required"
[[ -f $KIT/vmlinuz && -f $KIT/initramfs.cpio.gz ]] || die "$KIT has no vmlinuz/initramfs.cpio.gz; run build-guest.sh $KIT"
[[ -z $SCRIPT || -f $SCRIPT ]] || die "script '$SCRIPT' not found"
[[ -z $DOORBELL || -S $DOORBELL || $PRINT == 1 ]] || die "doorbell socket '$DOORBELL' is not a listening unix socket"

if ! command -v "$QEMU" >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "$QEMU not found; install qemu-system-x86"
    log "installing qemu-system-x86"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 \
        || die "apt-get install qemu-system-x86 failed"
fi

# ------------------------------------------------------------ accelerator
probe_kvm() {
    # Prints "kvm" if a kit guest boots under KVM here, else "tcg". The
    # result is cached per host boot (boot_id) in $CACHE.
    [[ -r /dev/kvm && -w /dev/kvm ]] || { echo tcg; return; }
    local boot_id cache res=tcg out
    boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
    mkdir -p "$CACHE"
    cache=$CACHE/accel-probe.$boot_id
    exec 7>"$CACHE/.accel-lock"
    flock 7
    if [[ -f $cache ]]; then
        cat "$cache"
        flock -u 7
        return
    fi
    log "probing KVM (one-off per host boot; result cached in $cache)"
    out=$(timeout 20 "$QEMU" -machine q35 -accel kvm -cpu host -m 256M -smp 1 \
        -nodefaults -display none -no-reboot -serial stdio \
        -kernel "$KIT/vmlinuz" -initrd "$KIT/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 ivnet.cmd=true" </dev/null 2>&1 || true)
    if grep -q 'IVNET-GUEST-DONE rc=0' <<<"$out"; then res=kvm; fi
    echo "$res" >"$cache"
    flock -u 7
    echo "$res"
}
case $ACCEL in
    auto) ACCEL=$(probe_kvm) ;;
    tcg|kvm) ;;
    *) die "--accel must be auto, tcg or kvm" ;;
esac
if [[ $ACCEL == kvm ]]; then
    ACCEL_ARGS=(-accel kvm -cpu host)
else
    # -cpu max: x2apic etc.; TCG has no in-kernel irqchip, so intremap works
    ACCEL_ARGS=(-accel tcg -cpu max)
fi

# ------------------------------------------------------------ command line
KARGS=(console=ttyS0 quiet panic=-1)
MACHINE=q35
DEV_ARGS=()
if [[ $IOMMU == on ]]; then
    # intel-iommu must come before the devices it translates
    MACHINE=q35,kernel-irqchip=split   # required for intremap=on under KVM; harmless under TCG
    if [[ $UNSAFE == 1 ]]; then
        DEV_ARGS+=(-device "intel-iommu,intremap=off")
        KARGS+=(intel_iommu=on vfio_iommu_type1.allow_unsafe_interrupts=1)
    else
        DEV_ARGS+=(-device "intel-iommu,intremap=on")
        KARGS+=(intel_iommu=on)
    fi
fi
if [[ -n $DOORBELL ]]; then
    DEV_ARGS+=(-chardev "socket,path=$DOORBELL,id=ivs0"
               -device "ivshmem-doorbell,chardev=ivs0,vectors=$VECTORS")
fi
if [[ -n $PLAIN ]]; then
    DEV_ARGS+=(-object "memory-backend-file,id=ivhm0,share=on,mem-path=$PLAIN,size=$SHM_SIZE"
               -device "ivshmem-plain,memdev=ivhm0")
fi
[[ -n $NAME ]] && KARGS+=("ivnet.name=$NAME")
read -r -a extra_kargs <<<"$APPEND"
KARGS+=("${extra_kargs[@]}")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ivnet-guest.XXXXXX")
QPID_FILE=$WORK/qemu.pid
WATCHDOG=""
# shellcheck disable=SC2317  # invoked from trap
cleanup() {
    local p=""
    [[ -f $QPID_FILE ]] && p=$(cat "$QPID_FILE" 2>/dev/null || true)
    if [[ -n $p ]]; then
        kill "$p" 2>/dev/null || true
    fi
    if [[ -n $WATCHDOG ]]; then
        kill "$WATCHDOG" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

INITRD=$KIT/initramfs.cpio.gz
if [[ $PRINT == 1 && -z $MAKE_INITRD ]]; then
    :   # print the command with the base initramfs only
elif [[ -n $SCRIPT || ${#FILES[@]} -gt 0 ]]; then
    # per-guest overlay archive, concatenated to the base (see build-guest.sh)
    OV=$WORK/overlay
    mkdir -p "$OV/ivnet"
    [[ -n $SCRIPT ]] && install -m 0755 "$SCRIPT" "$OV/ivnet/run.sh"
    for f in "${FILES[@]}"; do
        src=${f%%:*} dest=${f#*:}
        [[ $f == *:* && $dest == /* ]] || die "--file wants SRC:/ABS/DEST, got '$f'"
        [[ -f $src ]] || die "--file source '$src' not found"
        mkdir -p "$OV$(dirname "$dest")"
        cp "$src" "$OV$dest"
    done
    if command -v cpio >/dev/null && cpio --version 2>/dev/null | grep -q GNU; then
        CPIO=(cpio -o -H newc -R 0:0 --quiet)
    else
        CPIO=(busybox cpio -o -H newc -R 0:0)
    fi
    (cd "$OV" && find . -mindepth 1 | LC_ALL=C sort | "${CPIO[@]}") | gzip -1 >"$WORK/overlay.cpio.gz"
    cat "$KIT/initramfs.cpio.gz" "$WORK/overlay.cpio.gz" >"$WORK/run.cpio.gz"
    INITRD=$WORK/run.cpio.gz
fi

if [[ -n $MAKE_INITRD ]]; then
    cp "$INITRD" "$MAKE_INITRD.tmp.$$"
    mv -f "$MAKE_INITRD.tmp.$$" "$MAKE_INITRD"
    INITRD=$MAKE_INITRD
fi

CMD=("$QEMU" -machine "$MACHINE" "${ACCEL_ARGS[@]}" -m "$MEM" -smp "$SMP"
     -nodefaults -display none -no-reboot -serial stdio
     "${DEV_ARGS[@]}"
     -kernel "$KIT/vmlinuz" -initrd "$INITRD" -append "${KARGS[*]}"
     "${EXTRA[@]}")

if [[ $PRINT == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
fi
if [[ $PRINT == 1 || -n $MAKE_INITRD ]]; then
    exit 0
fi

CONSOLE=$WORK/console.log
# QEMU writes its pid (for cleanup); the console goes to stdout and $CONSOLE.
{ r=0
  timeout "$TIMEOUT" "${CMD[@]}" -pidfile "$QPID_FILE" </dev/null 2>&1 || r=$?
  echo "$r" 2>/dev/null >"$WORK/qemu.rc" || true; } | tee "$CONSOLE" ${LOGFILE:+"$LOGFILE"} &
TEE_PID=$!
# Watchdog: if this script dies without running its traps (SIGKILL, e.g.
# Rust's Child::kill), stop QEMU and remove the work dir within ~0.5 s.
( while kill -0 "$$" 2>/dev/null; do sleep 0.5; done
  p=$(cat "$QPID_FILE" 2>/dev/null) && kill "$p"
  rm -rf "$WORK" ) </dev/null >/dev/null 2>&1 &
WATCHDOG=$!
wait "$TEE_PID" || true
qrc=$(cat "$WORK/qemu.rc" 2>/dev/null || echo 1)
rm -f "$QPID_FILE"
if [[ $qrc == 124 ]]; then
    log "timeout after ${TIMEOUT}s"
    exit 124
fi
rc_line=$(grep -a -o 'IVNET-GUEST-DONE rc=[0-9]*' "$CONSOLE" | tail -n1 || true)
if [[ -z $rc_line ]]; then
    log "guest did not report IVNET-GUEST-DONE (qemu exit $qrc)"
    exit 125
fi
exit "${rc_line##*=}"
