#!/usr/bin/env bash
# build-guest.sh OUTDIR [EXTRA_BINARY...]
#
# Builds the ivnet test-guest kit into OUTDIR:
#   OUTDIR/vmlinuz            Debian bookworm cloud kernel (linux-image-6.1.*-cloud-amd64)
#   OUTDIR/initramfs.cpio.gz  base initramfs: busybox-static, /init, the vfio/tun
#                             kernel modules (+ modules.dep so busybox `modprobe` works)
#                             and every EXTRA_BINARY copied to /bin/<basename>
#   OUTDIR/kernel-version     e.g. 6.1.0-56-cloud-amd64
#   OUTDIR/ivnet-kit.stamp    hash of all inputs; when it matches, nothing is rebuilt
#
# Caches (downloaded .debs, unpacked kernel) live in $IVNET_VM_CACHE
# (default /var/tmp/ivnet-vm-cache). The first kernel found there is reused
# (no apt traffic at all on later runs); IVNET_VM_REFRESH=1 re-resolves the
# newest linux-image-cloud-amd64. Safe to run concurrently (flock).
#
# Extra kernel modules: IVNET_VM_EXTRA_MODULES="veth bridge" (space separated).
#
# ---------------------------------------------------------------------------
# Per-guest script mechanism (how a host test tells a guest what to do)
# ---------------------------------------------------------------------------
# Linux accepts an initramfs made of several concatenated cpio archives, each
# optionally compressed; later archives add to / overwrite files of earlier
# ones. QEMU's -initrd takes ONE file, so a host test builds a small per-guest
# "overlay" archive and concatenates it to the base one at launch time:
#
#     mkdir -p ov/ivnet && cp my-test.sh ov/ivnet/run.sh && chmod +x ov/ivnet/run.sh
#     (cd ov && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) > guest1.cpio.gz
#     cat OUTDIR/initramfs.cpio.gz guest1.cpio.gz > guest1-run.cpio.gz
#     qemu-system-x86_64 ... -kernel OUTDIR/vmlinuz -initrd guest1-run.cpio.gz
#
# (run-guest.sh in this directory does exactly that: --script/--file.)
# The overlay must contain the directory entries before the files (find does
# that). Any file can be shipped this way (e.g. the agent binary at /bin/x).
#
# /init inside the guest:
#   1. mounts proc, sysfs, devtmpfs, devpts, tmpfs(/tmp,/run,/dev/shm)
#   2. loads the modules listed in /etc/ivnet/modules with busybox modprobe;
#      module options on the kernel command line (MOD.PARAM=VAL, e.g.
#      vfio_iommu_type1.allow_unsafe_interrupts=1) are passed to modprobe
#   3. brings up lo, sets hostname from ivnet.name=NAME (default ivnet-guest)
#   4. prints   IVNET-GUEST-READY uptime=<s>
#   5. runs /ivnet/run.sh (sh) if present, else the command in
#      ivnet.cmd="..." on the kernel command line, else (ivnet.shell=1) an
#      interactive shell, else nothing
#   6. prints   IVNET-GUEST-DONE rc=<exit code of the script>
#      then     IVNET-GUEST-POWEROFF   and   poweroff -f   (QEMU exits)
# The script runs with cwd /, PATH=/bin:/sbin:/usr/bin:/usr/sbin, stdout and
# stderr on the serial console (ttyS0). Kernel command-line words of the form
# NAME=VALUE without a dot are also in its environment (kernel behaviour).
set -euo pipefail

PROG=build-guest.sh
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

