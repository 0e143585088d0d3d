#!/usr/bin/env bash
# Print Kubernetes manifests with their placeholders filled and image names rewritten; the quickstart
# renders through this same script. Files are separated by "---".
#
#   scripts/render.sh FILE...
#   scripts/render.sh --out DIR [--backend pvc|gce|rwx]
#
# --out DIR writes one backend's manifests into DIR (absent or empty; written whole or not at all), each
# file filled and named in apply order, so that `kubectl apply -f DIR` starts one round on a fresh volume
# (the trainers wait for their shards, the aggregator for the models, the server for the aggregate):
#   pvc [NFS_BACKEND, default]  1-nfs-deployment.yaml (variants/1-nfs-deployment-pvc.yaml), 2-nfs-service.yaml
#                 with NFS_CLUSTER_IP as its clusterIP (pick a free address of the cluster's Service range),
#                 2-nfs-networkpolicy.yaml (when NODE_CIDR is set), 3-nfs-pv-pvc.yaml, then the stages:
#                 4-splitter.yaml, 5-trainer.yaml (5-trainer-indexed.yaml: one Job for every shard),
#                 6-aggregator.yaml, 7-server.yaml, 8-server-pdb.yaml
#   gce           the same with the GCE disk's 1-nfs-deployment.yaml
#   rwx           3-rwx-pvc.yaml (variants/, a claim of STORAGE_CLASS), then the stages
# Later rounds, the accuracy test and the 9999-* tools are the quickstart's (or one file at a time).
#
# Environment (a placeholder a file uses must be set, else this fails naming it):
#   WORKER_NUMBER, EPOCH, BATCH, INCREMENTAL_NUMBER, NFS_CLUSTER_IP, STORAGE_CLASS, NODE_CIDR,
#   GCE_PROJECT, GCE_DISK_ZONE, NAMESPACE  fill {{NAME}} (the list is PLACEHOLDERS in scripts/images.env)
#   INIT_MODEL      if set, trainer args get "--init-model" INIT_MODEL in place of "--save-init /mnt/rounds/r0.h5"
#   LAST_ROUND      if set, trainer args get "--last-round" LAST_ROUND "--ledger" DIR/rounds/ledger.json (DIR: INIT_MODEL's,
#                   else /mnt): one trainer process trains each round up to that one from the round before's aggregate
#   MIN_WORKERS     if set, aggregator args get "--min-workers" MIN_WORKERS (a count >= 1, or a fraction 0 < f < 1
#                   of the workers): average once the round deadline passes with that many models, not every worker's
#   ROUND_DEADLINE  if set, aggregator args get "--deadline" ROUND_DEADLINE (seconds >= 1; its Job's deadline grows past 3600)
#   ROUND           if set, aggregator args get "--round" ROUND (it closes that round only: it can run beside
#                   the round's trainers), the accuracy test's "--wait-round" ROUND (it can start beside them)
#   DATASET         splitter args get "--dataset" DATASET (mnist.npz on the volume), DATASET_WAIT "--wait-data" DATASET_WAIT
#   RUN_ID          if set, splitter and trainer args get "--run-id" RUN_ID (trainers wait for that split)
#   IMAGE_REGISTRY, IMAGE_TAG  (scripts/images.env) localhost/mlk/<image>:0.1.0 -> $IMAGE_REGISTRY/<image>:$IMAGE_TAG,
#                   and docker.io/library/busybox:T -> $IMAGE_REGISTRY/busybox:T (another registry than the default)
#   SPLIT, AGGREGATION, SERVER_OPTIMIZER, SERVER_LR, SERVER_MOMENTUM, PROX_MU, LOCAL_STEPS, ATTACK  the
#                   federated-learning knobs (docs/CONTRACTS.md "Runner knobs"), each only when not at its default,
#                   become the splitter's, aggregator's and trainers' flags (ATTACK: 5-trainer.yaml only)
#   SERVICE_TYPE, SERVER_REPLICAS  if set, the server's Service type (LoadBalancer in 7-server.yaml: NodePort or
#                   ClusterIP) and its Deployment's replicas (2 in 7-server.yaml: a whole number >= 1)
set -euo pipefail

me="render.sh"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/images.env
source "$here/images.env"

