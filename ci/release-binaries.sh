#!/usr/bin/env bash
# Builds the release binaries into DIST with their sha256sums.txt:
#   hakim-init-x86_64-linux-musl, hakim-init-aarch64-linux-musl (ci/build-init.sh)
#   hakim-convert-x86_64-linux-musl (static; cargo --locked, build paths remapped)
# Usage: ci/release-binaries.sh DIST [init] [convert]   (default: both)
# Every binary is checked to be a static ELF for its machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=${1:?usage: ci/release-binaries.sh DIST [init] [convert]}
shift
parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(init convert)
mkdir -p "$dist"

want() {
  local p
  for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done
  return 1
}

if want init; then
  for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    bin=$(ci/build-init.sh "$target")
    cp "$bin" "$dist/hakim-init-${target%%-*}-linux-musl"
  done
fi

if want convert; then
  target=x86_64-unknown-linux-musl
  rustup target list --installed | grep -qx "$target" || rustup target add "$target" >/dev/null 2>&1
  if command -v musl-gcc >/dev/null 2>&1; then
    export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}
  fi
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$PWD=/hakim-tools"$'\x1f'"--remap-path-prefix=$cargo_home=/cargo" \
    cargo build --quiet --locked --release --target "$target" -p hakim-convert
  cp "${CARGO_TARGET_DIR:-target}/$target/release/hakim-convert" "$dist/hakim-convert-x86_64-linux-musl"
fi

cd "$dist"
for f in hakim-*-linux-musl; do
  info=$(file -b "$f")
  case $f in
    *aarch64*) machine="ARM aarch64" ;;
    *) machine="x86-64" ;;
  esac
  case $info in
    *"$machine"*) ;;
    *) echo "release-binaries: $f is not for $machine: $info" >&2; exit 1 ;;
  esac
  case $info in
    *"statically linked"* | *static-pie*) ;;
    *) echo "release-binaries: $f is not static: $info" >&2; exit 1 ;;
  esac
done
sha256sum hakim-*-linux-musl >sha256sums.txt
cat sha256sums.txt
