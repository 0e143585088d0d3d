#!/usr/bin/env bash
# The whole pipeline on the cluster of the current kubectl context: shared volume, splitter,
# WORKER_NUMBER trainers per round, FedAvg aggregator, accuracy test, prediction server.
# Every stage is waited for under one deadline, and the run stops at once (non-zero exit, the stage
# named, the reason from the pods' status and events, their logs) on a state no wait can fix: an image
# that cannot be pulled, a pod that cannot be scheduled or mount its volume, a refused pod, a claim
# that does not bind, a failed Job. Re-running is safe: each Job is replaced.
#   scripts/quickstart.sh [-h|--help]
# Environment (defaults in brackets):
#   WORKER_NUMBER [3]  trainers (= shards)       EPOCH [2]   epochs per trainer per round
#   BATCH [100]        batch size                ROUNDS [2]  rounds; round r>1 starts from the aggregate
#   MIN_WORKERS [WORKER_NUMBER]  fewest models a round may average (a count, or a fraction of WORKER_NUMBER,
#                      rounded up). The aggregator always runs beside the trainers; with fewer than all it
#                      averages once all are in or ROUND_DEADLINE has passed with MIN_WORKERS, and a failed
#                      trainer Job is reported, not fatal, while enough can still finish
#   ROUND_DEADLINE [3600]  seconds the aggregator waits for a round's models
#   SPLIT AGGREGATION SERVER_OPTIMIZER SERVER_LR SERVER_MOMENTUM PROX_MU LOCAL_STEPS ATTACK PRESET: as local-quickstart.sh's
#   RESUME [0]         1: continue from the last complete round of the volume's round ledger, checked
#                      against every recorded sha256 first (manifests/9999-ledger-restore.yaml)
#   NFS_BACKEND [pvc]  where the shared volume lives (docs/kubernetes.md, "Storage backends"):
#                      pvc: the project's NFS server (NFS-Ganesha, not privileged) on a default-class PVC;
#                      gce: it on the GCE disk ml-kube-disk by GKE's PD CSI: needs GCE_PROJECT, GCE_DISK_ZONE;
#                      rwx: no NFS server: a ReadWriteMany claim of STORAGE_CLASS (GKE Filestore
#                           standard-rwx, Azure Files, EFS, ...): no privileged pod, runs on GKE
#                           Autopilot and under the restricted Pod Security level
#   STORAGE_CLASS []   the ReadWriteMany StorageClass for NFS_BACKEND=rwx
#   NODE_CIDR [nodes' IP span, else any]  who besides our pods may reach the NFS server (set it if autoscaled)
#   MNIST_NPZ []       a local mnist.npz (Keras layout) to put on the volume for the splitter, through a
#                      short-lived pod applied with it (manifests/9999-dataset-upload.yaml): for clusters without
#                      internet access. Unset: the splitter downloads MNIST (checksum-verified)
#   SERVE [1]          1: deploy the server (SERVER_REPLICAS [2] pods, a PodDisruptionBudget) and say how to reach it
#   SERVICE_TYPE [LoadBalancer]  the server's Service: LoadBalancer, NodePort or ClusterIP. Without
#                      an external IP (kind, minikube, this project's local cluster) the run still
#                      succeeds and prints the kubectl port-forward command
#   KUBECTL [kubectl]  the kubectl command, words allowed (e.g. "kubectl --context kind-mlk -n mlk")
#   IMAGE_REGISTRY, IMAGE_TAG  image names (scripts/images.env), applied by scripts/render.sh
#   Seconds: JOB_TIMEOUT [3600] per Job stage (a round's trainers share it), NFS_TIMEOUT [300], SERVER_TIMEOUT [600], PVC_TIMEOUT
#   [120] for a claim to bind, UNSCHEDULABLE_TIMEOUT [90] (longer while an autoscaler adds a node), PULL_GRACE [60] an image pull
#   may fail, MOUNT_GRACE [120] mounts or pod creation may keep failing (Kubernetes retries both), EXTERNAL_IP_TIMEOUT [600], LB_DETECT_TIMEOUT [60], POLL [5]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="quickstart"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
load_preset "$root/scripts/presets" # PRESET=NAME: its knobs, where the environment sets none

fail() { # fail STAGE MESSAGE...: one line naming the stage, exit 1
  local stage="$1"
  shift
  printf '%s %s: stage %s failed: %s\n' "$(date -u +%H:%M:%S)" "$me" "$stage" "$*" >&2
  # Jobs applied ahead of their input (round 1's trainers with the splitter, the accuracy test with the last
  # round) would wait for what is not coming
  ((${#waiting_jobs[@]} == 0)) || k delete job "${waiting_jobs[@]}" --ignore-not-found=true --wait=false >/dev/null 2>&1 || true
  exit 1
}
waiting_jobs=()
unset RUN_ID # the quickstart names each run's split itself (split_data): one in the environment is not this run's

# --- configuration ----------------------------------------------------------------------------
WORKER_NUMBER="${WORKER_NUMBER:-3}"
EPOCH="${EPOCH:-2}"
BATCH="${BATCH:-100}"
ROUNDS="${ROUNDS:-2}"
MIN_WORKERS="${MIN_WORKERS:-$WORKER_NUMBER}"
ROUND_DEADLINE="${ROUND_DEADLINE:-3600}"
RESUME="${RESUME:-0}"
NFS_BACKEND="${NFS_BACKEND:-pvc}"
STORAGE_CLASS="${STORAGE_CLASS:-}"
GCE_PROJECT="${GCE_PROJECT:-}"
GCE_DISK_ZONE="${GCE_DISK_ZONE:-}"
NODE_CIDR="${NODE_CIDR:-}"
MNIST_NPZ="${MNIST_NPZ:-}"
SERVE="${SERVE:-1}"
SERVICE_TYPE="${SERVICE_TYPE:-LoadBalancer}"
NFS_TIMEOUT="${NFS_TIMEOUT:-300}"
JOB_TIMEOUT="${JOB_TIMEOUT:-3600}"
SERVER_TIMEOUT="${SERVER_TIMEOUT:-600}"
PVC_TIMEOUT="${PVC_TIMEOUT:-120}"
UNSCHEDULABLE_TIMEOUT="${UNSCHEDULABLE_TIMEOUT:-90}"
PULL_GRACE="${PULL_GRACE:-60}"
MOUNT_GRACE="${MOUNT_GRACE:-120}"
EXTERNAL_IP_TIMEOUT="${EXTERNAL_IP_TIMEOUT:-600}"
LB_DETECT_TIMEOUT="${LB_DETECT_TIMEOUT:-60}"
POLL="${POLL:-5}"

# check_settings: every setting checked before anything is created; sets kubectl_cmd, min_workers,
# nfs_manifest and run_started, and exports what scripts/render.sh reads
check_settings() {
  local name
  read -ra kubectl_cmd <<<"${KUBECTL:-kubectl}"
  ((${#kubectl_cmd[@]})) || fail config "KUBECTL must not be empty"
  for name in WORKER_NUMBER EPOCH BATCH ROUNDS ROUND_DEADLINE NFS_TIMEOUT JOB_TIMEOUT SERVER_TIMEOUT PVC_TIMEOUT \
    UNSCHEDULABLE_TIMEOUT EXTERNAL_IP_TIMEOUT LB_DETECT_TIMEOUT; do
    positive_int "${!name}" || fail config "$name must be a positive integer, got '${!name}'"
  done
  for name in PULL_GRACE MOUNT_GRACE; do
    [[ "${!name}" =~ ^[0-9]{1,6}$ ]] || fail config "$name must be a whole number of seconds, got '${!name}'"
  done
  # Events older than this run (they live an hour; a ReplicaSet or a claim keeps its UID across re-runs)
  # say nothing about it.
  run_started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  min_workers="$(min_workers_count "$MIN_WORKERS" "$WORKER_NUMBER")" ||
    fail config "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1 (e.g. 0.67), got '$MIN_WORKERS'"
  ((min_workers <= WORKER_NUMBER)) || fail config "MIN_WORKERS=$MIN_WORKERS is more than WORKER_NUMBER=$WORKER_NUMBER"
  [[ "$RESUME" == 0 || "$RESUME" == 1 ]] || fail config "RESUME must be 0 or 1, got '$RESUME'"
  [[ "$POLL" =~ ^[0-9]{1,4}$ ]] || fail config "POLL must be a number of seconds, got '$POLL'"
  [[ "$SERVE" == 0 || "$SERVE" == 1 ]] || fail config "SERVE must be 0 or 1, got '$SERVE'"
  [[ -z "${SERVER_REPLICAS:-}" || "$SERVER_REPLICAS" =~ ^[1-9][0-9]{0,2}$ ]] ||
    fail config "SERVER_REPLICAS must be a whole number >= 1, got '$SERVER_REPLICAS'"
  case "$SERVICE_TYPE" in
    LoadBalancer | NodePort | ClusterIP) ;;
    *) fail config "SERVICE_TYPE must be LoadBalancer, NodePort or ClusterIP, got '$SERVICE_TYPE'" ;;
  esac
  case "$NFS_BACKEND" in
    pvc) nfs_manifest="$root/manifests/variants/1-nfs-deployment-pvc.yaml" ;;
    gce)
      nfs_manifest="$root/manifests/1-nfs-deployment.yaml"
      [[ -n "$GCE_PROJECT" && -n "$GCE_DISK_ZONE" ]] ||
        fail config "NFS_BACKEND=gce needs GCE_PROJECT and GCE_DISK_ZONE, the project and zone of the disk ml-kube-disk (gcloud compute disks list)"
      ;;
    rwx)
      [[ -n "$STORAGE_CLASS" ]] || fail config "NFS_BACKEND=rwx needs STORAGE_CLASS, a ReadWriteMany StorageClass (kubectl get storageclass; GKE: standard-rwx)"
      ;;
    *) fail config "NFS_BACKEND must be pvc, gce or rwx, got '$NFS_BACKEND'" ;;
  esac
  [[ -z "$MNIST_NPZ" || (-f "$MNIST_NPZ" && -r "$MNIST_NPZ") ]] || fail config "MNIST_NPZ=$MNIST_NPZ is not a readable file"
  command -v "${kubectl_cmd[0]}" >/dev/null 2>&1 || fail config "'${kubectl_cmd[0]}' not found (install kubectl or set KUBECTL)"
  export WORKER_NUMBER EPOCH BATCH STORAGE_CLASS SERVICE_TYPE ROUND_DEADLINE GCE_PROJECT GCE_DISK_ZONE
  export MIN_WORKERS="$min_workers" # render.sh: the aggregator's --min-workers and --deadline
  unset LAST_ROUND # choose_trainers sets it
  local problem
  problem="$(fl_knob_problem "$WORKER_NUMBER")"
  [[ -z "$problem" ]] || fail config "$problem"
  fl_knob_defaults
  export SPLIT AGGREGATION SERVER_OPTIMIZER SERVER_LR SERVER_MOMENTUM PROX_MU LOCAL_STEPS ATTACK # render.sh's
}

