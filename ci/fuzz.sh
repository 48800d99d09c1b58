#!/usr/bin/env bash
# Fuzzes every target of fuzz/ one after the other (cargo-fuzz, nightly).
#
#   ci/fuzz.sh [SECONDS]       # per target; default $FUZZ_SECONDS or 600
#   FUZZ_TARGETS="flatten manifest" ci/fuzz.sh 60
#   FUZZ_SANITIZER=address ci/fuzz.sh   # default none, see docs/fuzzing.md
#
# Seeds come from the fixture tests (ci/fuzz-seeds.sh); what a run discovers
# stays in fuzz/corpus/. Prints executions and crashes per target and fails if
# any target crashed (the crashing input is in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${FUZZ_SECONDS:-600}}"
sanitizer="${FUZZ_SANITIZER:-none}"
cd fuzz
targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
cd ..

ci/fuzz-seeds.sh fuzz/corpus >/dev/null
cd fuzz
cargo +nightly fuzz build --sanitizer "$sanitizer" >/dev/null 2>build.log || {
  cat build.log >&2
  exit 1
}

mkdir -p logs
status=0
rows=()
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  log="logs/$t.log"
  started=$(date +%s)
  # One process, one job (the machine is shared); inputs up to 64 KiB;
  # a single input taking 10 s or 2 GB is a finding too.
  if cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
  fi
  elapsed=$(($(date +%s) - started))
  after=$(find "artifacts/$t" -type f | wc -l)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  rows+=("$(printf '%-18s %6ss %12s %8s %8s  %s' "$t" "$elapsed" "${execs:-?}" "$corpus" "$((after - before))" "$result")")
  if [ "$result" != ok ]; then
    grep -E "panicked|ERROR|SUMMARY|artifact_prefix|Test unit written" "$log" | head -20 >&2 || true
  fi
done
printf '%-18s %7s %12s %8s %8s  %s\n' target time executions corpus crashes result
printf '%s\n' "${rows[@]}"
exit "$status"
