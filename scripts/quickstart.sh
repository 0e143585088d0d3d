#!/usr/bin/env bash
# The original's whole quickstart against the current kubectl context: NFS server and volume,
# splitter, WORKER_NUMBER trainers per round, FedAvg aggregator, accuracy test, prediction server.
# Every stage is waited for; a failed or timed-out stage prints its pods' logs and stops the run
# with a non-zero exit naming it. Re-running is safe: each Job is deleted before it is re-applied.
#
# Environment (defaults in brackets):
#   WORKER_NUMBER [3]  trainers (= shards)       EPOCH [2]   epochs per trainer per round
#   BATCH [100]        batch size                ROUNDS [3]  rounds; round r>1 starts from the aggregate
#   NFS_BACKEND [gce]  gce: NFS on the GCE disk ml-kube-disk (manifests/1-nfs-deployment.yaml);
#                      pvc: NFS on a PVC of the default StorageClass (manifests/variants/, kind, minikube)
#   SERVE [1]          1: deploy the server and wait for its external IP; 0: stop after the accuracy test
#   KUBECTL [kubectl]  the kubectl command, words allowed (e.g. "kubectl --context kind-mlk")
#   IMAGE_REGISTRY, IMAGE_TAG  image names (scripts/images.env), applied by scripts/render.sh
#   NFS_TIMEOUT [300] JOB_TIMEOUT [3600] SERVER_TIMEOUT [600] EXTERNAL_IP_TIMEOUT [600]  seconds
#   POLL [5]           seconds between status checks
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="quickstart"

say() { printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$me" "$*"; }
fail() { # fail STAGE MESSAGE...: one line naming the stage, exit 1
  local stage="$1"
  shift
  printf '%s %s: stage %s failed: %s\n' "$(date -u +%H:%M:%S)" "$me" "$stage" "$*" >&2
  exit 1
}

# --- configuration ----------------------------------------------------------------------------
WORKER_NUMBER="${WORKER_NUMBER:-3}"
EPOCH="${EPOCH:-2}"
BATCH="${BATCH:-100}"
ROUNDS="${ROUNDS:-3}"
NFS_BACKEND="${NFS_BACKEND:-gce}"
SERVE="${SERVE:-1}"
NFS_TIMEOUT="${NFS_TIMEOUT:-300}"
JOB_TIMEOUT="${JOB_TIMEOUT:-3600}"
SERVER_TIMEOUT="${SERVER_TIMEOUT:-600}"
EXTERNAL_IP_TIMEOUT="${EXTERNAL_IP_TIMEOUT:-600}"
POLL="${POLL:-5}"
read -ra kubectl_cmd <<<"${KUBECTL:-kubectl}"
((${#kubectl_cmd[@]})) || fail config "KUBECTL must not be empty"

for name in WORKER_NUMBER EPOCH BATCH ROUNDS NFS_TIMEOUT JOB_TIMEOUT SERVER_TIMEOUT EXTERNAL_IP_TIMEOUT; do
  [[ "${!name}" =~ ^[1-9][0-9]{0,8}$ ]] || fail config "$name must be a positive integer, got '${!name}'"
done
[[ "$POLL" =~ ^[0-9]{1,4}$ ]] || fail config "POLL must be a number of seconds, got '$POLL'"
[[ "$SERVE" == 0 || "$SERVE" == 1 ]] || fail config "SERVE must be 0 or 1, got '$SERVE'"
case "$NFS_BACKEND" in
  gce) nfs_manifest="$root/manifests/1-nfs-deployment.yaml" ;;
  pvc) nfs_manifest="$root/manifests/variants/1-nfs-deployment-pvc.yaml" ;;
  *) fail config "NFS_BACKEND must be gce or pvc, got '$NFS_BACKEND'" ;;
esac
command -v "${kubectl_cmd[0]}" >/dev/null 2>&1 || fail config "'${kubectl_cmd[0]}' not found (install kubectl or set KUBECTL)"
export WORKER_NUMBER EPOCH BATCH

k() { "${kubectl_cmd[@]}" "$@"; }

# apply STAGE FILE: render FILE (scripts/render.sh, environment as exported) and apply it
apply() {
  local stage="$1" file="$2" rendered
  rendered="$("$root/scripts/render.sh" "$file")" || fail "$stage" "cannot render $file"
  k apply -f - <<<"$rendered" || fail "$stage" "kubectl apply of $file was refused"
}

# show_pods SELECTOR: the pods and their recent logs, for a failure report
show_pods() {
  {
    echo "---- pods ($1) ----"
    k get pods -l "$1" -o wide || true
    echo "---- logs ($1) ----"
    k logs -l "$1" --all-containers=true --prefix=true --tail=200 || true
    echo "----"
  } >&2
}

# delete_job NAME: remove a Job from an earlier run (and its pods) so it can be re-applied
delete_job() { k delete job "$1" --ignore-not-found=true --cascade=foreground --wait=true >/dev/null; }

# wait_job STAGE NAME: until the Job completes; on failure or timeout show its pods and fail
wait_job() {
  local stage="$1" job="$2" state deadline=$((SECONDS + JOB_TIMEOUT))
  while :; do
    state="$(k get job "$job" -o 'jsonpath={.status.conditions[?(@.status=="True")].type}')" || state=""
    case " $state " in
      *" Failed "*) show_pods "job-name=$job"; fail "$stage" "job $job failed (logs above)" ;;
      *" Complete "*) return 0 ;;
    esac
    if ((SECONDS >= deadline)); then
      show_pods "job-name=$job"
      fail "$stage" "job $job did not complete within ${JOB_TIMEOUT}s (logs above)"
    fi
    sleep "$POLL"
  done
}