k() { "${kubectl_cmd[@]}" "$@"; }

# covering_cidr IP...: the smallest IPv4 CIDR that holds every IP (fails on none or a non-IPv4 one)
covering_cidr() {
  local ip n lo=-1 hi=-1 bits=32
  (($#)) || return 1
  for ip in "$@"; do
    [[ "$ip" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
    n="$(ip2int "$ip")"
    ((lo < 0 || n < lo)) && lo=$n
    ((hi < 0 || n > hi)) && hi=$n
  done
  while ((bits > 0 && (lo >> (32 - bits)) != (hi >> (32 - bits)))); do bits=$((bits - 1)); done
  n=$(((lo >> (32 - bits)) << (32 - bits) & 0xffffffff))
  ((bits > 0)) || n=0
  echo "$(int2ip "$n")/$bits"
}

# apply STAGE FILE [FILTER]: render FILE (scripts/render.sh, environment as exported) and apply it;
# FILTER (a command reading the rendered text) picks what of it is applied
apply() {
  local stage="$1" file="$2" rendered
  rendered="$("$root/scripts/render.sh" "$file")" || fail "$stage" "cannot render $file"
  if (($# > 2)); then rendered="$("${@:3}" <<<"$rendered")"; fi
  apply_rendered "$stage" "${file#"$root"/}" "$rendered"
}

# apply_rendered STAGE WHAT YAML: one kubectl apply of YAML (what WHAT rendered)
apply_rendered() {
  local out
  if ! out="$(k apply -f - <<<"$3" 2>&1)"; then
    printf '%s\n' "$out" >&2
    fail "$1" "kubectl apply of $2 was refused: $(grep -m1 -iE 'error|forbidden|denied|invalid' <<<"$out" || tail -n 1 <<<"$out")"
  fi
}

# --- watching a stage -------------------------------------------------------------------------
# One line per object of the stage (jobs, replica sets, pods, claims):
#   obj KIND NAME UID PHASE                         every object
#   sched POD REASON MESSAGE                        a pod the scheduler could not place
#   wait POD CONTAINER REASON MESSAGE               a container waiting (image pull, config, crash loop)
#   term POD CONTAINER EXITCODE REASON MESSAGE      a container that ended
#   claim POD CLAIM                                 a claim a Pending pod mounts
# shellcheck disable=SC2016  # a Go template: its $p is not the shell's
objects_template='{{range .items}}{{$p := .metadata.name}}obj	{{.kind}}	{{$p}}	{{.metadata.uid}}	{{with .status}}{{with .phase}}{{.}}{{end}}{{end}}
{{if eq .kind "Pod"}}{{if eq .status.phase "Pending"}}{{range .spec.volumes}}{{if .persistentVolumeClaim}}claim	{{$p}}	{{.persistentVolumeClaim.claimName}}
{{end}}{{end}}{{end}}{{range .status.conditions}}{{if and (eq .type "PodScheduled") (eq .status "False")}}sched	{{$p}}	{{.reason}}	{{.message}}
{{end}}{{end}}{{range .status.initContainerStatuses}}{{if .state.waiting}}wait	{{$p}}	{{.name}}	{{.state.waiting.reason}}	{{.state.waiting.message}}
{{end}}{{if .state.terminated}}term	{{$p}}	{{.name}}	{{.state.terminated.exitCode}}	{{.state.terminated.reason}}	{{.state.terminated.message}}
{{end}}{{end}}{{range .status.containerStatuses}}{{if .state.waiting}}wait	{{$p}}	{{.name}}	{{.state.waiting.reason}}	{{.state.waiting.message}}
{{end}}{{if .state.terminated}}term	{{$p}}	{{.name}}	{{.state.terminated.exitCode}}	{{.state.terminated.reason}}	{{.state.terminated.message}}
{{end}}{{end}}{{end}}{{end}}'
# Warning events: UID REASON LAST-SEEN MESSAGE
events_template='{{range .items}}{{.involvedObject.uid}}	{{.reason}}	{{or .lastTimestamp .eventTime .firstTimestamp}}	{{.message}}
{{end}}'

stage_objects() { # stage_objects SELECTOR
  k get jobs,replicasets,pods,persistentvolumeclaims -l "$1" -o "go-template=$objects_template" 2>/dev/null |
    sed 's/<no value>//g' || true
}
warning_events() { k get events --field-selector type=Warning -o "go-template=$events_template" 2>/dev/null || true; }

declare -A unschedulable_since=() failing_since=()
reset_graces() { unschedulable_since=() failing_since=(); }

# still_failing KEY GRACE: true once KEY (a stage's object and reason) has been seen failing for GRACE
# seconds; check_stage forgets the keys it no longer sees, so a state that clears starts again at 0
still_failing() {
  : "${failing_since[$1]:=$SECONDS}"
  seen_now[$1]=1
  ((SECONDS - failing_since[$1] >= $2))
}
# report STAGE SELECTOR MESSAGE: print what the stage's pods say (status, events, logs), then fail
report() {
  local stage="$1" selector="$2" message="$3"
  {
    echo "---- pods ($selector) ----"
    k get pods -l "$selector" -o wide 2>&1 || true
    echo "---- events ----"
    local uids
    uids="$(stage_objects "$selector" | awk -F'\t' '$1 == "obj" {print $4}')"
    k get events -o "go-template={{range .items}}{{.involvedObject.uid}}	{{.involvedObject.kind}}/{{.involvedObject.name}}	{{.type}}	{{.reason}}	{{.message}}
{{end}}" 2>/dev/null | awk -F'\t' -v uids="$uids" 'BEGIN {n = split(uids, u, "\n"); for (i = 1; i <= n; i++) want[u[i]] = 1}
      ($1 in want) {print $2 ": " $3 " " $4 ": " $5}' || true
    echo "---- logs ($selector) ----"
    k logs -l "$selector" --all-containers=true --prefix=true --tail=200 2>&1 || true
    echo "----"
  } >&2
  fail "$stage" "$message"
}

# check_stage STAGE SELECTOR: fail on a state that waiting cannot fix: at once on those that last
# (an invalid image name, a crash loop, a refused pod); on those Kubernetes retries (an image pull, a
# mount, a pod's creation) once the same one has lasted its grace (PULL_GRACE, MOUNT_GRACE), counting only
# events of this run
check_stage() {
  local stage="$1" selector="$2" lines events kind a b c d uids=" " pod key pending=" " recent claim info
  local -A seen_now=() claims=() unbound=()
  lines="$(stage_objects "$selector")"
  while IFS=$'\t' read -r kind a b c d; do
    case "$kind" in
      obj)
        uids+="$c "
        [[ "$a" != Pod || "$d" != Pending ]] || pending+="$c "
        ;;
      claim) claims[$b]=1 ;;
      wait)
        case "$c" in
          InvalidImageName | CrashLoopBackOff)
            report "$stage" "$selector" "pod $a: container $b: $c${d:+: $d}" ;;
          ErrImagePull | ImagePullBackOff | CreateContainerConfigError)
            key="$selector|$a/$b/${c/ErrImagePull/ImagePullBackOff}" # the two alternate while a pull is retried
            if still_failing "$key" "$PULL_GRACE"; then
              report "$stage" "$selector" "pod $a: container $b: $c${d:+: $d} (for ${PULL_GRACE}s, PULL_GRACE)"
            fi
            ;;
        esac
        ;;
      sched)
        if [[ "$b" == Unschedulable ]]; then
          : "${unschedulable_since[$a]:=$SECONDS}"
          if ((SECONDS - unschedulable_since[$a] >= UNSCHEDULABLE_TIMEOUT)); then
            report "$stage" "$selector" "pod $a: Unschedulable for ${UNSCHEDULABLE_TIMEOUT}s: $c"
          fi
        fi
        ;;
    esac
  done <<<"$lines"
  # Claims a Pending pod waits on that are not bound yet (WaitForFirstConsumer: provisioned only now)
  for claim in "${!claims[@]}"; do
    info="$(k get pvc "$claim" -o 'go-template={{.metadata.uid}} {{.status.phase}} {{or .spec.storageClassName "-"}}' 2>/dev/null || true)"
    [[ "$info" == *" Pending "* ]] || continue
    unbound[${info%% *}]="claim $claim (StorageClass ${info##* })"
    uids+="${info%% *} "
  done
  events="$(warning_events)"
  recent="$(date -u -d "@$(($(date +%s) - MOUNT_GRACE))" +%Y-%m-%dT%H:%M:%SZ)"
  while IFS=$'\t' read -r a b c d; do
    [[ -n "$a" && "$uids" == *" $a "* && ! "$c" < "$run_started" ]] || continue
    case "$b" in
      ProvisioningFailed)
        # A class that cannot give this claim a volume (no ReadWriteMany, no capacity): the provisioner
        # keeps trying, so give it PVC_TIMEOUT.
        if [[ -n "${unbound[$a]:-}" ]] && still_failing "$selector|$a/$b" "$PVC_TIMEOUT"; then
          report "$stage" "$selector" "${unbound[$a]} cannot be provisioned: $d (for ${PVC_TIMEOUT}s, PVC_TIMEOUT)"
        fi
        ;;
      FailedCreate)
        # Admission refusals (Pod Security, quota) do not pass by themselves.
        [[ "$d" != *forbidden* ]] || report "$stage" "$selector" "$b: $d"
        ;&
      FailedMount | FailedAttachVolume)
        # Still failing: for a pod, while it is Pending; for a Job or ReplicaSet, while the event recurs.
        if [[ "$pending" == *" $a "* ]] || { [[ "$b" == FailedCreate ]] && [[ ! "$c" < "$recent" ]]; }; then
          if still_failing "$selector|$a/$b" "$MOUNT_GRACE"; then
            report "$stage" "$selector" "$b for ${MOUNT_GRACE}s (MOUNT_GRACE): $d"
          fi
        fi
        ;;
    esac
  done <<<"$events"
  for key in "${!failing_since[@]}"; do # this selector's states that are gone start again at 0
    [[ "$key" != "$selector|"* || -n "${seen_now[$key]:-}" ]] || unset "failing_since[$key]"
  done
  # A cluster autoscaler that is adding a node: give the scheduler until the stage's deadline.
  if ((${#unschedulable_since[@]})) && grep -q $'\tTriggeredScaleUp\t' <<<"$(k get events --field-selector reason=TriggeredScaleUp -o "go-template=$events_template" 2>/dev/null || true)"; then
    for pod in "${!unschedulable_since[@]}"; do unschedulable_since[$pod]=$SECONDS; done
  fi
}

# volume_cause SELECTOR: ": " and, for the stage's pods that are not Ready, the claims they mount, each
# with its volume's type and class ("" when there are none): a volume the node cannot mount, or that uid 10001
# cannot write, keeps a pod there with no event that names it (a simulated class's hostPath volume on a
# real node, for one).
volume_cause() {
  local pod claim pv class provisioner type out=""
  # shellcheck disable=SC2016  # Go templates
  while read -r pod claim; do
    [[ -n "$claim" ]] || continue
    read -r pv class <<<"$(k get pvc "$claim" -o 'go-template={{or .spec.volumeName "-"}} {{or .spec.storageClassName "-"}}' 2>/dev/null || echo "- -")"
    type="$(k get pv "$pv" -o 'go-template={{range $key, $value := .spec}}{{$key}} {{end}}' 2>/dev/null | tr ' ' '\n' |
      grep -vxE 'accessModes|capacity|claimRef|mountOptions|nodeAffinity|persistentVolumeReclaimPolicy|storageClassName|volumeMode|volumeAttributesClassName|' | head -n 1 || true)"
    provisioner="$(k get storageclass "$class" -o 'jsonpath={.provisioner}' 2>/dev/null || true)"
    out+="pod $pod mounts claim $claim (volume $pv${type:+ of type $type}, StorageClass $class${provisioner:+, provisioner $provisioner}); "
  done < <(k get pods -l "$1" -o 'go-template={{range .items}}{{$p := .metadata.name}}{{$ready := false}}{{range .status.conditions}}{{if and (eq .type "Ready") (eq .status "True")}}{{$ready = true}}{{end}}{{end}}{{if not $ready}}{{range .spec.volumes}}{{if .persistentVolumeClaim}}{{$p}} {{.persistentVolumeClaim.claimName}}
{{end}}{{end}}{{end}}{{end}}' 2>/dev/null || true)
  [[ -z "$out" ]] || printf ': %s' "${out%; }: a volume the node cannot mount, or that uid 10001 cannot write, keeps a pod there (kubectl describe pod)"
}

# terminated_summary SELECTOR: "pod P: container C exited N (REASON): MESSAGE" for failed containers
terminated_summary() {
  stage_objects "$1" | awk -F'\t' '$1 == "term" && $4 != "0" {
    printf "pod %s: container %s exited %s (%s)%s; ", $2, $3, $4, $5, ($6 == "" ? "" : ": " $6)}'
}

# job_state JOB: its true conditions, one "TYPE:REASON:MESSAGE" line each (Complete:..., Failed:...); before
# the Job controller marks it complete, "Complete:Completed:" once its pod's container has exited 0 (the
# kubelet reports that about 2 s earlier; each stage's Job runs one pod to completion)
job_state() {
  local state
  state="$(k get job "$1" -o 'go-template={{range .status.conditions}}{{if eq .status "True"}}{{.type}}:{{.reason}}:{{.message}}{{"\n"}}{{end}}{{end}}' 2>/dev/null)" || state=""
  if [[ -n "$state" ]]; then
    printf '%s' "$state"
    return 0
  fi
  k get pods -l "job-name=$1" -o "go-template=$exited_template" 2>/dev/null | sed -n 's/^[^ ]* Complete:Completed$/Complete:Completed:/p' | head -n 1 || true
}

# exited_template: "JOB Complete:Completed" for each of a Job's pods whose container has exited 0
# shellcheck disable=SC2016  # a Go template: its $j is not the shell's
exited_template='{{range .items}}{{if eq .kind "Pod"}}{{$j := index .metadata.labels "job-name"}}{{range .status.containerStatuses}}{{with .state.terminated}}{{if not .exitCode}}{{$j}} Complete:Completed{{"\n"}}{{end}}{{end}}{{end}}{{end}}{{end}}'

# round_states: every trainer and aggregator Job and their pods in one call (a round's check, whatever
# WORKER_NUMBER): "JOB exists", then "JOB TYPE:REASON" for each of its true conditions, and
# "JOB Complete:Completed" once its pod's container has exited 0 (before the Job controller says so);
# nothing when the call fails
# shellcheck disable=SC2016  # a Go template: its $n is not the shell's
round_states() {
  k get jobs,pods -l 'app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component in (trainer,aggregator)' \
    -o 'go-template={{range .items}}{{if eq .kind "Job"}}{{$n := .metadata.name}}{{$n}} exists{{"\n"}}{{range .status.conditions}}{{if eq .status "True"}}{{$n}} {{.type}}:{{.reason}}{{"\n"}}{{end}}{{end}}{{end}}{{end}}'"$exited_template" 2>/dev/null || true
}

# job_failure JOB STATE: why a failed JOB failed, in one line
job_failure() {
  local job="$1" state="$2" line
  if [[ "$job" == mnist-ledger-restore ]] && grep -q '^Failed:PodFailurePolicy:' <<<"$state"; then
    # ledger.py's exit code 2: a recorded file is missing or its sha256 changed; its last line names it
    line="$(k logs "job/$job" --tail=1 2>/dev/null)" || line=""
    echo "the round ledger on the volume does not match its files: ${line:-(no log line)}. RESUME=1 continues only from an intact ledger: put that file back as it was, or run without RESUME=1 to start a new run"
    return
  fi
  echo "job $job failed: $(grep -m1 '^Failed:' <<<"$state" | cut -d: -f2-) $(terminated_summary "job-name=$job")"
}

# pause WHAT...: until the next check: POLL seconds, or less when WHAT is done first. kubectl watches
# (wait, rollout status), so a stage done is noticed at once rather than up to POLL later. WHAT is
# "job J..." (every J complete), "pod P" (Ready) or "deployment D" (its rollout complete).
pause() {
  local started=$SECONDS kind="$1" done=1
  shift
  case "$kind" in
    job) # their pods' containers exited 0: seen about 2 s before the Jobs' Complete condition
      local selector="job-name=$1"
      (($# == 1)) || selector="job-name in ($(IFS=,; echo "$*"))"
      k wait pod -l "$selector" --for=jsonpath='{.status.containerStatuses[0].state.terminated.reason}'=Completed \
        --timeout="${POLL}s" >/dev/null 2>&1 || done=0
      ;;
    pod) k wait --for=condition=Ready --timeout="${POLL}s" "pod/$1" >/dev/null 2>&1 || done=0 ;;
    deployment) k rollout status "deployment/$1" --timeout="${POLL}s" >/dev/null 2>&1 || done=0 ;;
  esac
  # not done (a failure, an object not there yet): the rest of POLL, so that no check runs back to back
  ((done || SECONDS - started >= POLL)) || sleep $((POLL - (SECONDS - started)))
}

