#!/usr/bin/env bash
# Builds the static hakim-init (musl) for one target and prints its path.
#   ci/build-init.sh [TARGET]   (default x86_64-unknown-linux-musl)
# Targets: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl.
#
# ring (under rustls) compiles C for the target: musl-gcc (musl-tools) or plain
# gcc for x86_64, Debian's gcc-aarch64-linux-gnu for aarch64, which also links
# (set here through cargo's per-target environment variables, not a global
# cargo config). The result is checked: a static ELF for the right machine.
#
# Reproducible: paths of this checkout and of the cargo home are remapped, so
# the same sources, Cargo.lock and toolchain give the same bytes wherever the
# repository is checked out (docs/init.md, "Reproducible builds").
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-x86_64-unknown-linux-musl}

case $target in
  x86_64-unknown-linux-musl)
    machine="x86-64"
    if [ -z "${CC_x86_64_unknown_linux_musl:-}" ]; then
      if command -v musl-gcc >/dev/null 2>&1; then
        export CC_x86_64_unknown_linux_musl=musl-gcc
      else
        export CC_x86_64_unknown_linux_musl=gcc
      fi
    fi
    ;;
  aarch64-unknown-linux-musl)
    machine="ARM aarch64"
    cross=aarch64-linux-gnu-gcc
    command -v "$cross" >/dev/null 2>&1 || {
      echo "build-init: $cross missing (apt-get install gcc-aarch64-linux-gnu)" >&2
      exit 1
    }
    export CC_aarch64_unknown_linux_musl=${CC_aarch64_unknown_linux_musl:-$cross}
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER:-$cross}
    ;;
  *)
    echo "build-init: unsupported target $target" >&2
    exit 2
    ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >/dev/null 2>&1

# No absolute build paths in the binary (panic locations): the checkout and the
# cargo home are remapped. Replaces any RUSTFLAGS (0x1f separates the flags).
cargo_home=${CARGO_HOME:-$HOME/.cargo}
export CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$PWD=/hakim-tools"$'\x1f'"--remap-path-prefix=$cargo_home=/cargo"
cargo build --quiet --locked --profile release-init --target "$target" -p hakim-init

bin="${CARGO_TARGET_DIR:-target}/$target/release-init/hakim-init"
info=$(file -b "$bin")
case $info in
  *"statically linked"* | *static-pie*) ;;
  *)
    echo "build-init: $bin is not static: $info" >&2
    exit 1
    ;;
esac
case $info in
  *"$machine"*) ;;
  *)
    echo "build-init: $bin is not for $machine: $info" >&2
    exit 1
    ;;
esac
if readelf -d "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
  echo "build-init: $bin needs shared libraries:" >&2
  readelf -d "$bin" | grep '(NEEDED)' >&2
  exit 1
fi
echo "$bin"