run_job() { # run_job STAGE NAME FILE: fresh Job from FILE, waited for
  delete_job "$2"
  apply "$1" "$3"
  wait_job "$1" "$2"
}

say "context $(k config current-context 2>/dev/null || echo '?'): WORKER_NUMBER=$WORKER_NUMBER EPOCH=$EPOCH BATCH=$BATCH ROUNDS=$ROUNDS NFS_BACKEND=$NFS_BACKEND"

# --- 1-3: NFS server, its service, the volume ---------------------------------------------------
say "== nfs: NFS server ($NFS_BACKEND) and its service"
apply nfs "$nfs_manifest"
apply nfs "$root/manifests/2-nfs-service.yaml"
if ! k rollout status deployment/nfs-server --timeout="${NFS_TIMEOUT}s"; then
  show_pods "role=nfs-server"
  fail nfs "the NFS server did not become ready within ${NFS_TIMEOUT}s (logs above)"
fi
NFS_CLUSTER_IP="$(k get service nfs-server -o 'jsonpath={.spec.clusterIP}')" || NFS_CLUSTER_IP=""
[[ -n "$NFS_CLUSTER_IP" ]] || fail nfs "service nfs-server has no ClusterIP"
export NFS_CLUSTER_IP
say "nfs: server ready at $NFS_CLUSTER_IP"
apply volume "$root/manifests/3-nfs-pv-pvc.yaml"

# --- 4: split ---------------------------------------------------------------------------------
say "== splitter: $WORKER_NUMBER shards"
run_job splitter mnist-splitter "$root/manifests/4-splitter.yaml"
say "splitter: done"

# --- 5-6: rounds of trainers and aggregation ------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round > 1)); then export INIT_MODEL=/mnt/aggregated-model.h5; else unset INIT_MODEL; fi
  say "== round $round/$ROUNDS: $WORKER_NUMBER trainers"
  for ((i = 0; i < WORKER_NUMBER; i++)); do
    delete_job "mnist-trainer-$i"
    INCREMENTAL_NUMBER="$i" apply "trainer $i (round $round)" "$root/manifests/5-trainer.yaml"
  done
  for ((i = 0; i < WORKER_NUMBER; i++)); do
    wait_job "trainer $i (round $round)" "mnist-trainer-$i"
    say "round $round: trainer $i done"
  done
  say "== round $round/$ROUNDS: aggregator"
  run_job "aggregator (round $round)" mnist-aggregator "$root/manifests/6-aggregator.yaml"
  say "round $round: aggregated model written"
done
unset INIT_MODEL

# --- accuracy test ----------------------------------------------------------------------------
say "== accuracy test"
run_job accuracy-test mnist-accuracy-test "$root/manifests/9999-accuracy-test.yaml"
result="$(k logs job/mnist-accuracy-test --tail=1)" || fail accuracy-test "cannot read its log"
say "accuracy test: $result"

if [[ "$SERVE" == 0 ]]; then
  say "done (SERVE=0: no server)"
  exit 0
fi

# --- 7: server --------------------------------------------------------------------------------
say "== server"
existed="$(k get deployment mnist-server --ignore-not-found=true -o name)" || existed=""
apply server "$root/manifests/7-server.yaml"
if [[ -n "$existed" ]]; then # a running server keeps the model it loaded: restart it on the new one
  k rollout restart deployment/mnist-server >/dev/null || fail server "cannot restart deployment/mnist-server"
fi
if ! k rollout status deployment/mnist-server --timeout="${SERVER_TIMEOUT}s"; then
  show_pods "app=mnist-server"
  fail server "the server did not become ready within ${SERVER_TIMEOUT}s (logs above)"
fi
say "server: ready; waiting for the external IP of service mnist-server-svc"
deadline=$((SECONDS + EXTERNAL_IP_TIMEOUT))
address=""
while :; do
  address="$(k get service mnist-server-svc -o 'jsonpath={.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')" || address=""
  [[ -z "$address" ]] || break
  if ((SECONDS >= deadline)); then
    fail server "service mnist-server-svc got no external IP within ${EXTERNAL_IP_TIMEOUT}s (no LoadBalancer on" \
      "this cluster? kind: cloud-provider-kind, minikube: minikube tunnel; or kubectl port-forward service/mnist-server-svc 8080:80)"
  fi
  sleep "$POLL"
done
say "server: http://$address/"