# wait_jobs STAGE SELECTOR JOB...: until every JOB is complete, under one JOB_TIMEOUT
wait_jobs() {
  local stage="$1" selector="$2" deadline=$((SECONDS + JOB_TIMEOUT)) job state pending
  shift 2
  reset_graces
  while :; do
    pending=0
    for job in "$@"; do
      state="$(job_state "$job")"
      if grep -q '^Failed:' <<<"$state"; then
        report "$stage" "job-name=$job" "$(job_failure "$job" "$state")"
      fi
      grep -q '^Complete:' <<<"$state" || pending=1
    done
    ((pending)) || return 0
    check_stage "$stage" "$selector"
    ((SECONDS < deadline)) || report "$stage" "$selector" "not complete within JOB_TIMEOUT=${JOB_TIMEOUT}s"
    pause job "$@"
  done
}

# wait_ready STAGE deployment|pod NAME SELECTOR TIMEOUT: until the Deployment's rollout is complete with every
# replica available, or the pod is Ready
wait_ready() {
  local stage="$1" kind="$2" name="$3" selector="$4" timeout="$5" deadline=$(($5 + SECONDS)) query want state
  case "$kind" in
    deployment)
      query='go-template={{if ge .status.observedGeneration .metadata.generation}}{{if eq (or .status.updatedReplicas 0) .spec.replicas}}{{if eq (or .status.availableReplicas 0) .spec.replicas}}ready{{end}}{{end}}{{end}}'
      want="ready"
      ;;
    pod)
      query='jsonpath={.status.conditions[?(@.type=="Ready")].status}'
      want="True"
      ;;
  esac
  reset_graces
  while :; do
    state="$(k get "$kind" "$name" -o "$query" 2>/dev/null)" || state=""
    [[ "$state" != "$want" ]] || return 0
    check_stage "$stage" "$selector"
    if ((SECONDS >= deadline)); then
      report "$stage" "$selector" "$kind $name not $([[ "$kind" == pod ]] && echo ready || echo available) within ${timeout}s$(volume_cause "$selector")"
    fi
    pause "$kind" "$name"
  done
}

