#!/usr/bin/env bash
# Build the Debian trixie root the user's-session tests boot hakim-init in
# (tests/tests/init_session.rs, crate hakim-e2e).
#
#   ci/build-session-root.sh CACHE_DIR
#
# Produces CACHE_DIR/session-root/rootfs: debootstrap --variant=minbase trixie plus the parts
# of the user's session as the Hakim images ship them: the session bus (dbus-daemon and its
# session.conf; dbus-x11 is there because gnome-keyring and gcr4 depend on a package providing
# dbus-session-bus, and dbus-user-session would want systemd), gnome-keyring (Secret Service), libsecret-tools (secret-tool), gcr4
# (gcr-ssh-agent, the SSH agent of GNOME 47+) and openssh-client (ssh-add). No device nodes
# (LXC and the tests provide /dev), no apt caches or lists.
#
# Idempotent: does nothing when CACHE_DIR/session-root/done holds this script's key (its
# sha256, suite, mirror and package list). Concurrent callers are serialised with flock on
# CACHE_DIR/.lock-session. About 3-4 minutes and ~310 MB the first time.
#
# Needs root. Network: only the Debian mirror from /etc/apt/sources.list.d/debian.sources.
set -euo pipefail

if [ "$#" -ne 1 ]; then
	echo "usage: $0 CACHE_DIR" >&2
	exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "$0: must run as root (debootstrap)" >&2
	exit 1
fi
for tool in debootstrap flock sha256sum; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "$0: required tool missing: $tool" >&2
		exit 1
	}
done

mkdir -p "$1"
CACHE=$(cd "$1" && pwd)
OUT=$CACHE/session-root
log() { printf '[build-session-root] %s\n' "$*" >&2; }

exec 9>"$CACHE/.lock-session"
flock 9

SUITE=trixie
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
[ -n "$MIRROR" ] || {
	echo "$0: no URIs: line in /etc/apt/sources.list.d/debian.sources" >&2
	exit 1
}
PACKAGES=dbus,dbus-daemon,dbus-session-bus-common,dbus-x11,gnome-keyring,libsecret-tools,gcr4,openssh-client
KEY="$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1) $SUITE $MIRROR $PACKAGES"
if [ -f "$OUT/done" ] && [ "$(cat "$OUT/done")" = "$KEY" ]; then
	log "up to date: $OUT/rootfs"
	exit 0
fi

START=$SECONDS
log "debootstrap --variant=minbase $SUITE with $PACKAGES from $MIRROR (about 3-4 min)"
rm -rf "$OUT"
mkdir -p "$OUT"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$OUT/rootfs" "$MIRROR" \
	>"$OUT/log" 2>&1 || {
	tail -n 30 "$OUT/log" >&2
	echo "$0: debootstrap failed (full log: $OUT/log)" >&2
	exit 1
}
ROOTFS=$OUT/rootfs
# What the tests rely on must be there: a package that moved a file fails here, not in a test.
for f in usr/bin/dbus-daemon usr/share/dbus-1/session.conf usr/bin/gnome-keyring-daemon \
	usr/bin/secret-tool usr/libexec/gcr-ssh-agent usr/bin/ssh-add bin/bash; do
	[ -e "$ROOTFS/$f" ] || {
		echo "$0: $f missing from the root" >&2
		exit 1
	}
done
find "$ROOTFS/dev" -mindepth 1 -delete
rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
find "$ROOTFS/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name partial ! -name lock -exec rm -rf {} +
printf '%s\n' "$KEY" >"$OUT/done"
log "done after $((SECONDS - START)) s ($(du -sh "$ROOTFS" | cut -f1))"
