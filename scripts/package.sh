#!/usr/bin/env bash
# scripts/package.sh [cargo-deb flags...]: builds the Debian package, target/debian/ivnet_*.deb.
#
# 1. cargo build --release (the binary the package ships);
# 2. into target/deb-assets: the man pages and bash/zsh/fish completions generated from the
#    command line (`ivnet generate-docs`, hidden), and the units of systemd/ with ExecStart=
#    pointing at /usr/bin/ivnet (the repository's units say /usr/local/bin, for a hand install);
# 3. cargo deb --no-build (installs cargo-deb with `cargo install --locked` if it is missing).
# CARGO_TARGET_DIR is honoured for the build; the assets always go to target/deb-assets of the
# repository, where Cargo.toml's metadata names them.
# Prints the path of the .deb as its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: installing cargo-deb (cargo install --locked cargo-deb)" >&2
    cargo install --locked cargo-deb >&2
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release --bin ivnet >&2
ASSETS=target/deb-assets
mkdir -p target
# One packaging at a time per repository: the assets' place is fixed by Cargo.toml.
exec 9>target/deb-assets.lock
flock 9
rm -rf "$ASSETS"
mkdir -p "$ASSETS/units"
"$TARGET_DIR/release/ivnet" generate-docs "$ASSETS/gen"
mkdir -p "$ASSETS/man" "$ASSETS/completions"
mv "$ASSETS"/gen/*.1 "$ASSETS/man/"
mv "$ASSETS"/gen/* "$ASSETS/completions/"
rmdir "$ASSETS/gen"
for u in systemd/*.service systemd/*.timer; do
    sed 's#/usr/local/bin/ivnet#/usr/bin/ivnet#g' "$u" >"$ASSETS/units/$(basename "$u")"
done
if grep -q "^Exec.*/usr/local/bin" "$ASSETS"/units/*; then
    echo "package.sh: a unit still runs something from /usr/local/bin:" >&2
    grep -n "^Exec.*/usr/local/bin" "$ASSETS"/units/* >&2
    exit 1
fi
# Stripped (the debug info of the release profile is for bench/ and perf, not for guests).
out=$(cargo deb --no-build --strip "$@")
echo "$out" | tail -n1
