#!/usr/bin/env bash
# Print Kubernetes manifests with their placeholders filled and image names rewritten; the quickstart
# renders through this same script. Files are separated by "---".
#
#   scripts/render.sh FILE...
#
# Environment (a placeholder a file uses must be set, else this fails naming it):
#   WORKER_NUMBER, EPOCH, BATCH, INCREMENTAL_NUMBER, NFS_CLUSTER_IP, STORAGE_CLASS  fill {{NAME}}
#                   (the list is PLACEHOLDERS in scripts/images.env)
#   INIT_MODEL      if set, trainer args get "--init-model" INIT_MODEL (rounds after the first)
#   DATASET         if set, splitter args get "--dataset" DATASET (a mnist.npz on the volume; no download)
#   IMAGE_REGISTRY, IMAGE_TAG  (scripts/images.env) localhost/mlk/<stage>:0.1.0 -> $IMAGE_REGISTRY/<stage>:$IMAGE_TAG
#   SERVICE_TYPE    if set, the server's Service type (LoadBalancer in 7-server.yaml): NodePort or ClusterIP
set -euo pipefail

me="render.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/images.env
source "$here/images.env"

DIE_CODE=2
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$arg' (arguments are manifest files; try --help)" ;;
  esac
done

names=("${PLACEHOLDERS[@]%%=*}") # images.env: NAME=sample value
(($# > 0)) || die "usage: scripts/render.sh FILE... (fills $(printf '{{%s}} ' "${names[@]}")from the environment)"

# Values go into sed replacements: allow only characters that cannot break them or the YAML.
check_value() { # check_value NAME VALUE
  [[ "$2" =~ ^[A-Za-z0-9._:/-]+$ ]] || die "$1='$2' has characters other than letters, digits and . _ : / -"
}
sed_literal() { printf '%s' "$1" | sed -e 's/[][\\/.*^$|&]/\\&/g'; }

check_value IMAGE_REGISTRY "$IMAGE_REGISTRY"
check_value IMAGE_TAG "$IMAGE_TAG"
[[ -z "${INIT_MODEL:-}" ]] || check_value INIT_MODEL "$INIT_MODEL"
[[ -z "${DATASET:-}" ]] || check_value DATASET "$DATASET"
case "${SERVICE_TYPE:-}" in
  "" | LoadBalancer | NodePort | ClusterIP) ;;
  *) die "SERVICE_TYPE must be LoadBalancer, NodePort or ClusterIP, got '$SERVICE_TYPE'" ;;
esac

first=1
for file in "$@"; do
  [[ -f "$file" ]] || die "no such file: $file"
  expr=()
  for name in "${names[@]}"; do
    grep -q "{{$name}}" "$file" || continue
    [[ -n "${!name:-}" ]] || die "$file needs $name (set it in the environment)"
    check_value "$name" "${!name}"
    expr+=(-e "s/{{$name}}/$(sed_literal "${!name}")/g")
  done
  for stage in "${STAGES[@]}"; do
    expr+=(-e "s|$(sed_literal "$DEFAULT_IMAGE_REGISTRY/$stage:$DEFAULT_IMAGE_TAG")|$(sed_literal "$IMAGE_REGISTRY/$stage:$IMAGE_TAG")|g")
  done
  if [[ -n "${INIT_MODEL:-}" ]]; then
    # The trainer's args end with its --savemodel pair: append the model to start from.
    expr+=(-e "s|\\(\"--savemodel\", \"[^\"]*\"\\)\\]|\\1, \"--init-model\", \"$(sed_literal "$INIT_MODEL")\"]|")
  fi
  if [[ -n "${DATASET:-}" ]]; then
    # The splitter's args end with its --savedir pair: read MNIST from the volume instead of downloading.
    expr+=(-e "s|\(\"--savedir\", \"[^\"]*\"\)\]|\1, \"--dataset\", \"$(sed_literal "$DATASET")\"]|")
  fi
  [[ -z "${SERVICE_TYPE:-}" ]] || expr+=(-e "s/^\(  type: \)LoadBalancer\$/\1$SERVICE_TYPE/")
  ((first)) || printf -- '---\n'
  first=0
  sed "${expr[@]}" "$file"
done
