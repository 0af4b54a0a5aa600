#!/usr/bin/env bash
# build-systemd-image.sh OUTDIR DEB [TEST_FILES_DIR]
#
# Builds a systemd-booted Debian guest for ivnet tests into OUTDIR:
#   OUTDIR/vmlinuz            the guest kit's cloud kernel (see build-guest.sh)
#   OUTDIR/initramfs.cpio.gz  the whole root filesystem as one initramfs, booted with
#                             rdinit=/sbin/init: systemd is PID 1 on the initramfs (rootfs)
#   OUTDIR/kernel-version
#
# Two layers:
#   1. The base, cached in $IVNET_VM_CACHE/systemd (default /var/tmp/ivnet-vm-cache/systemd):
#      `mmdebstrap --variant=minbase` of bookworm with systemd, udev, kmod, iproute2, ping and
#      netcat, from this machine's own apt sources (/etc/apt/sources.list.d/debian.sources, or
#      $IVNET_VM_APT_SOURCES), plus the kernel modules the agent needs (vfio-pci, tun and their
#      dependencies) for the kit's kernel. Its key is a hash of the package list, this script's
#      BASE_FORMAT, the sources file and the kernel version; a base whose key matches is reused
#      (no network at all). IVNET_VM_REFRESH=1 builds it again.
#   2. Per call (a few seconds): the base unpacked, DEB installed with `dpkg -i` inside it (so
#      its maintainer scripts run and enable what the package enables), systemd-networkd
#      enabled, and the files of TEST_FILES_DIR (if given) copied over the root (e.g.
#      usr/local/lib/ivnet-test/guest.sh and an enabled unit), then packed as a gzip'd newc
#      cpio archive. An overlay archive can be appended per guest (see README.md).
#
# A unit file in TEST_FILES_DIR/etc/systemd/system/*.service with an [Install] section is
# enabled with `systemctl enable` in the image.
#
# Needs root (mmdebstrap in root mode, chroot, device nodes), mmdebstrap, cpio and gzip.
set -euo pipefail

PROG=build-systemd-image.sh
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

