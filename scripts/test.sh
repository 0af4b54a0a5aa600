#!/usr/bin/env bash
# scripts/test.sh: the README's test command. Installs what the tests need when it is missing
# (apt-get, as root), then runs `cargo test --workspace` and, for the whole suite, every fuzz
# target for a bounded time (scripts/fuzz.sh).
#
# As root the privileged tests (network namespaces, TAPs, a user switch) must run: this script
# sets IVNET_REQUIRE_PRIVILEGED_TESTS=1 so any of them that would skip fails instead. Not root,
# those tests print `SKIP ...` and the rest run.
#
# Usage: scripts/test.sh [cargo test arguments...]   e.g. scripts/test.sh --test two_peers
#        (arguments after `--` go to the test binaries: scripts/test.sh -- --nocapture)
#        scripts/test.sh --packages                  print the apt packages the tests need
set -euo pipefail

# ---- apt packages the tests need -----------------------------------------------------------
# Integration tests on the host (tests/*.rs):
HOST_TEST_PACKAGES=(
    iproute2      # ip netns, ip link/addr, ss
    iputils-ping  # ping
    util-linux    # setpriv (the "not root" case of tests/bad_input.rs)
    systemd       # systemd-analyze security/verify of the units (tests/systemd_units.rs)
    libvirt-clients  # virt-xml-validate of the example domain (tests/libvirt_xml.rs)
    libxml2-utils    # xmllint, which virt-xml-validate runs
)
# VM tests (tests/vm/: a guest kernel and busybox initramfs booted in QEMU):
VM_TEST_PACKAGES=(
    qemu-system-x86  # qemu-system-x86_64 with ivshmem-plain / ivshmem-doorbell
    busybox-static   # the guest's userland
    cpio             # packing the initramfs
    mmdebstrap       # the Debian root filesystem of the systemd-booted guests (tests/systemd_guests.rs)
)
# ---------------------------------------------------------------------------------------------
ALL_PACKAGES=("${HOST_TEST_PACKAGES[@]}" "${VM_TEST_PACKAGES[@]}")

if [ "${1:-}" = "--packages" ]; then
    echo "${ALL_PACKAGES[*]}"
    exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${ALL_PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] ||
            missing+=("$p")
    done
fi

if [ "$(id -u)" -eq 0 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        echo "test.sh: installing missing packages with apt-get: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # Try the current package lists first; refresh them only if that fails.
        apt-get install -y --no-install-recommends "${missing[@]}" ||
            { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
    fi
    [ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true
    export IVNET_REQUIRE_PRIVILEGED_TESTS=1
    echo "test.sh: running as root: privileged tests are required (IVNET_REQUIRE_PRIVILEGED_TESTS=1)"
else
    if [ ${#missing[@]} -gt 0 ]; then
        echo "test.sh: not root, so not installing: ${missing[*]}"
    fi
    echo "test.sh: not root: tests that need namespaces and TAPs will print SKIP"
fi

# --no-fail-fast: one failing test binary must not hide the results of the others.
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?

# The whole suite (no arguments) also runs every fuzz target for a bounded time
# (IVNET_FUZZ_SECS each, default 20; scripts/fuzz.sh installs cargo-fuzz and fails, not skips,
# without the nightly toolchain).
if [ $# -eq 0 ]; then
    echo "test.sh: fuzzing every target for ${IVNET_FUZZ_SECS:-20} s (scripts/fuzz.sh)"
    scripts/fuzz.sh "${IVNET_FUZZ_SECS:-20}" || status=1
fi
exit "$status"