DIE_CODE=2
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"
out="" backend="${NFS_BACKEND:-pvc}" files=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --out | --backend)
      (($# > 1)) || die "$1 needs a value (try --help)"
      if [[ "$1" == --out ]]; then out="$2"; else backend="$2"; fi
      shift 2 ;;
    -*) die "unknown option '$1' (arguments are manifest files; try --help)" ;;
    *) files+=("$1"); shift ;;
  esac
done
set -- "${files[@]+"${files[@]}"}"

# render_out DIR BACKEND: the backend's files, rendered by this script, into DIR (see the header)
render_out() {
  local dir="$1" backend="$2" manifests tmp name source
  manifests="$(cd "$here/../manifests" && pwd)"
  local -a plan=()
  case "$backend" in
    pvc | gce)
      [[ -n "${NFS_CLUSTER_IP:-}" ]] || die "--backend $backend needs NFS_CLUSTER_IP: a free address of the cluster's Service range, which becomes the NFS Service's clusterIP (kubectl get service kubernetes -n default shows one address of that range)"
      if [[ "$backend" == pvc ]]; then plan+=("1-nfs-deployment.yaml=variants/1-nfs-deployment-pvc.yaml")
      else plan+=("1-nfs-deployment.yaml=1-nfs-deployment.yaml"); fi
      plan+=("2-nfs-service.yaml=2-nfs-service.yaml")
      if [[ -n "${NODE_CIDR:-}" ]]; then plan+=("2-nfs-networkpolicy.yaml=2-nfs-networkpolicy.yaml")
      else echo "$me: leaving out 2-nfs-networkpolicy.yaml (set NODE_CIDR, the nodes' address range, to include it)" >&2; fi
      plan+=("3-nfs-pv-pvc.yaml=3-nfs-pv-pvc.yaml") ;;
    rwx) plan+=("3-rwx-pvc.yaml=variants/3-rwx-pvc.yaml") ;;
    *) die "--backend must be pvc, gce or rwx, got '$backend'" ;;
  esac
  plan+=("4-splitter.yaml=4-splitter.yaml" "5-trainer.yaml=5-trainer-indexed.yaml" "6-aggregator.yaml=6-aggregator.yaml"
    "7-server.yaml=7-server.yaml" "8-server-pdb.yaml=8-server-pdb.yaml")
  if [[ -e "$dir" ]]; then
    [[ -d "$dir" ]] || die "--out $dir exists and is not a directory"
    [[ -z "$(ls -A "$dir")" ]] || die "--out $dir is not empty: kubectl apply -f $dir would apply what is there too; name a new directory"
  fi
  tmp="$(mktemp -d "${dir%/}.render.XXXXXX")" || die "cannot create a directory beside $dir"
  trap 'rm -rf "$tmp"' EXIT
  for name in "${plan[@]}"; do
    source="$manifests/${name#*=}"
    "$here/render.sh" "$source" >"$tmp/${name%%=*}" || exit 2 # its message is on stderr
  done
  # The Service takes the address the PersistentVolume already names: one apply creates both.
  if [[ -f "$tmp/2-nfs-service.yaml" ]]; then
    check_value NFS_CLUSTER_IP "$NFS_CLUSTER_IP"
    sed -i "s/^spec:\$/spec:\n  clusterIP: $NFS_CLUSTER_IP/" "$tmp/2-nfs-service.yaml"
  fi
  [[ ! -d "$dir" ]] || rmdir "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
  echo "$me: wrote ${#plan[@]} files for backend $backend to $dir; next: kubectl apply -f $dir" >&2
}

