#!/usr/bin/env bash
# Build the multi-layer test image used by the end-to-end tests (tests/, crate hakim-e2e).
#
#   ci/build-test-image.sh CACHE_DIR
#
# Produces, from real tools only (debootstrap, buildah, umoci, skopeo):
#   CACHE_DIR/oci/                 OCI image layout, tag "test", gzip layers
#   CACHE_DIR/oci-archive.tar      the same image as an oci-archive (tag "test")
#   CACHE_DIR/docker-archive.tar   the same image as a docker-archive (localhost/hakim-test:latest)
#   CACHE_DIR/layers.txt           one line per layer: what it exercises
#
# Idempotent: does nothing when CACHE_DIR/oci/index.json exists and CACHE_DIR/stamp holds this
# script's sha256. The debootstrap rootfs is cached separately (CACHE_DIR/debootstrap/) so editing
# this script only re-runs the fast part (< 2 min). Concurrent callers are serialised with flock.
#
# Needs root. Network: only the Debian mirror from /etc/apt/sources.list.d/debian.sources.
set -euo pipefail

if [ "$#" -ne 1 ]; then
	echo "usage: $0 CACHE_DIR" >&2
	exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "$0: must run as root (debootstrap, buildah vfs storage, device nodes)" >&2
	exit 1
fi
for tool in debootstrap buildah umoci skopeo python3 tar setcap flock sha256sum; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "$0: required tool missing: $tool" >&2
		exit 1
	}
done

mkdir -p "$1"
CACHE=$(cd "$1" && pwd)
SELF_SHA=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)

exec 9>"$CACHE/.lock"
flock 9

log() { printf '[build-test-image] %s\n' "$*" >&2; }
START=$SECONDS

if [ -f "$CACHE/oci/index.json" ] && [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$SELF_SHA" ]; then
	log "up to date: $CACHE/oci:test (stamp $SELF_SHA)"
	exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. debootstrap (cached on its own, keyed by suite, variant and mirror)
# ---------------------------------------------------------------------------------------------
SUITE=trixie
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
[ -n "$MIRROR" ] || {
	echo "$0: no URIs: line in /etc/apt/sources.list.d/debian.sources" >&2
	exit 1
}
DB_KEY="debootstrap --variant=minbase $SUITE $MIRROR; stripped /dev/* and apt caches"
ROOTFS=$CACHE/debootstrap/rootfs
if [ -f "$CACHE/debootstrap/done" ] && [ "$(cat "$CACHE/debootstrap/done")" = "$DB_KEY" ]; then
	log "reusing debootstrap rootfs $ROOTFS"
else
	log "debootstrap --variant=minbase $SUITE from $MIRROR (about 30-60 s)"
	rm -rf "$CACHE/debootstrap"
	mkdir -p "$CACHE/debootstrap"
	debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap/log" 2>&1 || {
		tail -n 30 "$CACHE/debootstrap/log" >&2
		echo "$0: debootstrap failed (full log: $CACHE/debootstrap/log)" >&2
		exit 1
	}
	# LXC provides /dev; device nodes do not belong in a layer. Drop apt caches and lists.
	find "$ROOTFS/dev" -mindepth 1 -delete
	rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
	find "$ROOTFS/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name partial ! -name lock -exec rm -rf {} +
	printf '%s\n' "$DB_KEY" >"$CACHE/debootstrap/done"
	log "debootstrap done after $((SECONDS - START)) s ($(du -sh "$ROOTFS" | cut -f1))"
fi

# ---------------------------------------------------------------------------------------------
# 2. buildah layers (vfs storage under CACHE_DIR, chroot isolation, no daemon)
# ---------------------------------------------------------------------------------------------
T0=$SECONDS
rm -rf "$CACHE/oci" "$CACHE/oci-archive.tar" "$CACHE/docker-archive.tar" "$CACHE/stamp" \
	"$CACHE/layers.txt" "$CACHE/buildah" "$CACHE/work"
