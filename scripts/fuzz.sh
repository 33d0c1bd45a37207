#!/usr/bin/env bash
# Fuzzes every target of fuzz/ (fuzz/README.md) for a bounded time with cargo-fuzz on
# nightly, and fails on any crash, i.e. any input where a parser and its reference check
# disagree. The committed corpora and seeds are the starting point and are not changed:
# new inputs go to a scratch directory (run `cargo fuzz cmin` by hand to keep them).
# PDGUARD_FUZZ_SECONDS sets the time per target (default 7: a minute in all for the eight targets). Called by scripts/test.sh;
# installs the nightly toolchain and cargo-fuzz when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${PDGUARD_FUZZ_SECONDS:-7}

command -v rustup >/dev/null 2>&1 || { echo "fuzz.sh: needs rustup (for the nightly toolchain cargo-fuzz builds with)" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz

# Release with overflow checks and debug assertions; no AddressSanitizer (no unsafe code
# in pdguard, and it halves the speed). The same flags for build and run: no rebuild.
flags=(-O -a -s none)
start=$SECONDS
cargo +nightly fuzz build "${flags[@]}"
echo "fuzz.sh: targets built in $((SECONDS - start))s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for t in $(cargo +nightly fuzz list); do
  mkdir "$scratch/$t"
  # One process (no -jobs/-workers): the machine is shared. The first directory gets the
  # new inputs; the committed ones are read.
  if cargo +nightly fuzz run "${flags[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$scratch/$t.log")
    echo "fuzz.sh: $t: ${runs:-?} executions in ${secs}s, no crash"
  else
    tail -n 40 "$scratch/$t.log"
    echo "fuzz.sh: $t FAILED: the input is in fuzz/artifacts/$t/; reproduce with cargo +nightly fuzz run ${flags[*]} $t fuzz/artifacts/$t/<file>" >&2
    status=1
  fi
done
echo "fuzz.sh: took $((SECONDS - start))s"
exit "$status"
