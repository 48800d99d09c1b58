#!/usr/bin/env bash
# Publishes what ci/templates.sh converted into OUTDIR:
#   - a new release TAG (never an existing one: assets stay immutable) holding
#     the converted artifacts, their sha256sums.txt and the full skip record
#     sources.txt (unchanged variants stay in the earlier releases it names);
#   - for every converted OCI archive hakim-<variant>_<tag>.tar, the image as
#     REGISTRY/hakim-<variant>:agent-native and :agent-native-<TAG>, for
#     Proxmox's oci-registry-pull (skopeo; log in first).
#   ci/templates-publish.sh OUTDIR TAG REGISTRY   (REGISTRY e.g. ghcr.io/shekohex)
# GH: the GitHub CLI to run (default gh; tests use echo). SKOPEO_COPY_OPTS:
# extra skopeo copy options (e.g. --dest-tls-verify=false for a test registry).
set -euo pipefail
out=${1:?usage: ci/templates-publish.sh OUTDIR TAG REGISTRY}
tag=${2:?usage: ci/templates-publish.sh OUTDIR TAG REGISTRY}
registry=${3:?usage: ci/templates-publish.sh OUTDIR TAG REGISTRY}

read -r -a skopeo_opts <<<"${SKOPEO_COPY_OPTS:-}"

mapfile -t converted < <(jq -r '.variants[].artifacts[] | select(.status == "converted") | .file' \
  "$out/batch.json")
if [ "${#converted[@]}" -eq 0 ]; then
  echo "templates-publish: nothing converted, nothing to publish" >&2
  exit 0
fi

rel=$out/release
rm -rf "$rel"
mkdir -p "$rel"
for f in "${converted[@]}"; do
  ln "$out/$f" "$rel/$f" 2>/dev/null || cp "$out/$f" "$rel/$f"
done
cp "$out/sources.txt" "$rel/sources.txt"
(cd "$rel" && sha256sum "${converted[@]}" >sha256sums.txt && sha256sum -c --strict --quiet sha256sums.txt)
{
  echo "Converted by hakim-convert batch (ci/batch.toml) with hakim-init injected."
  echo
  echo "| variant | status | source manifest |"
  echo "|---|---|---|"
  jq -r '.variants[] | "| \(.variant) | \(.status) | `\(.manifest_digest // "-")` |"' "$out/batch.json"
  echo
  echo "Variants marked skipped did not change: their artifacts are in earlier templates-* releases (sources.txt lists every current artifact)."
} >"$rel/notes.md"
"${GH:-gh}" release create "$tag" --title "Templates $tag" --notes-file "$rel/notes.md" \
  "$rel"/sources.txt "$rel"/sha256sums.txt "${converted[@]/#/$rel/}"

for f in "${converted[@]}"; do
  case $f in
    *_*.tar)
      variant=${f%%_*}
      for t in agent-native "agent-native-$tag"; do
        skopeo copy --quiet "${skopeo_opts[@]}" "oci-archive:$out/$f" "docker://$registry/$variant:$t"
        echo "$registry/$variant:$t"
      done
      ;;
  esac
done
