#!/usr/bin/env bash
# Fuzzing: every cargo-fuzz target in fuzz/ for a bounded time (NEXA_FUZZ_SECONDS, default
# 60 s each), starting from the corpus kept in fuzz/corpus/. Runs on the stable
# toolchain (no sanitizer: `-s none`); libFuzzer's own caps stop an input that takes
# more than 1 GiB of RSS or a single allocation over 256 MiB, and count as a failure.
# New inputs go to a temp dir, so the checkout is not changed. A longer run, nightly
# style: NEXA_FUZZ_SECONDS=3600 bash .ci/fuzz.sh (then `cargo fuzz cmin` and commit the
# corpus).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${NEXA_FUZZ_SECONDS:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
cargo fuzz build -s none
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t" "$scratch/$t"
  echo "--> $t for ${secs}s"
  rc=0
  cargo fuzz run "$t" -s none "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=256 -max_len=65536 \
    -print_final_stats=1 >"$scratch/$t.log" 2>&1 || rc=$?
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY" "$scratch/$t.log" || true
  # libFuzzer exits non-zero on a crash, a leak or a cap.
  if [ "$rc" != 0 ]; then
    tail -40 "$scratch/$t.log" >&2
    echo "fuzz target $t failed; the input is under fuzz/artifacts/$t" >&2
    exit 1
  fi
done
