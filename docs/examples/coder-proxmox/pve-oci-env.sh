#!/bin/sh
# Gives a Proxmox VE container its environment through the API, then starts it:
# the OCI route of main.tf runs it (terraform_data + local-exec) on every build.
#
# Why: creating a container from an OCI image replaces the `env` given at
# creation with the image's Env, so the first start would have no
# CODER_AGENT_* (docs/proxmox.md, "First build"). Proxmox applies a PUT of
# `env` on a *stopped* container at once, and a start writes it into the LXC
# config (lxc.environment.runtime), which is what PID 1 gets.
#
# PVE_TRANSITION=start:
#   running with exactly this environment already -> nothing to do;
#   running otherwise (a new build brings a new agent token) -> shut down;
#   then PUT env (the container's other entries — the image's Env — kept, the
#   template's own replaced) and start.
# PVE_TRANSITION=stop: shut the container down if it runs; env is not touched.
#
# Everything comes from the environment, so nothing secret is on a command line
# (local-exec's `environment`; by hand: export the variables first):
#   PVE_API_URL       the API, e.g. https://pve.example.com:8006/
#   PVE_API_TOKEN     USER@REALM!TOKENID=SECRET (secret; sent from a file, never in argv)
#   PVE_NODE          node name
#   PVE_VMID          container id
#   PVE_TRANSITION    start | stop (Coder's data.coder_workspace.me.transition)
#   PVE_CT_ENV        KEY=VALUE lines the container must get (secret: holds the agent token)
#   PVE_CA_FILE       CA bundle to verify the API's certificate with (optional)
#   PVE_INSECURE      1/true: do not verify the API's certificate
#   PVE_SHUTDOWN_TIMEOUT  seconds before a shutdown is forced (default 60)
#   PVE_TASK_TIMEOUT      seconds to wait for each task (default 300)
# The API token needs VM.PowerMgmt, VM.Config.Options and VM.Audit on the container.
# Needs: a POSIX sh, curl (7.55+), awk, sed, mktemp. Prints names, never values;
# exits non-zero with a one-line reason on any failure.
set -eu

me=pve-oci-env
say() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
  say "$*"
  exit 1
}

: "${PVE_API_URL:?PVE_API_URL is not set}" "${PVE_NODE:?PVE_NODE is not set}"
: "${PVE_VMID:?PVE_VMID is not set}" "${PVE_TRANSITION:?PVE_TRANSITION is not set}"
[ -n "${PVE_API_TOKEN:-}" ] || die "PVE_API_TOKEN is not set"
case $PVE_API_TOKEN in
  *@*!*=*) ;;
  *) die "PVE_API_TOKEN must look like USER@REALM!TOKENID=SECRET" ;;
esac
case $PVE_VMID in
  '' | *[!0-9]*) die "PVE_VMID must be a number" ;;
esac
case $PVE_NODE in
  *[!A-Za-z0-9.-]*) die "PVE_NODE is not a node name" ;;
esac
case $PVE_TRANSITION in
  start | stop) ;;
  *) die "PVE_TRANSITION must be start or stop" ;;
esac
shutdown_timeout=${PVE_SHUTDOWN_TIMEOUT:-60}
task_timeout=${PVE_TASK_TIMEOUT:-300}
case $shutdown_timeout$task_timeout in
  *[!0-9]*) die "PVE_SHUTDOWN_TIMEOUT and PVE_TASK_TIMEOUT are seconds" ;;
esac

api=${PVE_API_URL%/}
api=${api%/api2/json}/api2/json
ct=/nodes/$PVE_NODE/lxc/$PVE_VMID

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM HUP
# The header file keeps the token out of curl's argv (`ps`); printf is a builtin.
printf 'Authorization: PVEAPIToken=%s\n' "$PVE_API_TOKEN" >"$tmp/auth"

if [ -n "${PVE_CA_FILE:-}" ] && [ ! -r "$PVE_CA_FILE" ]; then
  die "PVE_CA_FILE $PVE_CA_FILE is not readable"
fi

# Replaces every secret (the API token, its secret part, each value of
# PVE_CT_ENV) by *** in stdin. Secrets come through the environment, not argv.
redact() {
  LC_ALL=C awk '
    BEGIN {
      n = 0
      t = ENVIRON["PVE_API_TOKEN"]; s[++n] = t
      i = index(t, "="); if (i) s[++n] = substr(t, i + 1)
      m = split(ENVIRON["PVE_CT_ENV"], lines, "\n")
      for (j = 1; j <= m; j++) {
        i = index(lines[j], "=")
        if (i && length(lines[j]) - i >= 4) s[++n] = substr(lines[j], i + 1)
      }
    }
    {
      line = $0
      for (j = 1; j <= n; j++) {
        if (s[j] == "") continue
        out = ""
        while ((i = index(line, s[j])) > 0) {
          out = out substr(line, 1, i - 1) "***"
          line = substr(line, i + length(s[j]))
        }
        line = out line
      }
      print line
    }'
}

