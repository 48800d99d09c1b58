#!/usr/bin/env bash
# The project's one test command (the README gives it; .ci/run calls it):
# installs test dependencies, then formatting, lints (Rust, shell scripts,
# GitHub workflows), unit, fixture and end-to-end tests against real tools,
# then a short fuzzing smoke of every target (FUZZ_SMOKE_SECONDS each,
# default 15; ci/fuzz.sh runs longer).
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
shellcheck ci/*.sh .ci/run docs/examples/coder-proxmox/pve-oci-env.sh
ci/actionlint.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The fuzz crate is outside the workspace: check it now, so an API change that
# breaks a target fails in the first minutes rather than at the fuzz smoke.
cargo check --manifest-path fuzz/Cargo.toml --bins --quiet
cargo build --workspace --quiet
# HAKIM_E2E=1: a missing tool or privilege fails the end-to-end tests instead
# of skipping them.
# HAKIM_FUZZ_SEEDS: the converter's fixture tests also write themselves out
# as fuzz seeds (converter/tests/common/fuzz_seeds.rs).
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
HAKIM_E2E=1 HAKIM_FUZZ_SEEDS="$seeds" cargo test --workspace --quiet
# Every fuzz target for a short while, from those seeds.
HAKIM_FUZZ_SEEDS="$seeds" ci/fuzz.sh "${FUZZ_SMOKE_SECONDS:-15}"
