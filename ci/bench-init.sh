#!/usr/bin/env bash
# hakim-init figures, next to tini (Debian's tini package, installed here when missing) as
# the anchor, each in a PID namespace (unshare --pid --fork --mount --mount-proc, chroot into
# a busybox root):
#   - static binary size (stripped: the release-init profile strips);
#   - idle RSS of PID 1 with the agent and two services running (tini: with one idle child);
#     and with the user's session (the shipped session-*.toml in the Debian root of
#     ci/build-session-root.sh, when it is cached: an overlayfs view, nothing changed);
#   - boot → agent exec: from just before `unshare` to the agent's first instruction (the fake
#     agent records its start time). Without download: the agent is baked in
#     (/usr/local/bin/coder), the download is refused at once and HAKIM_AGENT_FALLBACK_AFTER=0
#     starts the baked one (one refused fetch attempt is included). Also with a download from
#     127.0.0.1 (ELF and --version checks included). tini: `tini -- coder agent`;
#   - SIGTERM → exit in command mode (`-- sleep`), the child exiting at once.
# Medians of RUNS runs (default 7) for RSS and boot, of 20 for SIGTERM.
# Needs root, busybox-static, python3, rustc with the musl target. Prints a Markdown table on
# stdout (ci/bench.sh puts it into docs/benchmarks.md); changes nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-7}

command -v tini-static >/dev/null 2>&1 || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null
}
init_bin=$(ci/build-init.sh)
work=$(mktemp -d /tmp/hakim-bench-init.XXXXXX)
server_pid=""
session_mnt=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  if [ -n "$session_mnt" ]; then umount "$session_mnt" 2>/dev/null || umount -l "$session_mnt" || true; fi
  # KEEP=1 keeps the work directory (logs, root) for a look afterwards.
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[bench-init] %s\n' "$*" >&2; }

# A static fake agent (std only) for the download endpoint and as the baked agent.
rustc --edition 2021 -O --target x86_64-unknown-linux-musl -C target-feature=+crt-static \
  -o "$work/fake-coder" tests/src/bin/fake-coder.rs 2>/dev/null ||
  rustc --edition 2021 -O --target x86_64-unknown-linux-musl -C target-feature=+crt-static -C linker=musl-gcc -o "$work/fake-coder" tests/src/bin/fake-coder.rs

root="$work/root"
mkdir -p "$root"/{bin,etc/hakim/services,usr/local/sbin,usr/local/bin,tmp,home,proc,dev}
cp "$(command -v busybox)" "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s /bin
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ndocker:x:999:\n' >"$root/etc/group"
cp "$init_bin" "$root/usr/local/sbin/hakim-init"
cp "$(command -v tini-static)" "$root/usr/local/sbin/tini-static"
cp "$work/fake-coder" "$root/usr/local/bin/coder"
services="$root/etc/hakim/services"
for s in one two; do
  printf 'command = ["/bin/sleep", "100000"]\nstop_grace = 2\n' >"$services/$s.toml.off"