# Prints the string value of KEY in a PVE JSON answer ({"data":...}, at most one
# object deep), JSON escapes decoded; NUL (the separator of `env`) becomes a
# newline. Nothing when the key is absent.
json_get() {
  LC_ALL=C awk -v want="$1" '
    function hexval(h,   k, v, c) {
      v = 0
      for (k = 1; k <= length(h); k++) {
        c = index("0123456789abcdef", tolower(substr(h, k, 1)))
        if (c == 0) return -1
        v = v * 16 + c - 1
      }
      return v
    }
    { doc = doc $0 }
    END {
      n = length(doc); depth = 0; key = ""; lastkey = ""; i = 1
      while (i <= n) {
        c = substr(doc, i, 1)
        if (c == "{" || c == "[") { depth++; lastkey = ""; i++; continue }
        if (c == "}" || c == "]") { depth--; i++; continue }
        if (c == ",") { lastkey = ""; i++; continue }
        if (c != "\"") { i++; continue }
        # A string: decode it.
        s = ""; i++
        while (i <= n) {
          c = substr(doc, i, 1)
          if (c == "\"") { i++; break }
          if (c != "\\") { s = s c; i++; continue }
          e = substr(doc, i + 1, 1); i += 2
          if (e == "n") s = s "\n"
          else if (e == "t") s = s "\t"
          else if (e == "r") s = s "\r"
          else if (e == "b") s = s "\b"
          else if (e == "f") s = s "\f"
          else if (e == "u") {
            v = hexval(substr(doc, i, 4)); i += 4
            if (v == 0) s = s "\n"
            else if (v < 0 || (v >= 55296 && v < 57344)) { bad = 1 }
            else if (v < 128) s = s sprintf("%c", v)
            else if (v < 2048) s = s sprintf("%c%c", 192 + int(v / 64), 128 + v % 64)
            else s = s sprintf("%c%c%c", 224 + int(v / 4096), 128 + int(v / 64) % 64, 128 + v % 64)
          } else s = s e
        }
        # A key when a colon follows.
        j = i
        while (substr(doc, j, 1) == " ") j++
        if (substr(doc, j, 1) == ":") { lastkey = s; i = j + 1; continue }
        if (depth <= 2 && lastkey == want) { printf "%s", s; exit bad ? 3 : 0 }
      }
    }'
}

# api METHOD PATH [curl arguments...]: the answer in $tmp/body; exits with a
# one-line reason unless the HTTP status is 2xx.
api() {
  method=$1 path=$2
  shift 2
  set -- "$@" --silent --show-error --connect-timeout 10 --max-time 120
  case ${PVE_INSECURE:-} in
    1 | true | yes | on) set -- "$@" --insecure ;;
  esac
  if [ -n "${PVE_CA_FILE:-}" ]; then
    set -- "$@" --cacert "$PVE_CA_FILE"
  fi
  code=$(curl "$@" --header @"$tmp/auth" --request "$method" \
    --dump-header "$tmp/headers" --output "$tmp/body" --write-out '%{http_code}' \
    "$api$path" 2>"$tmp/curl-err") || {
    die "$method $path: $(redact <"$tmp/curl-err" | tr '\n' ' ')"
  }
  case $code in
    2??) return 0 ;;
  esac
  reason=$(sed -n '1s/^HTTP\/[0-9.]* [0-9]* *//p' "$tmp/headers" | tr -d '\r' | redact)
  body=$(redact <"$tmp/body" | tr -d '\n' | cut -c1-300)
  hint=
  case $code in
    401) hint=" (is PVE_API_TOKEN right, and is the token still valid?)" ;;
    403) hint=" (the token lacks a permission: VM.PowerMgmt, VM.Config.Options, VM.Audit)" ;;
  esac
  die "$method $path: HTTP $code ${reason}${body:+: $body}$hint"
}

# Waits for the task whose UPID is the answer in $tmp/body; fails unless it ends OK.
wait_task() {
  what=$1
  upid=$(json_get data <"$tmp/body")
  [ -n "$upid" ] || die "$what: Proxmox answered without a task id"
  enc=$(printf '%s' "$upid" | sed -e 's/%/%25/g' -e 's/:/%3A/g' -e 's/@/%40/g' -e 's/!/%21/g')
  waited=0
  while :; do
    api GET "/nodes/$PVE_NODE/tasks/$enc/status"
    if [ "$(json_get status <"$tmp/body")" = stopped ]; then
      result=$(json_get exitstatus <"$tmp/body")
      case $result in
        OK | WARNINGS*) return 0 ;;
      esac
      die "$what failed: ${result:-no exit status} (task $upid; its log is in the node's task list)"
    fi
    [ "$waited" -lt "$task_timeout" ] || die "$what: task $upid still running after ${task_timeout} s"
    sleep 1
    waited=$((waited + 1))
  done
}