[[ $# -ge 1 ]] || die "usage: $PROG OUTDIR [EXTRA_BINARY...]"
OUTDIR=$1
shift
EXTRA_BINARIES=("$@")

CACHE=${IVNET_VM_CACHE:-/var/tmp/ivnet-vm-cache}
# Modules required by ivnet; their dependencies are resolved from modules.dep.
MODULES=(irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci tun)
read -r -a extra_mods <<<"${IVNET_VM_EXTRA_MODULES:-}"
MODULES+=("${extra_mods[@]}")

u_le() {
    # u_le FILE OFFSET NBYTES: little-endian unsigned integer read from FILE
    local v=0 i bytes
    read -r -a bytes < <(od -An -v -tu1 -j "$2" -N "$3" "$1")
    for ((i = ${#bytes[@]} - 1; i >= 0; i--)); do v=$((v * 256 + bytes[i])); done
    echo "$v"
}
elf_interp() {
    # elf_interp FILE: exit 0 if FILE is an ELF64 with a PT_INTERP header
    # (dynamically linked: cannot run in the guest, which has no libc)
    local phoff phentsize phnum i
    [[ $(od -An -c -N 4 "$1" | tr -d ' ') == 177ELF ]] || return 1
    [[ $(u_le "$1" 4 1) == 2 ]] || return 1          # ELFCLASS64
    phoff=$(u_le "$1" 32 8); phentsize=$(u_le "$1" 54 2); phnum=$(u_le "$1" 56 2)
    for ((i = 0; i < phnum; i++)); do
        [[ $(u_le "$1" $((phoff + i * phentsize)) 4) == 3 ]] && return 0
    done
    return 1
}
for b in "${EXTRA_BINARIES[@]}"; do
    [[ -f $b ]] || die "extra binary '$b' does not exist or is not a regular file"
    if elf_interp "$b"; then
        die "extra binary '$b' is dynamically linked; the guest has no libc. Build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu"
    fi
done

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
    # apt_install PACKAGE...: install Debian packages (root only).
    [[ $(id -u) -eq 0 ]] || die "need packages '$*' but not root; install them first"
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

BUSYBOX=""
if [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1; then
    BUSYBOX=/bin/busybox
fi
if [[ -z $BUSYBOX ]]; then
    apt_install busybox-static
    BUSYBOX=/bin/busybox
fi
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; install busybox-static"
for t in dpkg-deb apt-get gzip flock sha256sum; do
    command -v "$t" >/dev/null || die "required tool '$t' not found"
done
if command -v cpio >/dev/null && cpio --version 2>/dev/null | grep -q GNU; then
    CPIO=(cpio -o -H newc -R 0:0 --quiet)
else
    CPIO=("$BUSYBOX" cpio -o -H newc -R 0:0)
fi

# ---------------------------------------------------------------- kernel
mkdir -p "$CACHE/debs" "$CACHE/kernel"
exec 8>"$CACHE/.lock"
flock 8

apt_download() {
    # apt_download SPEC: download a .deb into $CACHE/debs (retry after apt-get update)
    if ! (cd "$CACHE/debs" && apt-get -q -o APT::Sandbox::User=root download "$1" >&2); then
        [[ $(id -u) -eq 0 ]] || die "apt-get download $1 failed (not root, cannot apt-get update)"
        log "apt-get download $1 failed; running apt-get update and retrying"
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
        (cd "$CACHE/debs" && apt-get -q -o APT::Sandbox::User=root download "$1" >&2) \
            || die "apt-get download $1 failed"
    fi
}

KDIR=""
if [[ ${IVNET_VM_REFRESH:-0} != 1 && -f $CACHE/kernel/current ]]; then
    KDIR=$CACHE/kernel/$(cat "$CACHE/kernel/current")
    [[ -d $KDIR/boot ]] || KDIR=""
fi
if [[ -z $KDIR ]]; then
    log "resolving linux-image-cloud-amd64"
    rm -f "$CACHE"/debs/linux-image-cloud-amd64_*.deb
    apt_download linux-image-cloud-amd64
    metas=("$CACHE"/debs/linux-image-cloud-amd64_*.deb)
    meta=${metas[-1]}
    [[ -f $meta ]] || die "apt-get download linux-image-cloud-amd64 produced no .deb"
    dep=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-6\.1\.[^ ]*-cloud-amd64\) *(= *\([^)]*\)).*/\1=\2/p' | head -n1)
    [[ -n $dep ]] || dep=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-6\.1\.[^ ]*-cloud-amd64\).*/\1/p' | head -n1)
    [[ -n $dep ]] || die "cannot find linux-image-6.1.*-cloud-amd64 in Depends of $meta"
    pkg=${dep%%=*}
    apt_download "$dep"
    deb=""
    for f in "$CACHE"/debs/"${pkg}"_*.deb; do
        [[ -z $deb || $f -nt $deb ]] && deb=$f
    done
    [[ -f $deb ]] || die "apt-get download $dep produced no .deb"
    name=$(basename "$deb" .deb)
    if [[ ! -d $CACHE/kernel/$name/boot ]]; then
        log "unpacking $deb"
        rm -rf "$CACHE/kernel/$name.tmp"
        dpkg-deb -x "$deb" "$CACHE/kernel/$name.tmp"
        mv "$CACHE/kernel/$name.tmp" "$CACHE/kernel/$name"
    fi
    echo "$name" >"$CACHE/kernel/current"
    KDIR=$CACHE/kernel/$name
fi
kernels=("$KDIR"/boot/vmlinuz-*)
VMLINUZ=${kernels[0]}
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=$KDIR/lib/modules/$KVER
[[ -f $VMLINUZ && -d $MODDIR ]] || die "bad kernel tree in $KDIR"
if [[ ! -s $MODDIR/modules.dep ]]; then
    "$BUSYBOX" depmod -b "$KDIR" "$KVER" || die "depmod failed in $KDIR"
    [[ -s $MODDIR/modules.dep ]] || die "depmod produced no modules.dep in $MODDIR"
fi
flock -u 8

# ---------------------------------------------------------------- stamp
SELF=$(readlink -f "${BASH_SOURCE[0]}")
stamp_input() {
    echo "kit-format 1"
    sha256sum "$SELF" | cut -d' ' -f1
    echo "kernel $KDIR $KVER"
    sha256sum "$VMLINUZ" | cut -d' ' -f1
    sha256sum "$BUSYBOX" | cut -d' ' -f1
    echo "modules ${MODULES[*]}"
    for b in "${EXTRA_BINARIES[@]}"; do
        echo "extra $(basename "$b") $(sha256sum "$b" | cut -d' ' -f1)"
    done
}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
exec 9>"$OUTDIR/.lock"
flock 9
STAMP=$(stamp_input | sha256sum | cut -d' ' -f1)
if [[ -f $OUTDIR/ivnet-kit.stamp && $(cat "$OUTDIR/ivnet-kit.stamp") == "$STAMP" \
      && -f $OUTDIR/vmlinuz && -f $OUTDIR/initramfs.cpio.gz ]]; then
    log "up to date: $OUTDIR (kernel $KVER)"
    exit 0
fi

# ---------------------------------------------------------------- initramfs tree
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/ivnet,proc,sys,dev,tmp,run,root,ivnet,mnt}
mkdir -p "$ROOT/lib/modules/$KVER"
chmod 1777 "$ROOT/tmp"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
while read -r applet; do
    [[ -z $applet || $applet == bin/busybox ]] && continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    ln -sf /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)

# Modules: resolve the dependency closure from modules.dep of the full
# package tree (generated once into the cache), copy it, then regenerate
# modules.dep for the small tree so busybox modprobe works in the guest.
declare -A want=()
resolve() {
    # resolve NAME: add NAME's .ko path and its dependencies to want[]
    local n=${1//-/_} line path deps d
    line=$(awk -v n="$n" -F: '{ p=$1; sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); if (p == n) { print; exit } }' "$MODDIR/modules.dep")
    if [[ -z $line ]]; then
        grep -qE "(^|/)${1//_/[-_]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null && { log "module $1 is built in"; return 0; }
        die "module '$1' not found in $MODDIR"
    fi
    path=${line%%:*}
    [[ -n ${want[$path]:-} ]] && return 0
    want[$path]=1
    deps=${line#*:}
    for d in $deps; do
        d=${d##*/}; d=${d%%.ko*}
        resolve "$d"
    done
}
for m in "${MODULES[@]}"; do resolve "$m"; done
for p in "${!want[@]}"; do
    rel=${p#"$MODDIR"/}; rel=${rel#/}
    case $rel in /*) rel=${rel#"$MODDIR"/} ;; esac
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$rel")"
    cp "$MODDIR/$rel" "$ROOT/lib/modules/$KVER/$rel"
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    [[ -f $MODDIR/$f ]] && cp "$MODDIR/$f" "$ROOT/lib/modules/$KVER/"
done
"$BUSYBOX" depmod -b "$ROOT" "$KVER" 2>/dev/null || true
[[ -s $ROOT/lib/modules/$KVER/modules.dep ]] || die "depmod failed for initramfs tree"
printf '%s\n' "${MODULES[@]}" >"$ROOT/etc/ivnet/modules"
echo "$KVER" >"$ROOT/etc/ivnet/kernel-version"

for b in "${EXTRA_BINARIES[@]}"; do
    install -m 0755 "$b" "$ROOT/bin/$(basename "$b")"
done

printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"

cat >"$ROOT/init" <<'INIT'
#!/bin/sh
# ivnet guest /init (generated by tests/vm/build-guest.sh)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM="${TERM:-vt100}"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
CMDLINE=$(cat /proc/cmdline)
echo "IVNET-GUEST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

# Options for module M from the kernel command line (M.param=value).
modopts() {
    m=$(echo "$1" | tr - _)
    for w in $CMDLINE; do
        case "$w" in
            "$m".*=*) echo "${w#"$m".}" ;;
        esac
    done
}
while read -r m; do
    [ -n "$m" ] || continue
    # shellcheck disable=SC2046
    modprobe "$m" $(modopts "$m") || echo "IVNET-GUEST-WARN modprobe $m failed"
done </etc/ivnet/modules
ip link set lo up

name=$(echo "$CMDLINE" | sed -n 's/.*ivnet\.name=\([^ ]*\).*/\1/p')
hostname "${name:-ivnet-guest}"

echo "IVNET-GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
rc=0
if [ -f /ivnet/run.sh ]; then
    cd / && sh /ivnet/run.sh
    rc=$?
elif echo "$CMDLINE" | grep -q 'ivnet\.cmd='; then
    cmd=$(echo "$CMDLINE" | sed -n 's/.*ivnet\.cmd="\([^"]*\)".*/\1/p')
    [ -n "$cmd" ] || cmd=$(echo "$CMDLINE" | sed -n 's/.*ivnet\.cmd=\([^ ]*\).*/\1/p')
    cd / && sh -c "$cmd"
    rc=$?
elif echo "$CMDLINE" | grep -q 'ivnet\.shell=1'; then
    setsid cttyhack sh
    rc=$?
fi
echo "IVNET-GUEST-DONE rc=$rc"
sync
echo "IVNET-GUEST-POWEROFF"
poweroff -f
# not reached unless poweroff failed; the kernel panics (panic=-1 reboots,
# and QEMU -no-reboot exits)
sleep 1
exit "$rc"
INIT
chmod 0755 "$ROOT/init"

# ---------------------------------------------------------------- archive
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "${CPIO[@]}") | gzip -6 -n >"$WORK/initramfs.cpio.gz"
# pad to a multiple of 4 bytes so archives concatenated after it (compressed
# or not) start aligned, as the kernel's initramfs unpacker expects
size=$(stat -c %s "$WORK/initramfs.cpio.gz")
pad=$(( (4 - size % 4) % 4 ))
[[ $pad -eq 0 ]] || head -c "$pad" /dev/zero >>"$WORK/initramfs.cpio.gz"

cp "$VMLINUZ" "$WORK/vmlinuz"
echo "$KVER" >"$WORK/kernel-version"
mv -f "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
mv -f "$WORK/kernel-version" "$OUTDIR/kernel-version"
echo "$STAMP" >"$OUTDIR/ivnet-kit.stamp"
log "built $OUTDIR (kernel $KVER, modules: ${MODULES[*]}, initramfs $(stat -c %s "$OUTDIR/initramfs.cpio.gz") bytes)"