[[ $# -ge 2 ]] || die "usage: $PROG OUTDIR DEB [TEST_FILES_DIR]"
OUTDIR=$1
DEB=$2
FILES=${3:-}
[[ -f $DEB ]] || die "package '$DEB' not found (build it with scripts/package.sh)"
[[ -z $FILES || -d $FILES ]] || die "test files directory '$FILES' not found"
[[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap, chroot)"
DEB=$(readlink -f "$DEB")
[[ -z $FILES ]] || FILES=$(readlink -f "$FILES")

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${IVNET_VM_CACHE:-/var/tmp/ivnet-vm-cache}
SOURCES=${IVNET_VM_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
SUITE=bookworm
# Bump when the base changes in a way the inputs below do not show.
BASE_FORMAT=2
PACKAGES=(systemd systemd-sysv udev kmod iproute2 iputils-ping netcat-openbsd procps)
# The agent's modules (vfio_iommu_type1 is only a soft dependency of vfio, which modules.dep
# does not list); their dependencies are resolved from modules.dep.
MODULES=(vfio-pci vfio_iommu_type1 tun)

for t in mmdebstrap cpio gzip chroot sha256sum flock; do
    command -v "$t" >/dev/null || die "required tool '$t' not found (apt-get install mmdebstrap cpio)"
done
[[ -f $SOURCES ]] || die "apt sources file $SOURCES not found (set IVNET_VM_APT_SOURCES)"

# ---------------------------------------------------------------- kernel (the guest kit's)
KIT=$CACHE/kit
"$HERE/build-guest.sh" "$KIT" >&2 || die "build-guest.sh $KIT failed"
KVER=$(cat "$KIT/kernel-version")
KDIR=$CACHE/kernel/$(cat "$CACHE/kernel/current")
MODDIR=$KDIR/lib/modules/$KVER
[[ -s $MODDIR/modules.dep ]] || die "no modules.dep in $MODDIR (build-guest.sh makes it)"

# ---------------------------------------------------------------- base (cached)
mkdir -p "$CACHE/systemd"
exec 8>"$CACHE/systemd/.lock"
flock 8
KEY=$( { echo "base-format $BASE_FORMAT suite $SUITE"; echo "packages ${PACKAGES[*]}";
         echo "modules ${MODULES[*]}"; echo "kernel $KVER"; cat "$SOURCES"; } | sha256sum | cut -c1-16)
BASE=$CACHE/systemd/base-$KEY.tar
if [[ ${IVNET_VM_REFRESH:-0} == 1 || ! -s $BASE ]]; then
    log "building the base image with mmdebstrap (key $KEY; about a minute)"
    # Modules: the closure of MODULES in the kernel's modules.dep.
    declare -A want=()
    resolve() {
        local n=${1//-/_} line path d
        line=$(awk -v n="$n" -F: '{ p=$1; sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); if (p == n) { print; exit } }' "$MODDIR/modules.dep")
        [[ -n $line ]] || die "module '$1' not found in $MODDIR/modules.dep"
        path=${line%%:*}
        [[ -n ${want[$path]:-} ]] && return 0
        want[$path]=1
        for d in ${line#*:}; do d=${d##*/}; resolve "${d%%.ko*}"; done
    }
    for m in "${MODULES[@]}"; do resolve "$m"; done
    MODLIST=$(mktemp)
    printf '%s\n' "${!want[@]}" >"$MODLIST"
    tmp=$BASE.tmp.$$
    rm -f "$tmp"
    # The hooks run on the host with the new root in $1.
    mmdebstrap --variant=minbase --format=tar --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --customize-hook="mkdir -p \"\$1/lib/modules/$KVER\"" \
        --customize-hook="while read -r p; do p=\${p#/}; mkdir -p \"\$1/lib/modules/$KVER/\$(dirname \"\$p\")\"; cp \"$MODDIR/\$p\" \"\$1/lib/modules/$KVER/\$p\"; done <$MODLIST" \
        --customize-hook="cp $MODDIR/modules.order $MODDIR/modules.builtin $MODDIR/modules.builtin.modinfo \"\$1/lib/modules/$KVER/\"" \
        --customize-hook="chroot \"\$1\" depmod $KVER" \
        --customize-hook="chroot \"\$1\" systemctl enable systemd-networkd.service" \
        --customize-hook="chroot \"\$1\" systemctl mask serial-getty@ttyS0.service getty@tty1.service" \
        --customize-hook="rm -f \"\$1/etc/machine-id\" && touch \"\$1/etc/machine-id\"" \
        --customize-hook="rm -rf \"\$1\"/usr/share/locale/* \"\$1\"/usr/share/doc/* \"\$1\"/usr/share/man/* \"\$1\"/var/cache/apt/*.bin \"\$1\"/var/lib/apt/lists/*" \
        "$SUITE" "$tmp" "$SOURCES" >&2 || { rm -f "$tmp" "$MODLIST"; die "mmdebstrap failed"; }
    rm -f "$MODLIST"
    mv -f "$tmp" "$BASE"
    # Older bases are of no use any more.
    find "$CACHE/systemd" -maxdepth 1 -name 'base-*.tar' ! -name "base-$KEY.tar" -delete
fi
flock -u 8

# ---------------------------------------------------------------- per call: the package
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
exec 9>"$OUTDIR/.lock"
flock 9
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir "$ROOT"
tar -C "$ROOT" -xpf "$BASE"
cp "$DEB" "$ROOT/tmp/ivnet.deb"
log "dpkg -i $(basename "$DEB") in the image"
chroot "$ROOT" dpkg -i /tmp/ivnet.deb >&2 || die "dpkg -i $(basename "$DEB") failed in the image"
rm -f "$ROOT/tmp/ivnet.deb"
if [[ -n $FILES ]]; then
    cp -a "$FILES/." "$ROOT/"
    for u in "$FILES"/etc/systemd/system/*.service; do
        [[ -f $u ]] && grep -q '^\[Install\]' "$u" && chroot "$ROOT" systemctl enable "$(basename "$u")" >&2
    done
fi
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -1 -n >"$WORK/initramfs.cpio.gz"
# Pad to 4 bytes so a per-guest overlay can be appended (see build-guest.sh).
size=$(stat -c %s "$WORK/initramfs.cpio.gz")
pad=$(( (4 - size % 4) % 4 ))
[[ $pad -eq 0 ]] || head -c "$pad" /dev/zero >>"$WORK/initramfs.cpio.gz"
cp "$KIT/vmlinuz" "$OUTDIR/vmlinuz"
echo "$KVER" >"$OUTDIR/kernel-version"
mv -f "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
log "built $OUTDIR (kernel $KVER, base $(basename "$BASE"), initramfs $(stat -c %s "$OUTDIR/initramfs.cpio.gz") bytes)"
