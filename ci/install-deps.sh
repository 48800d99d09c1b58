#!/usr/bin/env bash
# Installs what the test suite needs on Debian 12/13. Idempotent and quiet:
# does nothing when every tool is already present.
set -euo pipefail

packages=(skopeo umoci buildah debootstrap tar xz-utils zstd attr libcap2-bin file jq musl-tools busybox-static lxc e2fsprogs docker-registry apache2-utils openssl)
tools=(skopeo umoci buildah debootstrap tar xz zstd getfattr getcap file jq musl-gcc busybox lxc-start mkfs.ext4 docker-registry htpasswd openssl)

missing=()
for i in "${!tools[@]}"; do
  command -v "${tools[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
