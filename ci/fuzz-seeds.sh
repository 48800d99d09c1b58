#!/usr/bin/env bash
# Writes the fuzz seed corpora into fuzz/corpus/<target>/ (or $1): every layer
# stack, OCI layout and verified artifact the converter's fixture tests build (they dump
# themselves when HAKIM_FUZZ_SEEDS is set), the service files under
# images/services/, and representative account, env and registry inputs.
# Seeds are named by content; re-running only adds what is new.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
out="${1:-fuzz/corpus}"
sep='%%HAKIM%%'

# The fixtures' dump: the one a test run already wrote (HAKIM_FUZZ_SEEDS, as
# ci/test.sh sets it), else a run of the converter's fixture tests now.
if [ -n "${HAKIM_FUZZ_SEEDS:-}" ] && [ -d "$HAKIM_FUZZ_SEEDS/flatten" ]; then
  dump="$HAKIM_FUZZ_SEEDS"
else
  dump="$(mktemp -d)"
  trap 'rm -rf "$dump"' EXIT
  HAKIM_FUZZ_SEEDS="$dump" cargo test --quiet -p hakim-convert \
    --test layer_rules --test artifact --test inputs --test verify --test agent_native \
    >/dev/null 2>&1 || {
    echo "fuzz-seeds: the converter fixture tests failed; run them first" >&2
    exit 1
  }
fi

# seed TARGET: stdin becomes one seed of TARGET, named by its sha256.
seed() {
  mkdir -p "$out/$1"
  local tmp="$out/$1/.new"
  cat >"$tmp"
  mv "$tmp" "$out/$1/$(sha256sum "$tmp" | cut -c1-64)"
}

# Large fixtures (100 kB files, 10,000 layers) slow every execution down
# without adding paths: only seeds up to 64 KiB.
small() { [ "$(stat -c %s "$1")" -le 65536 ]; }
for f in "$dump"/flatten/*; do
  small "$f" || continue
  seed flatten <"$f"
  seed convert <"$f"
  # verify flattens a layer stack first when flag bit 3 is clear.
  seed verify <"$f"
done
for f in "$dump"/manifest/*; do small "$f" && seed manifest <"$f"; done
for f in "$dump"/verify/*; do small "$f" && seed verify <"$f"; done

# Services: each shipped file alone, then all of them together.
all=""
for f in images/services/*.toml; do
  { printf '\x0f'; cat "$f"; } | seed init_services
  all+="$(cat "$f")"$'\n'"$sep"$'\n'
done
{ printf '\x0f'; printf '%s' "$all"; printf 'command = ["x"]\nafter = ["svc0", "svc9"]\n'; } | seed init_services
printf '\x00command = []\n' | seed init_services
printf '\x08name = "a"\ncommand = ["a"]\nafter = ["b"]\n%s\nname = "b"\ncommand = ["b"]\nafter = ["a"]\nstop_signal = "RTMIN+3"\n' "$sep" | seed init_services

# parts TARGET FLAGS PART...: FLAGS (hex, e.g. "2001") as bytes, then the parts
# separated like fuzz/src/lib.rs splits them.
parts() {
  local target="$1" flags="$2"
  shift 2
  {
    printf '%b' "$(printf '%s' "$flags" | sed 's/../\\x&/g')"
    local first=1
    for part in "$@"; do
      [ "$first" = 1 ] || printf '%s\n' "$sep"
      first=0
      printf '%s' "$part"
    done
  } | seed "$target"
}

# Accounts: flag bytes, then passwd, group, shadow, gshadow.
debian_passwd='root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
'
debian_group='root:x:0:
sudo:x:27:
docker:x:998:alice,
users:x:100:
nogroup:x:65534:
'
debian_shadow='root:*:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
'
debian_gshadow='root:*::
sudo:*::
docker:!::alice
'
accounts() { parts init_users "$@"; }
accounts 2001 "$debian_passwd" "$debian_group" "$debian_shadow" "$debian_gshadow"
accounts 2003 "$debian_passwd" "$debian_group"
accounts 2800 "root:x:0:0:root:/root:/bin/sh
coder:x:1000:1000::/home/coder:/bin/sh" "coder:x:1000:"
accounts 2001 "# comment
root:x:0:0::/root:/bin/sh
broken line without colons
coder:x:1000
+::::::
-nis" "docker:x:998
+:::" "root:*::::::
"
accounts 210f "root:x:0:0:root:/root:/bin/sh"$'\r'"
+@netgroup" "wheel:x:10:root
coder:x:1000:coder"
accounts 0000 "" "" "" ""

# Env, agent configuration and URLs: flags, then env file, URL, token, token
# file path, bootstrap, auth, token file contents, a string to expand.
env_seed() { parts init_env "$@"; }
env_file='# written by hakim-convert
PATH=/usr/local/bin:/usr/bin:/bin
LANG=C.UTF-8
not a var
1BAD=x
EMPTY=
'
# shellcheck disable=SC2016 # the $-expressions are for hakim-init to expand
env_seed 00 "$env_file" "https://coder.example.com" "5f2c1c2e-aaaa-4bbb-8ccc-0123456789ab" "" "" "" "" '${HOME}/x ${MISSING:-d} $$ $X ${'
env_seed 06 "" "http://[::1]:3000/coder/" "" "" "" "token" "" "plain"
env_seed 01 "" "https://CODER.example.com:443//" "" "/run/secrets/token" "" "" "tok-from-file"$'\n' ""
env_seed 09 "" "" "" "/run/secrets/token" "" "" "" ""
env_seed 00 "" "" "" "" "aHR0cHM6Ly9jb2Rlci5leGFtcGxlLmNvbXx0b2tlbg==" "" "" ""
env_seed 00 "" "ftp://user:pw@host/a?b#c" "t" "" "!!notbase64" "instance-identity" "" ""
env_seed 10 "" "https://h/%zz/../x" "" "/nope" "" "" "" ""

# Registry texts: the first byte picks the parser (0 reference, 1 challenge,
# 2 token answer, 3 auth file, 4 Content-Range).
reg() { parts registry_parsers "$@"; }
for r in ghcr.io/shekohex/hakim-base:latest docker://debian \
  "127.0.0.1:5000/hakim-elixir@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
  "[::1]:5000/a/b:tag" localhost/x Someone/Tool "docker.io/library/debian:trixie" \
  "index.docker.io/x"; do
  reg 00 "$r"
done
reg 01 'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:x/y:pull,push"'
reg 01 'Basic realm="r", Bearer realm=http://127.0.0.1/t service=x, Negotiate'
reg 01 'Bearer realm="a\"b\\c é"'
reg 02 '{"token":"abc","expires_in":300}'
reg 02 '{"access_token":"abcdefghijklmnop","expires_in":99999999999}'
reg 03 '{"auths":{"ghcr.io":{"auth":"dXNlcjpwYXNz"},"https://index.docker.io/v1/":{"username":"u","password":"p"}}}'
reg 04 'bytes 100-199/1000'
reg 04 'bytes */1000'

for t in "$out"/*; do
  echo "fuzz-seeds: $(basename "$t"): $(find "$t" -type f | wc -l) seeds"
done
