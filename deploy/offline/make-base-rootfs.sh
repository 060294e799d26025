#!/bin/sh
# Build a minimal Debian bookworm root filesystem with Python 3.11, for sites (and tests) that
# cannot pull images from a registry. Import the tarball as a base image and pass it to the
# Dockerfiles with --build-arg BASE_IMAGE=...:
#
#   sudo deploy/offline/make-base-rootfs.sh /var/cache/silotune-test/base.tar [MIRROR]
#   docker import /var/cache/silotune-test/base.tar silotune-base:bookworm   # or: podman import
#
# Needs root and debootstrap; takes about a minute and ~210 MB. Re-running replaces the tarball.
set -eu
out=${1:?usage: make-base-rootfs.sh OUT.tar [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
work=$(mktemp -d "${TMPDIR:-/tmp}/silotune-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "$mirror"
# Caches and lists are dead weight in an image; the images install nothing with apt offline.
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
       "$work/rootfs/usr/share/doc" "$work/rootfs/usr/share/man"
mkdir -p "$(dirname "$out")"
tar -C "$work/rootfs" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "wrote $out"
