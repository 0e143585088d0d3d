#!/usr/bin/env bash
# Build a stand-in for the Dockerfiles' public base image (python:3.11-slim-bookworm) when that
# image cannot be pulled: Debian bookworm minbase + python3 + python3-venv + ca-certificates, made
# with debootstrap and imported into podman. The Dockerfiles only use `python3 -m venv` + pip (and the
# server's apt-get of nginx-light from bookworm, which the stand-in's own sources serve), so they
# build unchanged on top of it (pass it with --build-arg BASE_IMAGE=...).
# Cached: does nothing when the image already exists (FORCE=1 rebuilds). tests/e2e/e2e-containers.sh
# runs it only where the Dockerfiles' own base can be neither found nor pulled. Needs root and
# debootstrap (installed with apt when missing, as root) for the build; podman always.
#   BASE_IMAGE_NAME  image to create (default localhost/mlk-base:bookworm)
#   DEBIAN_MIRROR    mirror for debootstrap (default http://deb.debian.org/debian)
# The host's CA bundle is copied in (so pip inside a build trusts what the host trusts), and the
# host's PIP_CERT / PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST, when set, become ENV of
# the stand-in so pip in the builds reaches the same index the host does.
set -euo pipefail

me="make-base-image"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
no_arguments "$@"

name="${BASE_IMAGE_NAME:-localhost/mlk-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
engine="${CONTAINER_ENGINE:-podman}"


if [[ "$engine" != podman ]]; then
  die "CONTAINER_ENGINE=$engine: this script imports into podman only"
fi

install() { # install PACKAGE...: as root with apt, else one line saying what is needed
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "make-base-image: installing $*" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    die "needs $*: install them (Debian: apt-get install $*)"
  fi
}

command -v podman >/dev/null 2>&1 || install podman
if [[ "${FORCE:-0}" != 1 ]] && podman image exists "$name"; then
  echo "make-base-image: $name exists (cached; FORCE=1 rebuilds)" >&2
  exit 0
fi
# Only now, with something to build: debootstrap, which needs root.
[[ $(id -u) -eq 0 ]] ||
  die "building the stand-in needs root (debootstrap); run this once as root, or set BASE_IMAGE to a python:3.11 bookworm image you can pull"
command -v debootstrap >/dev/null 2>&1 || install debootstrap

work="$(mktemp -d /var/tmp/mlk-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "make-base-image: debootstrap bookworm into $rootfs (a few minutes)" >&2
started=$SECONDS
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi

# Trust what the host trusts (an intercepting proxy's CA, for one), then slim the tree down.
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

changes=(--change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8'
         --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
# pip vendors its own CA list; point it at the (host's) bundle, as the host's pip is.
changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt')
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
  if [[ -n "${!var:-}" ]]; then changes+=(--change "ENV $var=${!var}"); fi
done

tar -C "$rootfs" -c . | podman import --quiet "${changes[@]}" - "$name" >/dev/null
echo "make-base-image: built $name in $((SECONDS - started)) s" \
     "($(podman image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