# wait_claim STAGE NAME: until the claim is Bound; a class that binds on first use is left to the pods
wait_claim() {
  local stage="$1" name="$2" deadline=$((SECONDS + PVC_TIMEOUT)) phase class mode uid
  class="$(k get pvc "$name" -o 'jsonpath={.spec.storageClassName}' 2>/dev/null)" || class=""
  if [[ -n "$class" ]]; then
    mode="$(k get storageclass "$class" -o 'jsonpath={.volumeBindingMode}' 2>/dev/null)" || mode=""
    if [[ "$mode" == WaitForFirstConsumer ]]; then
      say "$stage: claim $name (class $class) binds when its first pod is scheduled"
      return 0
    fi
  fi
  while :; do
    phase="$(k get pvc "$name" -o 'jsonpath={.status.phase}' 2>/dev/null)" || phase=""
    [[ "$phase" != Bound ]] || return 0
    if ((SECONDS >= deadline)); then
      uid="$(k get pvc "$name" -o 'jsonpath={.metadata.uid}' 2>/dev/null)" || uid=""
      {
        echo "---- claim $name ----"
        k get pvc "$name" -o wide 2>&1 || true
        k get storageclass 2>&1 || true
        echo "---- events ----"
        k get events --field-selector "involvedObject.uid=$uid" 2>&1 || true
        echo "----"
      } >&2
      fail "$stage" "claim $name is still ${phase:-absent} after PVC_TIMEOUT=${PVC_TIMEOUT}s (class '${class:-<none: the default StorageClass>}'; events above)"
    fi
    sleep "$POLL"
  done
}

# delete_jobs NAME...: remove Jobs of an earlier run (and their pods) so they can be applied again
delete_jobs() { k delete job "$@" --ignore-not-found=true --cascade=foreground --wait=true >/dev/null; }

# configmap_only: the ConfigMap of a rendered file (the aggregator's worker count), nothing else
configmap_only() {
  awk '/^---$/ { if (cm) printf "%s", doc; doc = ""; cm = 0; next }
    { doc = doc $0 "\n" } /^kind: ConfigMap$/ { cm = 1 } END { if (cm) printf "%s", doc }'
}

