#!/usr/bin/env bash
# The project's one test command (the README gives it; .ci/run calls it):
# installs test dependencies, then formatting, lints (Rust, shell scripts,
# GitHub workflows), unit, fixture and end-to-end tests against real tools.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
shellcheck ci/*.sh .ci/run
ci/actionlint.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
# HAKIM_E2E=1: a missing tool or privilege fails the end-to-end tests instead
# of skipping them.
HAKIM_E2E=1 cargo test --workspace --quiet