mkdir -p "$CACHE/work"
WORK=$CACHE/work
B=(buildah --root "$CACHE/buildah/root" --runroot "$CACHE/buildah/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
IMG=localhost/hakim-test
STEP=0
CTR=
MNT=

describe() { printf '%2d  %s\n' "$(($(layer_count) + 1))" "$*" >>"$CACHE/layers.txt"; }
layer_count() { if [ -f "$CACHE/layers.txt" ]; then wc -l <"$CACHE/layers.txt"; else echo 0; fi; }

# begin FROM: start a working container from FROM (an image name or "scratch") and mount it.
begin() {
	CTR=$("${B[@]}" from --quiet --pull=never "$1")
	MNT=$("${B[@]}" mount "$CTR")
}
# run CMD...: run a shell command inside the working container.
run() { "${B[@]}" run --isolation chroot "$CTR" -- sh -euc "$1"; }
# commit DESCRIPTION: commit the working container as the next step (exactly one new layer).
commit() {
	"${B[@]}" umount "$CTR" >/dev/null
	STEP=$((STEP + 1))
	"${B[@]}" commit --quiet --rm "$CTR" "$IMG:step$STEP" >/dev/null
	describe "buildah: $1"
	log "layer $STEP committed: $1"
}

# Layer 1: the debootstrap rootfs, plus a few fixture trees that later layers modify.
begin scratch
tar -C "$ROOTFS" --numeric-owner --xattrs --xattrs-include='*' -cf - . |
	tar -C "$MNT" --numeric-owner --xattrs --xattrs-include='*' -xpf -
mkdir -p "$MNT/etc/opaque-test/sub" "$MNT/var/lib/hakim-wh/y" "$MNT/var/lib/hakim-dir2file/d"
echo old1 >"$MNT/etc/opaque-test/old1"
echo old2 >"$MNT/etc/opaque-test/sub/old2"
echo x >"$MNT/var/lib/hakim-wh/x"
echo z >"$MNT/var/lib/hakim-wh/y/z"
echo inner >"$MNT/var/lib/hakim-dir2file/d/inner"
echo was-a-file >"$MNT/var/lib/hakim-dir2file/f"
commit "base: debootstrap --variant=minbase $SUITE (no /dev nodes, no apt caches) + fixture dirs"

# Layer 2: deletions -> whiteouts (whole directory trees and single files), dir<->file swaps.
begin "$IMG:step$STEP"
run 'rm -rf /usr/share/doc /usr/share/info
     rm -f /etc/issue.net /etc/debian_version.bak /usr/share/common-licenses/GPL-2
     rm -rf /var/lib/hakim-dir2file/d && echo now-a-file > /var/lib/hakim-dir2file/d
     rm -f /var/lib/hakim-dir2file/f && mkdir /var/lib/hakim-dir2file/f && echo in > /var/lib/hakim-dir2file/f/in'
commit "rm -rf /usr/share/doc /usr/share/info, rm single files (whiteouts); dir->file and file->dir"

# Layer 3: user coder (uid 1000) in group docker; setuid/setgid/sticky/0000 modes; other owners.
begin "$IMG:step$STEP"
run 'groupadd -r docker
     useradd -m -u 1000 -U -G docker -s /bin/bash coder
     echo "coder ALL=(ALL) NOPASSWD:ALL" > /etc/coder.sudoers-example
     echo hi > /home/coder/hello.txt && chown coder:coder /home/coder/hello.txt
     install -d -m 1777 /srv/sticky
     install -d -m 2775 -o coder -g docker /srv/shared
     install -d -m 0000 /srv/locked
     install -m 4755 /usr/bin/true /srv/setuid-true
     install -m 2755 -g docker /usr/bin/true /srv/setgid-true
     install -m 0600 -o coder -g docker /dev/null /srv/private-empty'
commit "groupadd -r docker; useradd -m -u 1000 coder; setuid/setgid/sticky/0000 modes"

# Layer 4: hardlinks. Same-layer groups, a hardlink to a symlink, and links to lower-layer files
# (dpkg is touched, so it is copied up and the tar carries the link; dpkg-query is not, so the
# naive differ stores the new name as a plain file).
begin "$IMG:step$STEP"
mkdir -p "$MNT/opt/links"
echo hello >"$MNT/opt/links/a"
ln "$MNT/opt/links/a" "$MNT/opt/links/b"
ln "$MNT/opt/links/a" "$MNT/opt/links/c"
ln -s a "$MNT/opt/links/sym"
ln -P "$MNT/opt/links/sym" "$MNT/opt/links/sym-hard"
ln "$MNT/usr/bin/dpkg" "$MNT/opt/links/dpkg-hard"
touch "$MNT/usr/bin/dpkg"
ln "$MNT/usr/bin/dpkg-query" "$MNT/opt/links/dpkg-query-hard"
commit "hardlinks: a=b=c, hardlinked symlink, ln to lower-layer /usr/bin/dpkg and dpkg-query"

# Layer 5: chmod -R / chown -R over existing trees: every file is copied up with new metadata.
begin "$IMG:step$STEP"
run 'chmod -R g+w,o-r /usr/share/perl5 /usr/lib/x86_64-linux-gnu/perl-base
     chown -R coder:docker /usr/share/zoneinfo'
commit "chmod -R g+w,o-r perl trees; chown -R coder:docker /usr/share/zoneinfo (copy-up of many files)"

# Layer 6: xattrs: a security.capability set by setcap, a raw v2 capability blob, user.* xattrs.
begin "$IMG:step$STEP"
mkdir -p "$MNT/usr/local/bin" "$MNT/opt/xattr-dir"
cp "$MNT/usr/bin/true" "$MNT/usr/local/bin/captest"
setcap cap_net_raw+ep "$MNT/usr/local/bin/captest"
cp "$MNT/usr/bin/true" "$MNT/usr/local/bin/captest-raw"
# CAP_DAC_OVERRIDE (1) + CAP_FOWNER (3): the permitted mask's first byte is 0x0a, so the PAX
# record carrying this xattr contains a newline byte inside its (length-prefixed) value.
cp "$MNT/usr/bin/true" "$MNT/usr/local/bin/captest-newline"
setcap cap_dac_override,cap_fowner+ep "$MNT/usr/local/bin/captest-newline"
echo data >"$MNT/opt/xattr-dir/file"
python3 - "$MNT" <<'PY'
import os, struct, sys
root = sys.argv[1]
# struct vfs_cap_data, revision 2, effective flag; permitted = CAP_NET_BIND_SERVICE (10) | CAP_NET_RAW (13)
blob = struct.pack("<IIIII", 0x02000000 | 0x1, (1 << 10) | (1 << 13), 0, 0, 0)
os.setxattr(f"{root}/usr/local/bin/captest-raw", "security.capability", blob)
os.setxattr(f"{root}/usr/local/bin/captest-raw", "user.test", b"raw-cap")
os.setxattr(f"{root}/usr/local/bin/captest", "user.test", b"hello world")
os.setxattr(f"{root}/opt/xattr-dir", "user.test", b"on a directory")
os.setxattr(f"{root}/opt/xattr-dir/file", "user.test", b"")
os.setxattr(f"{root}/opt/xattr-dir/file", "user.other", bytes(range(256)))
PY
commit "xattrs: setcap (cap_net_raw; a mask with a 0x0a byte), raw v2 capability blob, user.* on files and a dir"

# Layer 7: directory replaced (rm -rf + mkdir), special files (char device, fifo), long names.
begin "$IMG:step$STEP"
rm -rf "$MNT/etc/opaque-test"
mkdir -p "$MNT/etc/opaque-test" "$MNT/usr/local/share/hakim-test"
echo new >"$MNT/etc/opaque-test/new"
mknod "$MNT/usr/local/share/hakim-test/null" c 1 3
mknod "$MNT/usr/local/share/hakim-test/loop0" b 7 0
mkfifo "$MNT/usr/local/share/hakim-test/fifo"
LONG=$(printf 'long-name-%.0s' 1 2 3 4 5 6 7 8 9 10 11 12)
mkdir -p "$MNT/usr/local/share/hakim-test/$LONG"
echo long >"$MNT/usr/local/share/hakim-test/$LONG/$LONG.txt"
ln -s "/usr/local/share/hakim-test/$LONG/$LONG.txt" "$MNT/usr/local/share/hakim-test/long-link"
ln -s ../../../nonexistent/dangling "$MNT/usr/local/share/hakim-test/dangling"
ln -s loop-b "$MNT/usr/local/share/hakim-test/loop-a"
ln -s loop-a "$MNT/usr/local/share/hakim-test/loop-b"
commit "rm -rf + mkdir /etc/opaque-test; char/block device, fifo, names > 100 bytes, odd symlinks"

log "buildah layers done after $((SECONDS - T0)) s; pushing to $CACHE/oci:test (gzip)"
"${B[@]}" push --quiet --compression-format gzip "$IMG:step$STEP" "oci:$CACHE/oci:test" >/dev/null

# ---------------------------------------------------------------------------------------------
# 3. umoci layers appended to the layout. umoci 0.4.7's insert ends a layer right after the last
#    entry's data: no end-of-archive footer, not even the padding of the last 512-byte block.
# ---------------------------------------------------------------------------------------------
mkdir -p "$WORK/insert/sub" "$WORK/opaque/sub"
echo inserted >"$WORK/insert/file"
echo deeper >"$WORK/insert/sub/deeper"
ln "$WORK/insert/file" "$WORK/insert/file-hard"
ln -s sub/deeper "$WORK/insert/link"
chmod 0640 "$WORK/insert/file"
echo fresh >"$WORK/opaque/fresh"
echo fresh-sub >"$WORK/opaque/sub/fresh-sub"
chown 1000:1000 "$WORK/opaque/fresh"

umoci insert --image "$CACHE/oci:test" --history.created_by "umoci insert /opt/umoci" "$WORK/insert" /opt/umoci
describe "umoci insert: new tree /opt/umoci (hardlink + symlink); no EOF footer, last data block unpadded"
umoci insert --image "$CACHE/oci:test" --opaque --history.created_by "umoci insert --opaque /etc/opaque-test" \
	"$WORK/opaque" /etc/opaque-test
describe "umoci insert --opaque: /etc/opaque-test replaced (.wh..wh..opq)"
umoci insert --image "$CACHE/oci:test" --whiteout --history.created_by "umoci insert --whiteout /opt/links/c" /opt/links/c
describe "umoci insert --whiteout /opt/links/c (one name of a hardlink group)"
umoci insert --image "$CACHE/oci:test" --whiteout --history.created_by "umoci insert --whiteout /var/lib/hakim-wh" /var/lib/hakim-wh
describe "umoci insert --whiteout /var/lib/hakim-wh (a whole directory)"

# A layer written by Python's tarfile (PAX): a hardlink whose target exists only in a lower
# layer, xattrs carried as SCHILY.xattr.* records (security.capability binary, user.*, and a
# trusted.* one that a Proxmox extraction must not restore), added verbatim by umoci.
python3 - "$WORK/crafted.tar" <<'PY'
import io, struct, sys, tarfile
cap = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 12, 0, 0, 0)  # CAP_NET_ADMIN, effective
def reg(name, data, mode=0o644, uid=0, gid=0, pax=None):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), mode, uid, gid, 1700000000
    if pax:
        ti.pax_headers = pax
    return ti, io.BytesIO(data)
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as t:
    d = tarfile.TarInfo("opt/crafted"); d.type = tarfile.DIRTYPE; d.mode = 0o755; d.mtime = 1700000000
    t.addfile(d)
    h = tarfile.TarInfo("opt/crafted/dash-hard"); h.type = tarfile.LNKTYPE; h.linkname = "usr/bin/dash"
    h.mtime = 1700000000
    t.addfile(h)
    t.addfile(*reg("opt/crafted/capped", b"#!/bin/sh\n", 0o755, pax={
        "SCHILY.xattr.security.capability": cap.decode("latin-1"),
        "SCHILY.xattr.user.crafted": "yes",
        "SCHILY.xattr.trusted.hakim": "dropped-by-proxmox",
    }))
    t.addfile(*reg("opt/crafted/owned", b"owned\n", 0o640, uid=1000, gid=1000))
