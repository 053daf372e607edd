#!/usr/bin/env bash
# The local base image the store images are built FROM: a `debootstrap --variant=minbase` Debian rootfs, trimmed,
# then `docker import`ed (no registry pulls anywhere). Idempotent: when an image tagged with this script's
# content hash exists, nothing is built.
#
#   images/base/build.sh            -> rma-base:bookworm (and rma-base:bookworm-<hash>)
#
# Environment: DOCKER_HOST (which dockerd), RMA_DEBIAN_MIRROR (default: the mirror this host's apt uses, else
# deb.debian.org), http_proxy (default: the proxy this host's apt uses, if any), RMA_BASE_SUITE (bookworm).
set -euo pipefail

SUITE="${RMA_BASE_SUITE:-bookworm}"
HASH="$( { cat "$0"; echo "$SUITE"; } | sha256sum | cut -c1-12)"
TAG="rma-base:${SUITE}-${HASH}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  docker tag "$TAG" "rma-base:${SUITE}"
  echo "base: $TAG present, not rebuilt"
  exit 0
fi

host_mirror() {
  # the first Debian main archive URI in this host's apt sources (one-line and deb822 formats)
  local uri
  uri="$(grep -hsE '^(deb |URIs:)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -v -- '-security' | grep -oE '(https?|file)://[^ ]+' | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="${RMA_DEBIAN_MIRROR:-$(host_mirror)}"
MIRROR="${MIRROR%/}"
case "$MIRROR" in */debian) SECURITY="${MIRROR%/debian}/debian-security" ;; *) SECURITY="http://deb.debian.org/debian-security" ;; esac
if [ -z "${http_proxy:-}" ]; then
  proxy="$(apt-config dump 2>/dev/null | sed -nE 's/^Acquire::http::Proxy "(.+)";$/\1/p' | head -n1)"
  [ -n "$proxy" ] && export http_proxy="$proxy"
fi

command -v debootstrap >/dev/null || { echo "debootstrap is not installed: apt-get install debootstrap" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "debootstrap needs root: run this as root" >&2; exit 2; }

ROOTFS="$(mktemp -d /var/tmp/rma-base-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "base: debootstrap --variant=minbase $SUITE from $MIRROR${http_proxy:+ via proxy $http_proxy}"
t0=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; echo "debootstrap failed: set RMA_DEBIAN_MIRROR or http_proxy" >&2; exit 1; }
rm -f "$ROOTFS.log"

cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
# lean images: no recommends, no docs/man pages/translations installed by later apt-get runs
cat >"$ROOTFS/etc/apt/apt.conf.d/01-rma-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-rma-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
# no services start during image builds
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/* \
       "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
  -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' \
  -c "LABEL rma.io/content-hash=$HASH" -c "LABEL rma.io/debian-mirror=$MIRROR" \
  - "$TAG" >/dev/null
docker tag "$TAG" "rma-base:${SUITE}"
echo "base: built $TAG in $(( $(date +%s) - t0 )) s"
