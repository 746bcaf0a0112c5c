#!/usr/bin/env bash
# Builds the local Debian base image that the Dockerfiles use as their runtime stage
# (`nexa/debian-base:bookworm`): debootstrap a minimal bookworm, `docker import` it.
# No container registry is reachable on this project's machines, so nothing is pulled.
# Idempotent: does nothing when the image is already there (NEXA_REBUILD_BASE=1 forces).
set -euo pipefail
TAG="${NEXA_BASE_IMAGE:-nexa/debian-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump when the package list below changes: an older image is rebuilt.
VERSION=2
have="$(docker image inspect -f '{{ index .Config.Labels "nexa.base-version" }}' "$TAG" 2>/dev/null || true)"
if [ -z "${NEXA_REBUILD_BASE:-}" ] && [ "$have" = "$VERSION" ]; then
  echo "base image $TAG (version $VERSION) already present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! command -v debootstrap >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null
fi
ROOT="$(mktemp -d /tmp/nexa-rootfs.XXXXXX)"
trap '$SUDO rm -rf "$ROOT"' EXIT
# minbase + what the runtime and the sandbox tests need: CA roots (TLS to a
# coordinator), python3 with its standard library (pipelines' own scripts), tini (PID 1
# that reaps and forwards signals).
$SUDO debootstrap --variant=minbase --include=ca-certificates,python3,tini \
  bookworm "$ROOT" "$MIRROR" >/tmp/nexa-debootstrap.log 2>&1 || {
  tail -30 /tmp/nexa-debootstrap.log; exit 1; }
$SUDO rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
$SUDO tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' --change "LABEL nexa.base-version=$VERSION" - "$TAG" >/dev/null
echo "built base image $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"
