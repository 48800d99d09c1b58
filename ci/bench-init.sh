#!/usr/bin/env bash
# hakim-init figures: static binary size, idle RSS with the agent and two
# services running, and SIGTERM→exit latency as PID 1 of a PID namespace,
# next to tini-static (Debian's tini package) as the anchor.
# Needs root, busybox-static, python3. Prints a table; changes nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v tini-static >/dev/null 2>&1 || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null
}
init_bin=$(ci/build-init.sh)
work=$(mktemp -d /tmp/hakim-bench-init.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  # KEEP=1 keeps the work directory (logs, root) for a look afterwards.
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# A static fake agent (std only) for the download endpoint.
rustc --edition 2021 -O --target x86_64-unknown-linux-musl -C target-feature=+crt-static \
  -o "$work/fake-coder" tests/src/bin/fake-coder.rs 2>/dev/null ||
  rustc --edition 2021 -O --target x86_64-unknown-linux-musl -C target-feature=+crt-static -C linker=musl-gcc -o "$work/fake-coder" tests/src/bin/fake-coder.rs

root="$work/root"
mkdir -p "$root"/{bin,etc/hakim/services,usr/local/sbin,tmp,home,proc,dev}
cp "$(command -v busybox)" "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s /bin
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ndocker:x:999:\n' >"$root/etc/group"
cp "$init_bin" "$root/usr/local/sbin/hakim-init"
for s in one two; do
  printf 'command = ["/bin/sleep", "100000"]\nstop_grace = 2\n' >"$root/etc/hakim/services/$s.toml"
done

mkdir -p "$work/www/bin"
cp "$work/fake-coder" "$work/www/bin/coder-linux-amd64"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
server_pid=$!
sleep 0.5

pid1_of() { # host pid of the namespace's PID 1 (the child of unshare)
  local u=$1 c=""
  for _ in $(seq 100); do
    c=$(cat /proc/"$u"/task/*/children 2>/dev/null | awk '{print $1}')
    [ -n "$c" ] && break
    sleep 0.02
  done
  echo "$c"
}

# Idle RSS: daemon mode with the agent downloaded and running plus two services.
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CODER_AGENT_URL="http://127.0.0.1:$port" CODER_AGENT_TOKEN=bench-token \
  FAKE_CODER_RECORD=/tmp/agent.json \
  unshare --pid --fork --mount --mount-proc --kill-child chroot "$root" /usr/local/sbin/hakim-init \
  >"$work/daemon.log" 2>&1 &
u=$!
p=$(pid1_of "$u")
for _ in $(seq 200); do
  [ -s "$root/tmp/agent.json" ] && break
  sleep 0.05
done
sleep 2
rss_kb=$(awk '/^VmRSS/{print $2}' /proc/"$p"/status)
kids=$(cat /proc/"$p"/task/*/children | wc -w)
kill -TERM "$p"
wait "$u" || true

# SIGTERM → exit latency in command mode, median of 20.
latency() { # $1: init binary inside the root; prints milliseconds
  local bin=$1 t0 t1 u p
  for _ in $(seq 20); do
    unshare --pid --fork --mount --mount-proc --kill-child chroot "$root" "$bin" -- /bin/sleep 1000 \
      >/dev/null 2>&1 &
    u=$!
    p=$(pid1_of "$u")
    sleep 0.1
    t0=$(date +%s%N)
    kill -TERM "$p"
    wait "$u" || true
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
  done | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]/1000}'
}
cp "$(command -v tini-static)" "$root/usr/local/sbin/tini-static"
lat_ours=$(latency /usr/local/sbin/hakim-init)
lat_tini=$(latency /usr/local/sbin/tini-static)

size_ours=$(stat -c %s "$init_bin")
size_tini=$(stat -c %s "$(command -v tini-static)")
printf '\n| hakim-init | value | anchor (tini-static) | target |\n|---|---:|---:|---|\n'
printf '| static binary size | %.2f MiB | %.2f MiB | ≤ 2.5 MiB |\n' \
  "$(echo "$size_ours / 1048576" | bc -l)" "$(echo "$size_tini / 1048576" | bc -l)"
printf '| PID 1 RSS, agent + 2 services running (%s children) | %.2f MiB | – | ≤ 3 MiB |\n' \
  "$kids" "$(echo "$rss_kb / 1024" | bc -l)"
printf '| SIGTERM → exit, command mode, median of 20 | %s ms | %s ms | |\n' "$lat_ours" "$lat_tini"
grep -q '"argv"' "$root/tmp/agent.json" || echo "warning: the agent did not record a start" >&2
