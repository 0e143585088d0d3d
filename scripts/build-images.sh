#!/usr/bin/env bash
# Build the project's images (each folder is its own build context: the four stages and nfs-server) and
# tag them $IMAGE_REGISTRY/<name>:$IMAGE_TAG (scripts/images.env). Prints each image's size at the end.
#   scripts/build-images.sh [image...]      default: every image in images.env (IMAGES)
#   CONTAINER_ENGINE  docker or podman (default: whichever is installed, podman first)
#   BASE_IMAGE        passed as --build-arg BASE_IMAGE to every image (default: each Dockerfile's pinned
#                     base; all are Debian bookworm, so one stand-in serves them all)
#   BUILD_ARGS        extra build flags, e.g. BUILD_ARGS="--network=host", or "--platform linux/arm64"
#                     (nothing in the Dockerfiles is architecture-specific)
#   IMAGE_REGISTRY, IMAGE_TAG   see scripts/images.env
#   PUSH=1            push each image after building it
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/images.env disable=SC1091
source "$root/scripts/images.env"

me="build-images"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    -*) echo "build-images: unknown option '$arg' (arguments are image names; try --help)" >&2; exit 2 ;;
    *) [[ " ${IMAGES[*]} " == *" $arg "* ]] || { echo "build-images: unknown image '$arg' (images: ${IMAGES[*]})" >&2; exit 2; } ;;
  esac
done

engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v podman >/dev/null 2>&1; then engine=podman
  elif command -v docker >/dev/null 2>&1; then engine=docker
  else die "neither podman nor docker found; install one (Debian: apt-get install podman)"
  fi
fi
command -v "$engine" >/dev/null 2>&1 || die "CONTAINER_ENGINE=$engine not found"

stages=("$@")
if ((${#stages[@]} == 0)); then stages=("${IMAGES[@]}"); fi
for s in "${stages[@]}"; do
  [[ -f "$root/$s/Dockerfile" ]] || die "$s/Dockerfile missing"
done

args=()
if [[ -n "${BASE_IMAGE:-}" ]]; then args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE"); fi
if [[ -n "${BUILD_ARGS:-}" ]]; then
  read -r -a extra <<<"$BUILD_ARGS"
  args+=("${extra[@]}")
fi

for s in "${stages[@]}"; do
  image="$IMAGE_REGISTRY/$s:$IMAGE_TAG"
  echo "build-images: building $image" >&2
  started=$SECONDS
  if ! "$engine" build "${args[@]}" -t "$image" -f "$root/$s/Dockerfile" "$root/$s"; then
    die "building $image failed"
  fi
  echo "build-images: built $image in $((SECONDS - started)) s" >&2
  if [[ "${PUSH:-0}" == 1 ]]; then
    "$engine" push "$image" || die "pushing $image failed"
  fi
done

echo "build-images: image sizes"
for s in "${stages[@]}"; do
  image="$IMAGE_REGISTRY/$s:$IMAGE_TAG"
  size="$("$engine" image inspect --format '{{.Size}}' "$image")"
  printf '  %-40s %6d MB\n' "$image" "$((size / 1000000))"
done
