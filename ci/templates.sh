#!/usr/bin/env bash
# Converts every variant of ci/batch.toml into OUTDIR: rootfs templates (the
# config's compressions) and Proxmox OCI archives, hakim-init injected with the
# services of images/services. Variants whose source manifest did not change
# since the last published release are skipped: that release's sources.txt is
# fetched first (gh; skipped when GH_TOKEN/GITHUB_TOKEN is unset).
#   ci/templates.sh OUTDIR [extra hakim-convert batch options…]
# FORCE=1 converts everything. Writes OUTDIR/batch.json (the --json summary)
# and exits non-zero when a variant failed (the others are still complete).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: ci/templates.sh OUTDIR [batch options…]}
shift
mkdir -p "$out"

init=$(ci/build-init.sh)
cargo build --quiet --locked --release -p hakim-convert
convert=${CARGO_TARGET_DIR:-target}/release/hakim-convert

if [ -n "${GH_TOKEN:-${GITHUB_TOKEN:-}}" ] && command -v gh >/dev/null 2>&1; then
  last=$(gh release list --limit 100 --json tagName \
    --jq '[.[] | select(.tagName | startswith("templates-"))][0].tagName // empty')
  if [ -n "$last" ]; then
    echo "templates: previous record from release $last" >&2
    gh release download "$last" --pattern sources.txt --dir "$out" --clobber
  fi
fi

force=()
[ -z "${FORCE:-}" ] || force=(--force)
status=0
"$convert" batch --config ci/batch.toml --format rootfs --format oci-archive \
  --inject-init "$init" --services images/services -o "$out" --json "${force[@]}" "$@" \
  >"$out/batch.json" || status=$?
jq -r '.variants[] | "\(.variant)\t\(.status)\t\(.error // "")"' "$out/batch.json" >&2
exit "$status"
