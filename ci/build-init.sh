#!/usr/bin/env bash
# Builds the static hakim-init (musl) and prints its path.
#   ci/build-init.sh [TARGET]   (default x86_64-unknown-linux-musl)
# ring (under rustls) compiles C for the target: musl-gcc from musl-tools, or
# plain gcc for x86_64 when musl-tools is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-x86_64-unknown-linux-musl}
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >/dev/null
if [ "$target" = x86_64-unknown-linux-musl ] && [ -z "${CC_x86_64_unknown_linux_musl:-}" ]; then
  if command -v musl-gcc >/dev/null 2>&1; then
    export CC_x86_64_unknown_linux_musl=musl-gcc
  else
    export CC_x86_64_unknown_linux_musl=gcc
  fi
fi
cargo build --quiet --profile release-init --target "$target" -p hakim-init
bin="target/$target/release-init/hakim-init"
file "$bin" | grep -q 'statically linked\|static-pie' || { echo "build-init: $bin is not static" >&2; exit 1; }
echo "$bin"
