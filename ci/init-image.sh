#!/usr/bin/env bash
# The hakim-init scratch image (what images/hakim-init/Dockerfile produces: only
# /hakim-init, its entry point) for linux/amd64 and linux/arm64, pushed as one
# multi-arch index under every TAG.
#   ci/init-image.sh DIST REPOSITORY TAG...
# DIST holds hakim-init-x86_64-linux-musl and hakim-init-aarch64-linux-musl
# (ci/release-binaries.sh DIST init). REPOSITORY e.g. ghcr.io/shekohex/hakim-init.
# Extra `buildah manifest push` options in BUILDAH_PUSH_OPTS (e.g.
# --tls-verify=false for a local test registry). buildah runs on a private
# temporary storage (vfs), so nothing is left behind.
set -euo pipefail
dist=${1:?usage: ci/init-image.sh DIST REPOSITORY TAG...}
repo=${2:?usage: ci/init-image.sh DIST REPOSITORY TAG...}
shift 2
[ "$#" -gt 0 ] || { echo "init-image: no tag" >&2; exit 2; }
tags=("$@")
read -r -a push_opts <<<"${BUILDAH_PUSH_OPTS:-}"

store=$(mktemp -d /tmp/hakim-init-image.XXXXXX)
b() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }
cleanup() {
  b rm --all >/dev/null 2>&1 || true
  rm -rf "$store"
}
trap cleanup EXIT

list=localhost/hakim-init-index:build
b manifest create "$list" >/dev/null
for pair in amd64:x86_64 arm64:aarch64; do
  arch=${pair%%:*}
  bin="$dist/hakim-init-${pair#*:}-linux-musl"
  [ -f "$bin" ] || { echo "init-image: $bin missing" >&2; exit 1; }
  ctr=$(b from --arch "$arch" --os linux scratch)
  b copy --chmod 0755 "$ctr" "$bin" /hakim-init >/dev/null
  b config --arch "$arch" --os linux --entrypoint '["/hakim-init"]' --cmd '' \
    --label org.opencontainers.image.source=https://github.com/shekohex/hakim-tools "$ctr"
  image=$(b commit --quiet --format oci --rm "$ctr" "localhost/hakim-init:$arch")
  b manifest add "$list" "$image" >/dev/null
done
for tag in "${tags[@]}"; do
  b manifest push --all --format oci "${push_opts[@]}" "$list" "docker://$repo:$tag"
  echo "$repo:$tag"
done