names=("${PLACEHOLDERS[@]%%=*}") # images.env: NAME=sample value
if [[ -n "$out" ]]; then
  (($# == 0)) || die "--out renders the backend's own files: give no FILE with it"
fi
(($# > 0)) || [[ -n "$out" ]] || die "usage: scripts/render.sh FILE... (fills $(printf '{{%s}} ' "${names[@]}")from the environment)"

# Values go into sed replacements: allow only characters that cannot break them or the YAML.
check_value() { # check_value NAME VALUE
  [[ "$2" =~ ^[A-Za-z0-9._:/-]+$ ]] || die "$1='$2' has characters other than letters, digits and . _ : / -"
}
sed_literal() { printf '%s' "$1" | sed -e 's/[][\\/.*^$|&]/\\&/g'; }

check_value IMAGE_REGISTRY "$IMAGE_REGISTRY"
check_value IMAGE_TAG "$IMAGE_TAG"
[[ -z "${INIT_MODEL:-}" ]] || check_value INIT_MODEL "$INIT_MODEL"
[[ -z "${DATASET:-}" ]] || check_value DATASET "$DATASET"
if [[ -n "${LAST_ROUND:-}" ]] && ! positive_int "$LAST_ROUND"; then
  die "LAST_ROUND must be a round number >= 1, got '$LAST_ROUND'"
fi
if [[ -n "${DATASET_WAIT:-}" ]] && ! { [[ -n "${DATASET:-}" ]] && positive_int "$DATASET_WAIT"; }; then
  die "DATASET_WAIT must be a whole number of seconds >= 1, with DATASET set, got '$DATASET_WAIT'"
fi
if [[ -n "${RUN_ID:-}" ]] && ! [[ "$RUN_ID" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]]; then
  die "RUN_ID must be 1-64 letters, digits, '.', '_' or '-' (a letter or digit first), got '$RUN_ID'"
fi
if [[ -n "${MIN_WORKERS:-}" ]] && ! [[ "$MIN_WORKERS" =~ ^([1-9][0-9]{0,8}|0?\.0*[1-9][0-9]{0,8})$ ]]; then
  die "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1 (e.g. 0.67), got '$MIN_WORKERS'"
fi
if [[ -n "${ROUND_DEADLINE:-}" ]] && ! positive_int "$ROUND_DEADLINE"; then
  die "ROUND_DEADLINE must be a whole number of seconds >= 1, got '$ROUND_DEADLINE'"
fi
fl_problem="$(fl_knob_problem "${WORKER_NUMBER:-1000000}")"
[[ -z "$fl_problem" ]] || die "$fl_problem"
fl_flags
json_args() { local arg; for arg in "$@"; do printf ', "%s"' "$arg"; done; }
# The aggregator waits up to the longer of --timeout (3600 s) and --deadline; its Job's deadline (that
# wait + 600 s) grows with a longer round deadline.
aggregator_extra="$(json_args "${aggregator_fl[@]}")"
[[ -z "${MIN_WORKERS:-}" ]] || aggregator_extra+=", \"--min-workers\", \"$MIN_WORKERS\""
if [[ -n "${ROUND:-}" ]]; then
  positive_int "$ROUND" || die "ROUND must be a whole number >= 1, got '$ROUND'"
  aggregator_extra+=", \"--round\", \"$ROUND\""
fi
if [[ -n "${ROUND_DEADLINE:-}" ]]; then
  aggregator_extra+=", \"--deadline\", \"$ROUND_DEADLINE\""
  ((ROUND_DEADLINE <= 3600)) || aggregator_deadline=$((ROUND_DEADLINE + 600))
fi
# The accuracy test waiting for round ROUND waits as long as that round's aggregator Job can run, and gets its
# own 900 s on top of that for its Job's deadline.
accuracy_extra=""
if [[ -n "${ROUND:-}" ]]; then
  accuracy_extra=", \"--wait-round\", \"$ROUND\", \"--wait\", \"${aggregator_deadline:-4200}\""
  accuracy_deadline=$((${aggregator_deadline:-4200} + 900))
fi
case "${SERVICE_TYPE:-}" in
  "" | LoadBalancer | NodePort | ClusterIP) ;;
  *) die "SERVICE_TYPE must be LoadBalancer, NodePort or ClusterIP, got '$SERVICE_TYPE'" ;;
esac
if [[ -n "${SERVER_REPLICAS:-}" ]] && ! [[ "$SERVER_REPLICAS" =~ ^[1-9][0-9]{0,2}$ ]]; then
  die "SERVER_REPLICAS must be a whole number >= 1, got '$SERVER_REPLICAS'"
fi

if [[ -n "$out" ]]; then
  render_out "$out" "$backend"
  exit 0
fi

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
  for stage in "${IMAGES[@]}"; do
    expr+=(-e "s|$(sed_literal "$DEFAULT_IMAGE_REGISTRY/$stage:$DEFAULT_IMAGE_TAG")|$(sed_literal "$IMAGE_REGISTRY/$stage:$IMAGE_TAG")|g")
  done
  # A registry of your own (private, air-gapped) serves busybox too, under its own tag: mirror it there.
  if [[ "$IMAGE_REGISTRY" != "$DEFAULT_IMAGE_REGISTRY" ]]; then
    expr+=(-e "s|docker\.io/library/busybox:|$(sed_literal "$IMAGE_REGISTRY")/busybox:|g")
  fi
  if [[ -n "${INIT_MODEL:-}" ]]; then
    # The trainer's args end with round 1's --save-init pair: start from the model instead.
    expr+=(-e "s|\"--save-init\", \"[^\"]*\"\\]|\"--init-model\", \"$(sed_literal "$INIT_MODEL")\"]|")
  fi
  if [[ -n "$aggregator_extra" ]]; then
    # The aggregator's args end with its --expect pair.
    expr+=(-e "s|\\(\"--expect\", \"\\\$(WORKER_NUMBER)\"\\)\\]|\\1$aggregator_extra]|")
    if [[ -n "${aggregator_deadline:-}" ]] && grep -q '^  name: mnist-aggregator$' "$file"; then
      expr+=(-e "s/^\\(  activeDeadlineSeconds: \\)[0-9]*/\\1$aggregator_deadline/")
    fi
  fi
  if [[ -n "$accuracy_extra" ]] && grep -q '^  name: mnist-accuracy-test$' "$file"; then
    # The accuracy test's args end with its --ledger pair.
    expr+=(-e "s|\(\"--ledger\", \"[^\"]*\"\)\]|\1$accuracy_extra]|")
    expr+=(-e "s/^\(  activeDeadlineSeconds: \)[0-9]*/\1$accuracy_deadline/")
  fi
  if [[ -n "${DATASET:-}" ]]; then
    # The splitter's args end with its --savedir pair: read MNIST from the volume instead of downloading.
    expr+=(-e "s|\(\"--savedir\", \"[^\"]*\"\)\]|\1, \"--dataset\", \"$(sed_literal "$DATASET")\"]|")
  fi
  splitter_extra=("${splitter_fl[@]}")
  [[ -z "${RUN_ID:-}" ]] || splitter_extra+=(--run-id "$RUN_ID")
  [[ -z "${DATASET_WAIT:-}" ]] || splitter_extra+=(--wait-data "$DATASET_WAIT")
  if ((${#splitter_extra[@]})); then # the splitter's args hold its --savedir pair
    expr+=(-e "s|\(\"--n_container\", \"[^\"]*\", \"--savedir\", \"[^\"]*\"\)|\1$(json_args "${splitter_extra[@]}")|")
  fi
  trainer_extra=("${trainer_fl[@]}")
  [[ -z "${RUN_ID:-}" ]] || trainer_extra+=(--run-id "$RUN_ID")
  if [[ -n "${LAST_ROUND:-}" ]]; then # the ledger next to the aggregate the rounds start from: /mnt's
    ledger_dir=/mnt
    [[ -z "${INIT_MODEL:-}" ]] || ledger_dir="$(dirname "$INIT_MODEL")"
    trainer_extra+=(--last-round "$LAST_ROUND" --ledger "$ledger_dir/rounds/ledger.json")
  fi
  if [[ -n "$ATTACK" ]] && grep -q '"--savemodel"' "$file"; then
    grep -q '{{INCREMENTAL_NUMBER}}' "$file" ||
      die "$file: ATTACK=$ATTACK needs one trainer Job per worker (5-trainer.yaml with INCREMENTAL_NUMBER)"
    attack="$(fl_attack_of "${INCREMENTAL_NUMBER:-}")"
    [[ -z "$attack" ]] || trainer_extra+=(--attack "$attack")
  fi
  if ((${#trainer_extra[@]})); then # the trainers' args: the extra flags go before --savemodel
    expr+=(-e "s|\"--savemodel\", |$(json_args "${trainer_extra[@]}" | cut -c3-), \"--savemodel\", |")
  fi
  [[ -z "${SERVICE_TYPE:-}" ]] || expr+=(-e "s/^\(  type: \)LoadBalancer\$/\1$SERVICE_TYPE/")
  if [[ -n "${SERVER_REPLICAS:-}" ]] && grep -q '^  name: mnist-server$' "$file"; then
    expr+=(-e "s/^\(  replicas: \)2\$/\1$SERVER_REPLICAS/")
  fi
  ((first)) || printf -- '---\n'
  first=0
  sed "${expr[@]}" "$file"
done