ct_status() {
  api GET "$ct/status/current"
  json_get status <"$tmp/body"
}

shutdown_ct() {
  say "CT $PVE_VMID: shutting down (forced after ${shutdown_timeout} s)"
  api POST "$ct/status/shutdown" --data-urlencode "timeout=$shutdown_timeout" --data-urlencode forceStop=1
  wait_task "shutdown of CT $PVE_VMID"
}

# The env the container must have, one entry a line, into $tmp/want: its
# present entries ($tmp/have) less the names the template sets now or set last
# time (listed in HAKIM_TEMPLATE_VARS), then the template's entries, then that
# list. Trailing blanks are dropped, as Proxmox's config file does.
want_env() {
  printf '%s\n' "${PVE_CT_ENV:-}" | sed -e 's/[[:blank:]]*$//' -e '/^$/d' >"$tmp/new"
  bad=$(LC_ALL=C awk '!/^[A-Za-z_][A-Za-z0-9_]*=/ { print NR; exit }' "$tmp/new")
  [ -z "$bad" ] || die "PVE_CT_ENV line $bad is not NAME=VALUE"
  if LC_ALL=C tr -d '\t\n' <"$tmp/new" | LC_ALL=C grep -q '[[:cntrl:]]'; then
    die "PVE_CT_ENV holds a control character (Proxmox refuses them)"
  fi
  names=$(sed 's/=.*//' "$tmp/new" | tr '\n' ',' | sed 's/,$//')
  NAMES=$names LC_ALL=C awk '
    BEGIN {
      m = split(ENVIRON["NAMES"], a, ","); for (j = 1; j <= m; j++) drop[a[j]] = 1
      drop["HAKIM_TEMPLATE_VARS"] = 1
    }
    { k = $0; sub(/=.*/, "", k); line[NR] = $0; name[NR] = k }
    k == "HAKIM_TEMPLATE_VARS" {
      v = $0; sub(/^[^=]*=/, "", v); m = split(v, a, ","); for (j = 1; j <= m; j++) drop[a[j]] = 1
    }
    END { for (j = 1; j <= NR; j++) if (line[j] != "" && !(name[j] in drop)) print line[j] }
  ' "$tmp/have" >"$tmp/want"
  cat "$tmp/new" >>"$tmp/want"
  printf 'HAKIM_TEMPLATE_VARS=%s\n' "$names" >>"$tmp/want"
}

# The config as it is (not pending) into $tmp/have, and its digest.
read_config() {
  api GET "$ct/config?current=1"
  json_get env <"$tmp/body" >"$tmp/have" || die "cannot read the container's env"
  if [ -s "$tmp/have" ]; then
    echo >>"$tmp/have"
  fi
  digest=$(json_get digest <"$tmp/body")
}

status=$(ct_status)
case $status in
  running | stopped) ;;
  *) die "CT $PVE_VMID on $PVE_NODE: unexpected status '${status}'" ;;
esac

if [ "$PVE_TRANSITION" = stop ]; then
  if [ "$status" = running ]; then
    shutdown_ct
  else
    say "CT $PVE_VMID: already stopped"
  fi
  exit 0
fi

read_config
want_env
if [ "$status" = running ]; then
  if cmp -s "$tmp/have" "$tmp/want"; then
    say "CT $PVE_VMID: running with this environment already; nothing to do"
    exit 0
  fi
  shutdown_ct
  read_config
  want_env
fi

# The NUL-separated list, URL-encoded by curl (%00 between entries).
: >"$tmp/env"
first=1
while IFS= read -r entry; do
  [ "$first" = 1 ] || printf '\000' >>"$tmp/env"
  printf '%s' "$entry" >>"$tmp/env"
  first=0
done <"$tmp/want"
say "CT $PVE_VMID: setting env ($(sed 's/=.*//' "$tmp/want" | tr '\n' ' ' | sed 's/ $//'))"
if [ -n "$digest" ]; then
  api PUT "$ct/config" --data-urlencode "env@$tmp/env" --data-urlencode "digest=$digest"
else
  api PUT "$ct/config" --data-urlencode "env@$tmp/env"
fi
say "CT $PVE_VMID: starting"
api POST "$ct/status/start" --data ''
wait_task "start of CT $PVE_VMID"
say "CT $PVE_VMID: started with its environment"
