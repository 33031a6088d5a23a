#!/usr/bin/env bash
# Fuzzes each cargo-fuzz target in fuzz/ (frame, request, core_ops, subjects) for
# SECONDS_PER_TARGET seconds (default 15), starting from the committed seed
# corpus in fuzz/corpus/<target>/. New inputs the fuzzer finds go to
# fuzz/corpus-work/<target>/ (not committed), so later runs pick up where
# earlier ones stopped; crashes go to fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#   FUZZ_TARGETS="frame" scripts/fuzz.sh 60
#
# Needs a nightly toolchain and cargo-fuzz (installed here if missing and
# crates.io is reachable). Without them it prints SKIP and exits 0. Exits 1
# if a target fails to build or the fuzzer finds a crash.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-15}
TARGETS=${FUZZ_TARGETS:-"frame request core_ops subjects peer"}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "SKIP: fuzzing needs a nightly toolchain (rustup toolchain install nightly); none found"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)"
    if ! cargo install cargo-fuzz --locked; then
        echo "SKIP: cargo-fuzz is not installed and could not be installed"
        exit 0
    fi
fi

cd fuzz
echo "== building fuzz targets"
cargo +nightly fuzz build

failed=()
for t in $TARGETS; do
    mkdir -p "corpus-work/$t"
    echo "== fuzzing $t for ${SECS}s"
    # libFuzzer writes new inputs to the first corpus directory only.
    if ! cargo +nightly fuzz run "$t" "corpus-work/$t" "corpus/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>"corpus-work/$t.log"; then
        failed+=("$t")
        tail -n 40 "corpus-work/$t.log"
    fi
    grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|#[0-9]+ +DONE)' \
        "corpus-work/$t.log" || true
done

if [ ${#failed[@]} -ne 0 ]; then
    echo
    echo "FAIL: the fuzzer found a crash in: ${failed[*]}"
    for t in "${failed[@]}"; do
        for a in artifacts/"$t"/*; do
            [ -e "$a" ] || continue
            echo "  replay:   cargo +nightly fuzz run $t fuzz/$a   (from fuzz/)"
            echo "  minimise: cargo +nightly fuzz tmin $t fuzz/$a"
        done
    done
    echo "Turn each crash into a regression test (a unit test, or a file in fuzz/corpus/<target>/) with the fix."
    exit 1
fi
echo "fuzz: no crash in ${TARGETS} (${SECS}s each)"