PY
umoci raw add-layer --image "$CACHE/oci:test" --history.created_by "python tarfile: hardlink to lower layer, xattrs" \
	"$WORK/crafted.tar"
describe "python tarfile via umoci raw add-layer: hardlink to lower-layer /usr/bin/dash, PAX xattrs"
log "umoci layers done"

# ---------------------------------------------------------------------------------------------
# 4. the other transports
# ---------------------------------------------------------------------------------------------
skopeo copy --quiet "oci:$CACHE/oci:test" "oci-archive:$CACHE/oci-archive.tar:test"
skopeo copy --quiet "oci:$CACHE/oci:test" "docker-archive:$CACHE/docker-archive.tar:$IMG:latest"

# Drop the buildah storage (one full rootfs copy per layer with vfs) and scratch files.
rm -rf "$CACHE/buildah" "$WORK"

printf '%s\n' "$SELF_SHA" >"$CACHE/stamp"
log "built in $((SECONDS - T0)) s (total $((SECONDS - START)) s):"
log "  $CACHE/oci:test, $CACHE/oci-archive.tar, $CACHE/docker-archive.tar"
python3 - "$CACHE/oci" <<'PY' >&2
import gzip, json, sys
root = sys.argv[1]
def blob(d):
    return f"{root}/blobs/{d.replace(':', '/')}"
idx = json.load(open(f"{root}/index.json"))
man = json.load(open(blob(idx["manifests"][0]["digest"])))
for i, l in enumerate(man["layers"], 1):
    raw = gzip.open(blob(l["digest"])).read()
    if raw.endswith(bytes(1024)):
        end = "ends with the EOF footer"
    else:
        end = f"NO EOF footer, tar length % 512 = {len(raw) % 512}"
    kind = l["mediaType"].rsplit(".", 1)[-1]
    print(f"[build-test-image]   layer {i:2d} {kind:>4} {l['size']:>9} B ({len(raw):>9} B tar), {end}")
PY
sed 's/^/[build-test-image]   /' "$CACHE/layers.txt" >&2
