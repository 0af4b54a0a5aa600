#!/usr/bin/env bash
# scripts/fuzz.sh: runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer with AddressSanitizer)
# for a bounded time and fails if any of them finds a crash, a leak, a hang or a failed check.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  time per target (default 20: CI; a longer run, e.g. 600, for the README figures)
#   TARGET   only these targets (default: all of `cargo fuzz list`)
# Environment: FUZZ_JOBS=N  targets run N at a time (default: the number of CPUs, at most 4).
#
# Needs the nightly toolchain (rustup toolchain install nightly): libFuzzer's sanitizer flags are
# nightly-only. Installs cargo-fuzz (cargo install --locked cargo-fuzz) if it is missing.
# The committed seed corpus (fuzz/corpus/TARGET) is read, never written: new inputs go to
# fuzz/work/corpus/TARGET, findings to fuzz/artifacts/TARGET (both ignored by git).
# Prints executions per second, new inputs and findings per target. Exit status 1 on a finding
# (with the command that replays it), 2 when the tools are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-20}
shift || true
case "$seconds" in '' | *[!0-9]*)
    echo "fuzz.sh: SECONDS must be a number, got '$seconds'" >&2
    exit 2
    ;;
esac

if ! command -v rustup >/dev/null || ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: FAILED: the nightly Rust toolchain is missing; cargo-fuzz needs it for" \
        "libFuzzer's sanitizer flags. Install it with: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install --locked cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
jobs=${FUZZ_JOBS:-$(nproc)}
[ "$jobs" -gt 4 ] && jobs=4
[ "$jobs" -lt 1 ] && jobs=1

mkdir -p work/logs
echo "fuzz.sh: building ${#targets[@]} targets (release, debug assertions, AddressSanitizer)"
start=$(date +%s)
build() {
    if [ $# -eq 0 ]; then
        cargo +nightly fuzz build
    else
        # `cargo fuzz build` takes one target at a time.
        for t in "$@"; do cargo +nightly fuzz build "$t"; done
    fi
}
if ! build "$@" >work/logs/build.log 2>&1; then
    cat work/logs/build.log >&2
    echo "fuzz.sh: FAILED: the fuzz targets do not build" >&2
    exit 1
fi
echo "fuzz.sh: built in $(($(date +%s) - start)) s; running each target for $seconds s, $jobs at a time"

run_one() {
    local t=$1
    mkdir -p "work/corpus/$t" "corpus/$t" "artifacts/$t"
    # -timeout: an input that runs for 10 s is a hang (a finding); -rss_limit_mb: so is one that
    # needs 2 GiB. The seed corpus comes second, so new inputs land in work/corpus only.
    cargo +nightly fuzz run "$t" "work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"work/logs/$t.log" 2>&1
}

pids=()
names=()
for t in "${targets[@]}"; do
    run_one "$t" &
    pids+=($!)
    names+=("$t")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
done
status=()
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then status[i]=0; else status[i]=$?; fi
done

failed=0
printf '\n%-16s %8s %12s %10s %8s %s\n' target seconds executions "execs/s" "new" findings
for i in "${!names[@]}"; do
    t=${names[$i]}
    log="work/logs/$t.log"
    field() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    execs=$(field number_of_executed_units)
    rate=$(field average_exec_per_sec)
    new=$(field new_units_added)
    # The artifacts this run wrote (libFuzzer prints their paths).
    mapfile -t found < <(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
    if [ "${status[$i]}" -ne 0 ] && [ ${#found[@]} -eq 0 ]; then
        found=("(exit status ${status[$i]}, see fuzz/$log)")
    fi
    printf '%-16s %8s %12s %10s %8s %s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" \
        "${new:-?}" "${#found[@]}"
    if [ ${#found[@]} -gt 0 ]; then
        failed=1
        for f in "${found[@]}"; do
            echo "    finding: fuzz/$f" | sed 's#fuzz//#/#'
            echo "    replay:  (cd fuzz && cargo +nightly fuzz run $t $f)"
        done
        grep -m 5 -E "panicked|ERROR: |SUMMARY" "$log" | sed 's/^/    /'
    fi
done
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: FAILED: findings above (logs in fuzz/work/logs/)" >&2
    exit 1
fi
echo "fuzz.sh: no findings"