# wait_round ROUND: the trainers and the aggregator run together and the aggregator closes the round (every
# model in, or ROUND_DEADLINE passed with at least MIN_WORKERS). A failed trainer Job is reported; the run
# stops when more fail than WORKER_NUMBER - MIN_WORKERS (at the default MIN_WORKERS, at the first). At the
# default MIN_WORKERS the trainers live through every round (LAST_ROUND): a round before the last closes with
# its aggregator, the trainers then already training the next one from its aggregate.
wait_round() {
  local round="$1" limit=$JOB_TIMEOUT deadline job states why failed=() late=() gone=() waiting=() kept=() other
  local -A reported=()
  ((ROUND_DEADLINE + 600 <= limit)) || limit=$((ROUND_DEADLINE + 600))
  deadline=$((SECONDS + limit))
  reset_graces
  while :; do
    states="$(round_states)"
    for job in "${trainers[@]}"; do
      [[ -z "${reported[$job]:-}" ]] || continue
      grep -q "^$job Failed:" <<<"$states" || continue
      reported[$job]=1
      failed+=("$job")
      why="$(job_failure "$job" "$(job_state "$job")")"
      # every model needed (the default MIN_WORKERS): the first failed trainer stops the run, naming it; its Job
      # stays for its logs, the others (living on: LAST_ROUND) go with the run
      if ((min_workers == WORKER_NUMBER)); then
        kept=()
        for other in "${waiting_jobs[@]}"; do [[ "$other" == "$job" ]] || kept+=("$other"); done
        waiting_jobs=("${kept[@]}")
        report "trainers (round $round)" "job-name=$job" "$why"
      fi
      warn "round $round: $why"
      k logs -l "job-name=$job" --all-containers=true --prefix=true --tail=20 2>&1 | sed 's/^/    /' >&2 || true
      if ((${#failed[@]} > WORKER_NUMBER - min_workers)); then
        report "trainers (round $round)" "app.kubernetes.io/component=trainer" \
          "${#failed[@]} of $WORKER_NUMBER trainer Jobs failed (${failed[*]}): fewer than MIN_WORKERS=$min_workers can finish"
      fi
      warn "round $round: going on without $job ($((WORKER_NUMBER - ${#failed[@]})) trainers left, MIN_WORKERS=$min_workers)"
    done
    if grep -q '^mnist-aggregator Failed:' <<<"$states"; then
      report "aggregator (round $round)" "job-name=mnist-aggregator" "$(job_failure mnist-aggregator "$(job_state mnist-aggregator)")"
    fi
    # Done: the aggregator, and at the default MIN_WORKERS after the last round every trainer too (their
    # models are in, so they have ended or are about to; a trainer that failed is reported above rather than
    # missed). Before the last round those trainers live on into the next one (trainer.py --last-round).
    waiting=(mnist-aggregator)
    if grep -q '^mnist-aggregator Complete:' <<<"$states"; then
      ((min_workers < WORKER_NUMBER || round < ROUNDS)) && break
      waiting=()
      for job in "${trainers[@]}"; do grep -q "^$job Complete:" <<<"$states" || waiting+=("$job"); done
      ((${#waiting[@]})) || break
    fi
    check_stage "trainers (round $round)" "app.kubernetes.io/component=trainer"
    check_stage "aggregator (round $round)" "app.kubernetes.io/component=aggregator"
    ((SECONDS < deadline)) || report "round $round" "app.kubernetes.io/component in (trainer,aggregator)" "not complete within ${limit}s"
    pause job "${waiting[@]}"
  done
  # Closed without some (MIN_WORKERS < WORKER_NUMBER): stop those still running
  if ((min_workers < WORKER_NUMBER)); then
    states="$(round_states)"
    for job in "${trainers[@]}"; do
      [[ -z "${reported[$job]:-}" ]] || continue
      ! grep -q "^$job Complete:" <<<"$states" || continue
      if grep -qx "$job exists" <<<"$states"; then late+=("$job"); else gone+=("$job"); fi
    done
  fi
  ((${#gone[@]} == 0)) || warn "round $round: ${gone[*]}: no such Job any more (deleted while the round ran)"
  if ((${#late[@]})); then
    say "round $round: closed without ${late[*]} (still running at the deadline): stopping them"
    delete_jobs "${late[@]}"
  fi
  local missing=("${failed[@]}" "${late[@]}" "${gone[@]}")
  round_workers_done=$((WORKER_NUMBER - ${#missing[@]})) # for the ConfigMap mlk-progress (live_accuracy)
  if ((${#missing[@]})); then
    say "round $round: aggregated model written without ${missing[*]} (the ledger records them missing)"
  else
    say "round $round: aggregated model written"
  fi
}

# --- where the time goes ------------------------------------------------------------------------
# Each stage's pods, noted when the quickstart sees the stage done (before a later round deletes them),
# give the summary's breakdown (docs/kubernetes.md, "Where the time goes"). One line per pod:
#   NAME CREATED SCHEDULED STARTED FINISHED   the main container's run; a Deployment's pod: FINISHED is
#                                             the time it became Ready; "-" for what is not there
# shellcheck disable=SC2016  # a Go template: its $s is not the shell's
timeline_template='{{range .items}}{{.metadata.name}} {{.metadata.creationTimestamp}} {{$s := "-"}}{{$r := "-"}}{{range .status.conditions}}{{if and (eq .type "PodScheduled") (eq .status "True")}}{{$s = .lastTransitionTime}}{{end}}{{if and (eq .type "Ready") (eq .status "True")}}{{$r = .lastTransitionTime}}{{end}}{{end}}{{$s}} {{$b := "-"}}{{$e := $r}}{{range .status.containerStatuses}}{{with .state.running}}{{$b = .startedAt}}{{end}}{{with .state.terminated}}{{$b = .startedAt}}{{$e = .finishedAt}}{{end}}{{end}}{{$b}} {{$e}}
{{end}}'
timeline=() # one line per pod: STAGE POD then seconds: create schedule start boot work notice (docs/kubernetes.md)
stage_applied=0
trainers=() trainers_applied="" # round 1's trainers applied with the splitter: the time of it

# epoch TIME: a Kubernetes or log timestamp as seconds since 1970 (with fractions), "-" for "-"
epoch() { if [[ "$1" == - || -z "$1" ]]; then echo -; else date -u -d "$1" +%s.%N 2>/dev/null || echo -; fi; }

# span FROM TO: TO - FROM in seconds, one decimal; "-" when either is unknown
span() { if [[ "$1" == - || "$2" == - ]]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; fi; }

# applying: the moment a stage is applied, from which its breakdown counts
applying() { stage_applied="$(date -u +%s.%N)"; }

# note_timeline STAGE SELECTOR: the stage's pods into the breakdown: from the stage's apply to each pod
# created (create: the Job or ReplicaSet controller), scheduled (schedule), its container started (start:
# the image, the volumes, the container), the program's first log line (boot: the interpreter and its
# imports), its container finished or the pod Ready (work), and now, when the quickstart saw it (notice).
# Kubernetes' times are whole seconds, the logs' finer: a value is good to about a second.
note_timeline() {
  local stage="$1" selector="$2" noticed pod created scheduled started finished first
  noticed="$(date -u +%s.%N)"
  while read -r pod created scheduled started finished; do
    [[ -n "$pod" ]] || continue
    first="$(k logs "pod/$pod" --timestamps --limit-bytes=512 2>/dev/null | head -n 1 | cut -d' ' -f1 || true)"
    created="$(epoch "$created")" scheduled="$(epoch "$scheduled")" started="$(epoch "$started")" first="$(epoch "${first:--}")"
    finished="$(epoch "$finished")"
    timeline+=("$stage	$pod	$(span "$stage_applied" "$created")	$(span "$created" "$scheduled")	$(span "$scheduled" "$started")	$(span "$started" "$first")	$(span "$first" "$finished")	$(span "$finished" "$noticed")")
  done < <(k get pods -l "$selector" -o "go-template=$timeline_template" 2>/dev/null || true)
}

# print_timeline: the breakdown, one line per pod, and the run's total
print_timeline() {
  local line f
  ((${#timeline[@]})) || return 0
  say "where the time went (seconds; create: apply to the pod created, schedule: to scheduled, start: to container started, boot: to the program's first log line, work: to done or Ready, notice: to the quickstart seeing it; docs/kubernetes.md)"
  say "$(printf '  %-24s %-34s %6s %8s %6s %6s %7s %7s' stage pod create schedule start boot work notice)"
  for line in "${timeline[@]}"; do
    IFS=$'\t' read -ra f <<<"$line"
    say "$(printf '  %-24s %-34s %6s %8s %6s %6s %7s %7s' "${f[@]}")"
  done
  say "total: ${SECONDS}s from start to this summary"
}

forward_hint() {
  say "server: reach it with: ${kubectl_cmd[*]} port-forward service/mnist-server-svc 8080:80   then open http://localhost:8080/"
}

# --- the steps, in the order main runs them ------------------------------------------------------

# connect: the cluster answers; the namespace the PersistentVolume is named after; the right to create one
connect() {
  local context
  context="$(k config current-context 2>/dev/null || echo '?')"
  say "context $context: WORKER_NUMBER=$WORKER_NUMBER EPOCH=$EPOCH BATCH=$BATCH ROUNDS=$ROUNDS NFS_BACKEND=$NFS_BACKEND${STORAGE_CLASS:+ STORAGE_CLASS=$STORAGE_CLASS}"
  say "SPLIT=$SPLIT AGGREGATION=$AGGREGATION SERVER_OPTIMIZER=$SERVER_OPTIMIZER PROX_MU=$PROX_MU LOCAL_STEPS=$LOCAL_STEPS" \
    "${SERVER_LR:+SERVER_LR=$SERVER_LR }${SERVER_MOMENTUM:+SERVER_MOMENTUM=$SERVER_MOMENTUM }${ATTACK:+ATTACK=$ATTACK }${PRESET:+PRESET=$PRESET}"
  k get --raw=/readyz >/dev/null 2>&1 || k version >/dev/null 2>&1 || fail config "cannot reach the cluster of context '$context' with '${kubectl_cmd[*]}'"
  NAMESPACE="$(current_namespace "${kubectl_cmd[@]}")"
  export NAMESPACE # render.sh: the NFS PersistentVolume's name and claim (3-nfs-pv-pvc.yaml)
  if [[ "$NFS_BACKEND" != rwx && "$(k auth can-i create persistentvolumes 2>/dev/null || true)" == no ]]; then
    fail config "NFS_BACKEND=$NFS_BACKEND needs the right to create PersistentVolumes (cluster-wide), which '${kubectl_cmd[*]}' lacks: use NFS_BACKEND=rwx STORAGE_CLASS=<a ReadWriteMany class>, or ask for that right"
  fi
}

# requests_of MANIFEST: its (last) container's CPU and memory requests, "CPU MEMORY"
requests_of() { sed -n 's/.*requests: {cpu: \([^,]*\), memory: \([^}]*\)}.*/\1 \2/p' "$1" | tail -n 1; }

# free_slots: how many trainer pods fit at once on the nodes that take our pods (no NoSchedule/NoExecute taint,
# not cordoned), by what the pods already there request, after a round's aggregator and the accuracy test;
# nothing when that cannot be read (no right to list nodes or every namespace's pods)
# shellcheck disable=SC2016  # Go templates: their $ are not the shell's
free_slots() {
  local nodes pods
  nodes="$(k get nodes -o 'go-template={{range .items}}node {{.metadata.name}} {{.status.allocatable.cpu}} {{.status.allocatable.memory}} {{if .spec.unschedulable}}cordoned{{else}}-{{end}} {{range .spec.taints}}{{.effect}},{{end}}
{{end}}' 2>/dev/null)" || return 0
  pods="$(k get pods --all-namespaces -o 'go-template={{range .items}}{{if and .spec.nodeName (ne .status.phase "Succeeded") (ne .status.phase "Failed")}}{{$n := .spec.nodeName}}{{range .spec.containers}}pod {{$n}} {{or .resources.requests.cpu "0"}} {{or .resources.requests.memory "0"}}
{{end}}{{end}}{{end}}' 2>/dev/null)" || return 0
  printf '%s\n%s\n' "$nodes" "$pods" | awk -v want="$(requests_of "$root/manifests/5-trainer.yaml")" \
    -v first="$(requests_of "$root/manifests/6-aggregator.yaml") $(requests_of "$root/manifests/9999-accuracy-test.yaml")" '
    function cpu(q) { return q ~ /m$/ ? substr(q, 1, length(q) - 1) + 0 : q * 1000 }
    BEGIN { split("Ki 1024 Mi 1048576 Gi 1073741824 Ti 1099511627776 k 1e3 M 1e6 G 1e9 T 1e12 m 0.001", t, " ")
            for (i = 1; i in t; i += 2) unit[t[i]] = t[i + 1] + 0 }
    function mem(q,   u) { u = q; sub(/^[0-9.]+/, "", u); return (q + 0) * (u in unit ? unit[u] : 1) }
    function place(c, m,   n) { for (n in fc) if (fc[n] >= c && fm[n] >= m) { fc[n] -= c; fm[n] -= m; return 1 } return 0 }
    $1 == "node" && $5 == "-" && $6 !~ /NoSchedule|NoExecute/ { fc[$2] = cpu($3); fm[$2] = mem($4) }
    $1 == "pod" { used_c[$2] += cpu($3); used_m[$2] += mem($4) }
    END {
      for (n in fc) { fc[n] -= used_c[n]; fm[n] -= used_m[n] }
      split(first, f, " "); split(want, w, " ")
      for (i = 1; i in f; i += 2) if (!place(cpu(f[i]), mem(f[i + 1]))) { print 0; exit }
      for (k = 0; place(cpu(w[1]), mem(w[2])); k++) if (k > 100000) break
      print k
    }'
}

# choose_trainers: at the default MIN_WORKERS, when every trainer fits on the nodes at once, one trainer Job a
# worker lives through every round (LAST_ROUND: render.sh's --last-round): no pod, interpreter or TensorFlow start
# at a round's start. Otherwise a Job per round: trainers that waited for their round to close would keep
# their CPU from those still to be scheduled (a node that takes 3 of 8 would never run the other 5), and with
# MIN_WORKERS below WORKER_NUMBER a round may close without a trainer.
choose_trainers() {
  local slots
  ((min_workers == WORKER_NUMBER && ROUNDS > 1)) || return 0
  slots="$(free_slots)"
  if [[ "$slots" =~ ^[0-9]+$ ]] && ((slots >= WORKER_NUMBER)); then
    export LAST_ROUND="$ROUNDS"
    say "trainers: one Job a worker through all $ROUNDS rounds (the nodes have room for $slots at once)"
  elif [[ -z "$slots" ]]; then
    say "trainers: a Job a worker a round (cannot read the nodes' free CPU and memory to know that all $WORKER_NUMBER fit at once)"
  else
    say "trainers: a Job a worker a round (the nodes have room for $slots of $WORKER_NUMBER at once; each round's start is then a pod start)"
  fi
}

# 1-3: the shared volume: the NFS server, its Service and NetworkPolicy, the PV and claim (or the rwx claim)
prepare_volume() {
  local node_ips old_ip
  if [[ "$NFS_BACKEND" == rwx ]]; then
    say "== volume: ReadWriteMany claim of StorageClass $STORAGE_CLASS"
    k get storageclass "$STORAGE_CLASS" >/dev/null 2>&1 ||
      fail volume "StorageClass '$STORAGE_CLASS' not found (kubectl get storageclass lists them)"
    apply volume "$root/manifests/variants/3-rwx-pvc.yaml"
    wait_claim volume nfs
  else
    say "== nfs: NFS server ($NFS_BACKEND), its service and who may reach it"
    applying
    apply nfs "$nfs_manifest"
    wait_claim nfs nfs-server-disk
    apply nfs "$root/manifests/2-nfs-service.yaml"
    if [[ -z "$NODE_CIDR" ]]; then
      # IPv4 only (a dual-stack node lists both)
      read -ra node_ips <<<"$(k get nodes -o 'jsonpath={.items[*].status.addresses[?(@.type=="InternalIP")].address}' 2>/dev/null | tr ' ' '\n' | grep -v ':' | tr '\n' ' ' || true)"
      if ! NODE_CIDR="$(covering_cidr "${node_ips[@]}")"; then
        # No right to list nodes, or no IPv4 InternalIP: the mounts must still work.
        NODE_CIDR=0.0.0.0/0
        warn "nfs: cannot read the nodes' IPv4 InternalIPs, so the NFS server's NetworkPolicy admits any address on 2049; set NODE_CIDR to the nodes' range to restrict it"
      fi
    fi
    export NODE_CIDR
    apply nfs "$root/manifests/2-nfs-networkpolicy.yaml"
    wait_ready nfs deployment nfs-server "app.kubernetes.io/component=nfs-server" "$NFS_TIMEOUT"
    note_timeline nfs-server "app.kubernetes.io/component=nfs-server"
    NFS_CLUSTER_IP="$(k get service nfs-server -o 'jsonpath={.spec.clusterIP}')" || NFS_CLUSTER_IP=""
    [[ -n "$NFS_CLUSTER_IP" ]] || fail nfs "service nfs-server has no ClusterIP"
    export NFS_CLUSTER_IP
    say "nfs: server ready at $NFS_CLUSTER_IP"
    # A PV's source cannot change: one left by a run whose NFS service had another address must go first.
    old_ip="$(k get pv "mlk-nfs-$NAMESPACE" -o 'jsonpath={.spec.nfs.server}' 2>/dev/null)" || old_ip=""
    if [[ -n "$old_ip" && "$old_ip" != "$NFS_CLUSTER_IP" ]]; then
      fail volume "PersistentVolume mlk-nfs-$NAMESPACE points at $old_ip, the NFS service is now at $NFS_CLUSTER_IP: run scripts/teardown.sh (keeps the data) and start again"
    fi
    apply volume "$root/manifests/3-nfs-pv-pvc.yaml"
    wait_claim volume nfs
  fi
  say "volume: claim nfs bound"
}

# resume: the restore Job checks the round ledger on the volume; done_rounds is its last complete round
resume_from_ledger() {
  local result sha
  say "== resume: checking the round ledger on the volume against its files"
  delete_jobs mnist-ledger-restore
  apply resume "$root/manifests/9999-ledger-restore.yaml"
  wait_jobs resume "app.kubernetes.io/component=ledger-restore" mnist-ledger-restore
  result="$(k logs job/mnist-ledger-restore --tail=1 2>/dev/null)" || result=""
  done_rounds="$(sed -n 's/^{"last_round": *\([0-9][0-9]*\),.*/\1/p' <<<"$result")"
  [[ -n "$done_rounds" ]] ||
    fail resume "cannot read the last complete round from job mnist-ledger-restore's log: its last line is '${result:-nothing}', not {\"last_round\": n, ...}"
  if ((done_rounds == 0)); then
    say "resume: the ledger has no complete round; starting at round 1"
  else
    sha="$(sed -n 's/.*"sha256": *"\([0-9a-f]\{12\}\).*/\1/p' <<<"$result")"
    say "resume: round $done_rounds is the last complete one (rounds/r$done_rounds.h5 ${sha:-?}..., now /mnt/aggregated-model.h5); the shards are on the volume"
    ((done_rounds < ROUNDS)) || say "resume: all ROUNDS=$ROUNDS rounds are done; on to the accuracy test"
  fi
}

# offline data: MNIST_NPZ onto the volume as DATASET (this run's own name), through a short-lived pod applied
# with the splitter, which waits for the file (--wait-data)
upload_dataset() {
  local copied size
  wait_ready dataset pod mnist-dataset-upload "app.kubernetes.io/component=dataset-upload" "$NFS_TIMEOUT"
  note_timeline "round 1 dataset" "app.kubernetes.io/component=dataset-upload"
  # Streamed through exec (no tar needed in the image), written to a temporary name, then renamed; an earlier
  # run's upload goes.
  copied="$(k exec -i mnist-dataset-upload -- python -c 'import glob, os, shutil, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
for old in glob.glob(os.path.join(os.path.dirname(path), "*.npz")):
    if old != path:
        os.remove(old)
tmp = os.path.join(os.path.dirname(path), ".upload.tmp")
with open(tmp, "wb") as f:
    shutil.copyfileobj(sys.stdin.buffer, f)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
print(os.path.getsize(path))' "$DATASET" <"$MNIST_NPZ")" || fail dataset "could not copy $MNIST_NPZ into pod mnist-dataset-upload"
  size="$(wc -c <"$MNIST_NPZ")"
  [[ "$copied" == "$size" ]] || fail dataset "copied ${copied:-nothing} of $size bytes"
  k delete pod mnist-dataset-upload --wait=false >/dev/null || true
  say "dataset: $size bytes on the volume; the splitter reads it instead of downloading"
}

# 4: the splitter Job writes WORKER_NUMBER shards and the test set. Round 1's trainers are applied with it
# (RUN_ID: they wait for this run's split, never an earlier run's shards still on the volume): their pods
# start and import TensorFlow while it splits.
split_data() {
  local run_id
  run_id="run-$(date -u +%Y%m%d%H%M%S)-$RANDOM"
  delete_old_trainers
  delete_jobs mnist-splitter
  if [[ -n "$MNIST_NPZ" ]]; then # the upload pod too: the splitter waits for its file
    export DATASET="/mnt/uploads/$run_id.npz" DATASET_WAIT=$((NFS_TIMEOUT + 600))
    say "== dataset: $MNIST_NPZ onto the volume as $DATASET, for the splitter applied with it"
    k delete pod mnist-dataset-upload --ignore-not-found=true --wait=true >/dev/null
  fi
  say "== splitter: $WORKER_NUMBER shards (run $run_id), with round 1's trainers waiting for them"
  applying
  [[ -z "$MNIST_NPZ" ]] || apply dataset "$root/manifests/9999-dataset-upload.yaml"
  RUN_ID="$run_id" apply splitter "$root/manifests/4-splitter.yaml"
  RUN_ID="$run_id" apply_trainers 1
  trainers_applied="$stage_applied"
  waiting_jobs=(mnist-splitter "${trainers[@]}")
  [[ -z "$MNIST_NPZ" ]] || upload_dataset
  waiting_jobs=("${trainers[@]}")
  wait_jobs splitter "app.kubernetes.io/component=splitter" mnist-splitter
  note_timeline "round 1 splitter" "app.kubernetes.io/component=splitter"
  say "splitter: done"
}

# apply_trainers ROUND: the round's trainer Jobs, one per shard (round > 1 starts from the aggregate), in one
# kubectl apply: each call costs a process start and a round trip, and the last Job waited for the others'
apply_trainers() {
  local round="$1" i rendered="" one
  for ((i = 0; i < WORKER_NUMBER; i++)); do
    one="$(INCREMENTAL_NUMBER="$i" "$root/scripts/render.sh" "$root/manifests/5-trainer.yaml")" ||
      fail "trainer $i (round $round)" "cannot render $root/manifests/5-trainer.yaml"
    rendered+="---"$'\n'"$one"$'\n'
  done
  apply_rendered "trainers (round $round)" "manifests/5-trainer.yaml (x$WORKER_NUMBER)" "$rendered"
}

aggregate=/mnt/aggregated-model.h5 # the aggregator's --savefile: where round r+1 starts from

# Every trainer Job of an earlier run goes, by label: one numbered past this run's WORKER_NUMBER, or the
# Indexed mnist-trainer, would otherwise write into this run's /mnt/model.
delete_old_trainers() {
  k delete jobs -l "app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component=trainer" --ignore-not-found=true \
    --cascade=foreground --wait=true >/dev/null || fail trainers "cannot delete the trainer Jobs of an earlier run"
}

# 5-6: ROUNDS rounds of trainers and aggregation, from the round after done_rounds (round 1's trainers may
# be running already: applied with the splitter). At the default MIN_WORKERS the trainer Jobs are applied once
# and live through every round (LAST_ROUND: trainer.py --last-round trains each round from the one before's
# aggregate, as the ledger records it), so a round's start costs no pod, interpreter or TensorFlow start; every
# round's rows in the breakdown then count from their apply. With MIN_WORKERS below the worker count each round
# has its own trainer Jobs: a round may close without one, which then must be stopped.
train_rounds() {
  local round new_trainers
  [[ -n "$trainers_applied" ]] || delete_old_trainers
  for ((round = done_rounds + 1; round <= ROUNDS; round++)); do
    if ((round > 1)); then export INIT_MODEL="$aggregate"; else unset INIT_MODEL; fi
    # The aggregator starts beside the round's trainers (--round: it ignores the round before's models still
    # in /mnt/model) and closes the round when every model is in (or, with MIN_WORKERS < WORKER_NUMBER, when
    # ROUND_DEADLINE has passed with at least MIN_WORKERS): its start and the trainers' end overlap.
    if ((min_workers < WORKER_NUMBER)); then
      say "== round $round/$ROUNDS: $WORKER_NUMBER trainers and the aggregator (at least $min_workers models, ROUND_DEADLINE=${ROUND_DEADLINE}s)"
    else
      say "== round $round/$ROUNDS: $WORKER_NUMBER trainers and the aggregator"
    fi
    new_trainers=0
    if ((round == 1)) && [[ -n "$trainers_applied" ]]; then # with the splitter, which is done
      delete_jobs mnist-aggregator
      stage_applied="$trainers_applied" # the round's rows count from its trainers' apply
    elif [[ -n "${LAST_ROUND:-}" && -n "$trainers_applied" ]]; then # they train this round already
      delete_jobs mnist-aggregator
      stage_applied="$trainers_applied"
    else
      delete_jobs "${trainers[@]}" mnist-aggregator
      applying
      new_trainers=1
    fi
    ((round < ROUNDS)) || delete_jobs mnist-accuracy-test
    # The aggregator (and the last round's accuracy test) go before new trainers: on nodes that cannot take
    # every trainer at once they are then scheduled first, rather than after the trainers queued before them.
    ROUND="$round" apply "aggregator (round $round)" "$root/manifests/6-aggregator.yaml"
    # The accuracy test starts beside the last round too (--wait-round): its pod and TensorFlow start, and the
    # scoring of the rounds before, overlap the round's training.
    if ((round == ROUNDS)); then
      ROUND="$round" apply accuracy-test "$root/manifests/9999-accuracy-test.yaml"
      accuracy_applied="$stage_applied"
      waiting_jobs=(mnist-accuracy-test)
    else # trainers living on would wait for a round that will not come
      waiting_jobs=()
      [[ -z "${LAST_ROUND:-}" ]] || waiting_jobs=("${trainers[@]}")
    fi
    if ((new_trainers)); then
      apply_trainers "$round"
      [[ -z "${LAST_ROUND:-}" ]] || trainers_applied="$stage_applied"
    fi
    wait_round "$round"
    if [[ -z "${LAST_ROUND:-}" ]]; then
      note_timeline "round $round trainers" "app.kubernetes.io/component=trainer"
    elif ((round == ROUNDS)); then
      note_timeline "rounds $((done_rounds + 1))-$ROUNDS trainers" "app.kubernetes.io/component=trainer"
    fi
    note_timeline "round $round aggregator" "app.kubernetes.io/component=aggregator"
  done
  unset INIT_MODEL
}

# The live progress (scripts/live.py kube): this script's output goes through it from start_live to stop_live,
# so its lines stay above the workers' live lines; it also keeps the ConfigMap mlk-progress up to date.
live_pid=""
start_live() {
  if ! command -v python3 >/dev/null 2>&1; then
    warn "python3 not found: no live progress lines and no ConfigMap mlk-progress"
    return 0
  fi
  exec 3>&1
  exec 1> >(python3 "$root/scripts/live.py" kube --kubectl "${kubectl_cmd[*]}" --interval "$((POLL > 0 ? POLL : 1))" \
    --passthrough)
  live_pid=$!
}
stop_live() { # back to the terminal; the watch prints what it still has and ends with its input
  [[ -n "$live_pid" ]] || return 0
  exec 1>&3 3>&-
  wait "$live_pid" 2>/dev/null || true
  live_pid=""
}
live_accuracy() { # live_accuracy JSON: the accuracy test's result into the ConfigMap mlk-progress
  command -v python3 >/dev/null 2>&1 || return 0
  local last=()
  [[ -z "${round_workers_done:-}" ]] || last=(--round "$ROUNDS" --workers-done "$round_workers_done/$WORKER_NUMBER")
  python3 "$root/scripts/live.py" kube --kubectl "${kubectl_cmd[*]}" --once --accuracy "$1" "${last[@]}" ||
    warn "could not update the ConfigMap mlk-progress with the accuracy"
}

# the accuracy test Job on the aggregate (applied with the last round, or here when no round was trained);
# its last log line is the result
accuracy_applied=""
accuracy_test() {
  local result pod
  say "== accuracy test"
  if [[ -n "$accuracy_applied" ]]; then
    stage_applied="$accuracy_applied" waiting_jobs=()
  else
    delete_jobs mnist-accuracy-test
    applying
    apply accuracy-test "$root/manifests/9999-accuracy-test.yaml"
  fi
  wait_jobs accuracy-test "app.kubernetes.io/component=accuracy-test" mnist-accuracy-test
  note_timeline "${accuracy_applied:+round $ROUNDS }accuracy-test" "app.kubernetes.io/component=accuracy-test"
  # the pod that succeeded: a retried Job's failed pod (a volume away for a moment) has another last line
  # shellcheck disable=SC2016  # a Go template: its $p is not the shell's
  pod="$(k get pods -l job-name=mnist-accuracy-test -o 'go-template={{range .items}}{{$p := .metadata.name}}{{range .status.containerStatuses}}{{with .state.terminated}}{{if eq .exitCode 0}}{{$p}} {{end}}{{end}}{{end}}{{end}}' 2>/dev/null)" || pod=""
  pod="${pod%% *}"
  [[ -n "$pod" ]] && pod="pod/$pod" || pod=job/mnist-accuracy-test
  if result="$(k logs "$pod" --tail=1 2>/dev/null)" && [[ -n "$result" ]]; then
    say "accuracy test: $result"
    live_accuracy "$result"
    say "history: every round's accuracy, its workers' and its timings in /mnt/rounds/ledger.json, plotted in /mnt/rounds/history.png (docs/kubernetes.md, \"Round ledger\")"
  else
    warn "accuracy test completed, but its log could not be read (kubectl logs job/mnist-accuracy-test)"
  fi
}

# 7: the server Deployment, applied as the last round closes: its replicas start while the accuracy test runs
start_server() {
  # A running server reloads the model when the file changes (server/README.md): no restart needed.
  say "== server (Service type $SERVICE_TYPE): starting beside the accuracy test"
  server_applied="$(date -u +%s.%N)"
  apply server "$root/manifests/7-server.yaml"
  apply server "$root/manifests/8-server-pdb.yaml"
}

# serve: until the server's rollout is complete, then how to reach it for the Service type
serve() {
  local port node svc_uid deadline detect_deadline address acted
  stage_applied="$server_applied"
  wait_ready server deployment mnist-server "app.kubernetes.io/component=server" "$SERVER_TIMEOUT"
  say "server: ready"
  note_timeline server "app.kubernetes.io/component=server"
  print_timeline
  case "$SERVICE_TYPE" in
    ClusterIP) forward_hint ;;
    NodePort)
      port="$(k get service mnist-server-svc -o 'jsonpath={.spec.ports[0].nodePort}')" || port=""
      node="$(k get nodes -o 'jsonpath={.items[0].status.addresses[?(@.type=="ExternalIP")].address}' 2>/dev/null)" || node=""
      [[ -n "$node" ]] || node="$(k get nodes -o 'jsonpath={.items[0].status.addresses[?(@.type=="InternalIP")].address}' 2>/dev/null)" || node=""
      say "server: NodePort $port: http://${node:-<a node address>}:$port/ where the nodes are reachable; otherwise:"
      forward_hint
      ;;
    LoadBalancer)
      say "server: waiting for the external IP of service mnist-server-svc"
      svc_uid="$(k get service mnist-server-svc -o 'jsonpath={.metadata.uid}')" || svc_uid=""
      deadline=$((SECONDS + EXTERNAL_IP_TIMEOUT))
      detect_deadline=$((SECONDS + LB_DETECT_TIMEOUT))
      address=""
      while :; do
        address="$(k get service mnist-server-svc -o 'jsonpath={.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')" || address=""
        [[ -z "$address" ]] || break
        if ((SECONDS >= detect_deadline)); then
          # A cloud's load-balancer controller leaves events on the Service; none means none will come.
          acted="$(k get events --field-selector "involvedObject.uid=$svc_uid" -o 'jsonpath={.items[*].reason}' 2>/dev/null)" || acted=""
          if [[ "$acted" != *LoadBalancer* ]]; then
            say "server: no LoadBalancer controller acted on the Service within ${LB_DETECT_TIMEOUT}s (kind, minikube and bare clusters have none)"
            forward_hint
            exit 0
          fi
        fi
        if ((SECONDS >= deadline)); then
          warn "service mnist-server-svc got no external IP within ${EXTERNAL_IP_TIMEOUT}s"
          forward_hint
          exit 0
        fi
        sleep "$POLL"
      done
      say "server: http://$address/ (public: anyone who has the address can use it; docs/kubernetes.md, \"Exposure\")"
      ;;
  esac
}

main() {
  local i
  no_arguments "$@"
  check_settings
  for ((i = 0; i < WORKER_NUMBER; i++)); do trainers+=("mnist-trainer-$i"); done
  connect
  choose_trainers
  prepare_volume
  done_rounds=0
  if [[ "$RESUME" == 1 ]]; then resume_from_ledger; fi
  if ((done_rounds == 0)); then
    split_data
  else # resuming: the shards are there; only the ConfigMap (the aggregator's worker count) is applied
    apply config "$root/manifests/4-splitter.yaml" configmap_only
  fi
  trap stop_live EXIT
  start_live
  train_rounds
  stop_live
  if [[ "$SERVE" != 0 ]]; then start_server; fi
  accuracy_test
  if [[ "$SERVE" == 0 ]]; then
    print_timeline
    say "done (SERVE=0: no server)"
    return 0
  fi
  serve
}

main "$@"