done
services_on() { for f in "$services"/*.toml.off; do mv "$f" "${f%.off}"; done; }
services_off() { for f in "$services"/*.toml; do [ -e "$f" ] && mv "$f" "$f.off"; done; }

mkdir -p "$work/www/bin"
cp "$work/fake-coder" "$work/www/bin/coder-linux-amd64"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
closed_port=$(free_port) # nobody listens there: every download is refused at once
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
server_pid=$!
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
  sleep 0.05
done

pid1_of() { # host pid of the namespace's PID 1 (the child of unshare)
  local u=$1 c=""
  for _ in $(seq 200); do
    c=$(cat /proc/"$u"/task/*/children 2>/dev/null | awk '{print $1}')
    [ -n "$c" ] && break
    sleep 0.01
  done
  echo "$c"
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR) printf "%.2f", (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
range() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }
in_ns() { # in_ns ENV... -- ARGV... & : PID namespace + chroot, clean environment (background only)
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  # exec: `in_ns … &` then leaves $! = unshare, whose child is the namespace's PID 1.
  exec env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${envs[@]}" \
    unshare --pid --fork --mount --mount-proc --kill-child chroot "$root" "$@"
}
wait_record() { # wait until the agent recorded its start; prints its t_unix_ns
  for _ in $(seq 1000); do
    if [ -s "$root/tmp/agent.json" ] && grep -q '"start"' "$root/tmp/agent.json"; then
      sed -n 's/.*"t_unix_ns":\([0-9]*\).*/\1/p' "$root/tmp/agent.json" | head -n1
      return 0
    fi
    sleep 0.005
  done
  echo "agent did not start" >&2
  return 1
}
stop_ns() { # stop_ns UNSHARE_PID PID1
  kill -TERM "$2" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
reset_root() { rm -rf "$root/tmp/agent.json" "$root/var/lib/hakim"; }

# --- idle RSS (agent + 2 services), boot → agent exec ------------------------------------
# run_daemon URL EXTRA_ENV... : one hakim-init boot; prints "boot_ms rss_kib children"
run_daemon() {
  local url=$1 t0 t1 u p rss kids
  shift
  reset_root
  t0=$(date +%s%N)
  in_ns CODER_AGENT_URL="$url" CODER_AGENT_TOKEN=bench-token FAKE_CODER_RECORD=/tmp/agent.json "$@" \
    -- /usr/local/sbin/hakim-init >>"$work/daemon.log" 2>&1 &
  u=$!
  t1=$(wait_record) || { stop_ns "$u" "$(pid1_of "$u")"; return 1; }
  p=$(pid1_of "$u")
  rss=-1 kids=0
  if [ "${MEASURE_RSS:-0}" = 1 ]; then
    sleep 2
    rss=$(awk '/^VmRSS/{print $2}' /proc/"$p"/status)
    kids=$(cat /proc/"$p"/task/*/children | wc -w)
  fi
  stop_ns "$u" "$p"
  echo "$(((t1 - t0) / 1000)) $rss $kids"
}
# run_tini: `tini -- coder agent`; prints "boot_us rss_kib"
run_tini() {
  local t0 t1 u p rss=-1
  reset_root
  t0=$(date +%s%N)
  in_ns FAKE_CODER_RECORD=/tmp/agent.json -- /usr/local/sbin/tini-static -- /usr/local/bin/coder agent \
    >>"$work/tini.log" 2>&1 &
  u=$!
  t1=$(wait_record)
  p=$(pid1_of "$u")
  if [ "${MEASURE_RSS:-0}" = 1 ]; then
    sleep 2
    rss=$(awk '/^VmRSS/{print $2}' /proc/"$p"/status)
  fi
  stop_ns "$u" "$p"
  echo "$(((t1 - t0) / 1000)) $rss"
}

log "idle RSS with the agent and two services ($RUNS runs)"
services_on
: >"$work/rss"
for _ in $(seq "$RUNS"); do MEASURE_RSS=1 run_daemon "http://127.0.0.1:$port" >>"$work/rss"; done
services_off
log "boot → agent exec, baked agent, download refused ($RUNS runs)"
: >"$work/boot-baked"
for _ in $(seq "$RUNS"); do
  run_daemon "http://127.0.0.1:$closed_port" HAKIM_AGENT_FALLBACK_AFTER=0 >>"$work/boot-baked"
done
log "boot → agent exec with a download from 127.0.0.1 ($RUNS runs)"
: >"$work/boot-dl"
for _ in $(seq "$RUNS"); do run_daemon "http://127.0.0.1:$port" >>"$work/boot-dl"; done
log "tini: boot → agent exec and idle RSS ($RUNS runs)"
: >"$work/tini"
for _ in $(seq "$RUNS"); do MEASURE_RSS=1 run_tini >>"$work/tini"; done
# --- idle RSS with the user's session (only when the session root is cached) -----------------
session_cache=${HAKIM_TEST_CACHE:-/var/tmp/hakim-test-cache}/session-root/rootfs
: >"$work/rss-session"
if [ -x "$session_cache/usr/bin/gnome-keyring-daemon" ]; then
  log "idle RSS with the user's session ($RUNS runs)"
  busybox_root=$root
  root=$work/session/root
  mkdir -p "$root" "$work/session/upper" "$work/session/work"
  mount -t overlay overlay \
    -o "lowerdir=$session_cache,upperdir=$work/session/upper,workdir=$work/session/work" "$root"
  session_mnt=$root
  install -D -m 0755 "$init_bin" "$root/usr/local/sbin/hakim-init"
  install -D -m 0755 "$work/fake-coder" "$root/usr/local/bin/coder"
  for d in null:3 zero:5 random:8 urandom:9; do
    rm -f "$root/dev/${d%:*}"
    mknod -m 666 "$root/dev/${d%:*}" c 1 "${d#*:}"
  done
  mkdir -p "$root/etc/hakim/services"
  cp images/services/session-*.toml "$root/etc/hakim/services/"
  for _ in $(seq "$RUNS"); do
    MEASURE_RSS=1 run_daemon "http://127.0.0.1:$closed_port" HAKIM_AGENT_FALLBACK_AFTER=0 \
      >>"$work/rss-session"
  done
  grep -q "session-keyring is ready" "$work/daemon.log" || {
    echo "bench-init: the session never came up (see $work/daemon.log)" >&2
    exit 1
  }
  umount "$root"
  session_mnt=""
  root=$busybox_root
else
  log "no cached session root ($session_cache): the session RSS is not measured"
fi
grep -q "using /usr/local/bin/coder" "$work/daemon.log" || {
  echo "bench-init: the baked agent was never used (see $work/daemon.log)" >&2
  exit 1
}

# --- SIGTERM → exit in command mode, median of 20 --------------------------------------------
latency() { # $1: init binary inside the root; prints milliseconds, one line per run
  local bin=$1 t0 t1 u p
  for _ in $(seq 20); do
    in_ns -- "$bin" -- /bin/sleep 1000 >/dev/null 2>&1 &
    u=$!
    p=$(pid1_of "$u")
    sleep 0.1
    t0=$(date +%s%N)
    kill -TERM "$p"
    wait "$u" || true
    t1=$(date +%s%N)
    echo "$(((t1 - t0) / 1000))"
  done | awk '{printf "%.3f\n", $1/1000}'
}
log "SIGTERM → exit (20 runs each)"
latency /usr/local/sbin/hakim-init >"$work/lat-ours"
latency /usr/local/sbin/tini-static >"$work/lat-tini"

ms() { awk '{printf "%.3f\n", $1/1000}'; }
mib() { awk '{printf "%.3f\n", $1/1024}'; }
size_ours=$(stat -c %s "$init_bin")
size_tini=$(stat -c %s "$(command -v tini-static)")
stripped=$(file -b "$init_bin" | grep -o 'stripped\|not stripped' | head -n1)
kids=$(awk '{print $3}' "$work/rss" | sort -n | tail -n1)
rss_ours=$(awk '{print $2}' "$work/rss" | mib | median)
rss_tini=$(awk '{print $2}' "$work/tini" | mib | median)
boot_baked=$(awk '{print $1}' "$work/boot-baked" | ms | median)
boot_baked_r=$(awk '{print $1}' "$work/boot-baked" | ms | range)
boot_dl=$(awk '{print $1}' "$work/boot-dl" | ms | median)
boot_dl_r=$(awk '{print $1}' "$work/boot-dl" | ms | range)
boot_tini=$(awk '{print $1}' "$work/tini" | ms | median)
boot_tini_r=$(awk '{print $1}' "$work/tini" | ms | range)
lat_ours=$(median <"$work/lat-ours")
lat_tini=$(median <"$work/lat-tini")
lat_ours_r=$(range <"$work/lat-ours")
lat_tini_r=$(range <"$work/lat-tini")
rss_target=$(awk -v r="$rss_ours" 'BEGIN{print (r <= 3) ? "met" : "**NOT met**"}')
if [ -s "$work/rss-session" ]; then
  rss_session=$(awk '{print $2}' "$work/rss-session" | mib | median)
  kids_session=$(awk '{print $3}' "$work/rss-session" | sort -n | tail -n1)
  rss_session_target=$(awk -v r="$rss_session" 'BEGIN{print (r <= 3) ? "met" : "**NOT met**"}')
fi
size_target=$(awk -v s="$size_ours" 'BEGIN{print (s/1048576 <= 2.5) ? "met" : "**NOT met**"}')

printf '| hakim-init | hakim-init | tini-static | target |\n|---|---:|---:|---|\n'
printf '| static binary size (%s) | %.2f MiB | %.2f MiB | ≤ 2.5 MiB: %s |\n' \
  "$stripped" "$(echo "$size_ours / 1048576" | bc -l)" "$(echo "$size_tini / 1048576" | bc -l)" "$size_target"
printf '| PID 1 idle RSS (hakim-init: agent + 2 services, %s children; tini: the agent), median of %s | %s MiB | %s MiB | ≤ 3 MiB: %s |\n' \
  "$kids" "$RUNS" "$rss_ours" "$rss_tini" "$rss_target"
if [ -n "${rss_session:-}" ]; then
  printf '| PID 1 idle RSS with the user'"'"'s session (agent + session-dbus, -keyring, -ssh-agent, %s children), median of %s | %s MiB | – | ≤ 3 MiB: %s |\n' \
    "$kids_session" "$RUNS" "$rss_session" "$rss_session_target"
fi
printf '| boot → agent exec, no download (baked agent), median of %s (range) | %s ms (%s) | %s ms (%s) | |\n' \
  "$RUNS" "$boot_baked" "$boot_baked_r" "$boot_tini" "$boot_tini_r"
printf '| boot → agent exec with a download from 127.0.0.1 + ELF/--version check, median of %s (range) | %s ms (%s) | – | |\n' \
  "$RUNS" "$boot_dl" "$boot_dl_r"
printf '| SIGTERM → exit, command mode, median of 20 (range) | %s ms (%s) | %s ms (%s) | |\n' \
  "$lat_ours" "$lat_ours_r" "$lat_tini" "$lat_tini_r"
