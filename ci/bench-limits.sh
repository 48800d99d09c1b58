#!/usr/bin/env bash
# Memory with a million entries in one layer (release build): peak RSS of
# `hakim-convert` under /usr/bin/time, against the bound docs/converter.md
# documents. About a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --quiet -p hakim-convert --test limits -- \
  --ignored --nocapture a_million_entries 2>&1 | grep -E "entries:|test result|panicked|peak"
