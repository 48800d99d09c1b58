#!/usr/bin/env bash
# Build the Hakim-like image used by tests/tests/pve_e2e.rs (crate hakim-e2e).
#
#   ci/build-hakim-image.sh CACHE_DIR
#
# A Debian trixie minbase rootfs built into a multi-layer image by `buildah bud` from
# tests/fixtures/hakim-like/Dockerfile: user coder (uid 1000, group docker, /bin/bash), files
# removed in later layers, a chmod -R that copies a tree up, hardlinks, a binary with
# security.capability, ENV/WORKDIR/USER/ENTRYPOINT/CMD like the upstream Hakim images.
#
# Produces CACHE_DIR/hakim-like/oci (OCI layout, tag "e2e", gzip layers). The debootstrap
# rootfs is the one ci/build-test-image.sh caches (CACHE_DIR/debootstrap/rootfs); that script
# is run first and does nothing when its image is up to date.
#
# Idempotent: does nothing when CACHE_DIR/hakim-like/stamp holds the sha256 of this script,
# the fixture directory and the debootstrap key. Serialised with flock on CACHE_DIR/.lock-hakim.
#
# Needs root. Network: only what ci/build-test-image.sh needs (the Debian mirror).
set -euo pipefail

if [ "$#" -ne 1 ]; then
	echo "usage: $0 CACHE_DIR" >&2
	exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "$0: must run as root (buildah vfs storage, file ownership, setcap)" >&2
	exit 1
fi
for tool in buildah tar setcap flock sha256sum; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "$0: required tool missing: $tool" >&2
		exit 1
	}
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FIXTURE=$HERE/../tests/fixtures/hakim-like
mkdir -p "$1"
CACHE=$(cd "$1" && pwd)
OUT=$CACHE/hakim-like
log() { printf '[build-hakim-image] %s\n' "$*" >&2; }

bash "$HERE/build-test-image.sh" "$CACHE"
ROOTFS=$CACHE/debootstrap/rootfs
[ -f "$CACHE/debootstrap/done" ] || {
	echo "$0: no debootstrap rootfs in $CACHE/debootstrap" >&2
	exit 1
}

exec 9>"$CACHE/.lock-hakim"
flock 9

KEY=$({
	sha256sum <"${BASH_SOURCE[0]}"
	(cd "$FIXTURE" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
	cat "$CACHE/debootstrap/done"
} | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/oci/index.json" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$KEY" ]; then
	log "up to date: $OUT/oci:e2e (stamp $KEY)"
	exit 0
fi

START=$SECONDS
rm -rf "$OUT"
mkdir -p "$OUT/context"
CTX=$OUT/context
cp "$FIXTURE/Dockerfile" "$FIXTURE/hakim-entrypoint.sh" "$CTX/"
tar -C "$ROOTFS" --numeric-owner --xattrs --xattrs-include='*' -cf "$CTX/rootfs.tar" .
# The capability travels as a PAX SCHILY.xattr.security.capability record, which ADD restores.
mkdir -p "$OUT/caps/usr/local/bin"
cp "$ROOTFS/usr/bin/true" "$OUT/caps/usr/local/bin/hakim-netcap"
setcap cap_net_raw,cap_net_bind_service+ep "$OUT/caps/usr/local/bin/hakim-netcap"
tar -C "$OUT/caps" --numeric-owner --xattrs --xattrs-include='security.capability' \
	-cf "$CTX/caps.tar" ./usr/local/bin/hakim-netcap

B=(buildah --root "$OUT/buildah/root" --runroot "$OUT/buildah/run" --storage-driver vfs)
log "buildah bud $FIXTURE/Dockerfile"
"${B[@]}" bud --quiet --isolation chroot --layers=true --pull=never \
	-t localhost/hakim-like:e2e "$CTX" >"$OUT/build.log" 2>&1 || {
	tail -n 30 "$OUT/build.log" >&2
	echo "$0: buildah bud failed (full log: $OUT/build.log)" >&2
	exit 1
}
"${B[@]}" push --quiet --compression-format gzip localhost/hakim-like:e2e "oci:$OUT/oci:e2e" >/dev/null
# Drop buildah's storage (one rootfs copy per layer with vfs) and the context.
rm -rf "$OUT/buildah" "$OUT/context" "$OUT/caps"
printf '%s\n' "$KEY" >"$OUT/stamp"
log "built $OUT/oci:e2e in $((SECONDS - START)) s"
