#!/usr/bin/env bash
# End-to-end run of the real images: build every stage image from its Dockerfile and run the
# rendered manifests' pod templates as podman containers over one shared volume (standing in for
# the NFS claim): splitter -> round 1: WORKER_NUMBER trainers in parallel (one killed mid-training and
# run again, as a Job's retry would) -> aggregator -> round 2: the trainers with the aggregator beside
# them (MIN_WORKERS = WORKER_NUMBER - 1), the last trainer killed for good -> accuracy test filling the
# round ledger -> ledger restore (and its refusal of a changed file) -> server (6.png -> 6; then the v2 endpoints,
# the ledger display and the promotion gate: check_v2_gate.py); then checks the results.
# Prints a summary table; the last line is the verdict. Exit status non-zero on any failed check.
# It adapts to the machine (docs/e2e.md): as root it installs what is missing (podman, runc, curl;
# debootstrap only if a stand-in base must be built), otherwise it says in one line what to install
# and runs rootless podman.
#   tests/e2e/e2e-containers.sh [--print-containers-conf]   (the latter: print the podman settings
#                                       this machine gets, then exit; nothing is run or installed)
#   WORKER_NUMBER (3, at least 2)  EPOCH (1)  BATCH (100)
#   E2E_ROUND_DEADLINE (10)             round 2's ROUND_DEADLINE: after it the aggregator averages the
#                                       WORKER_NUMBER - 1 models of the trainers still alive
#   E2E_TRAIN (24000) E2E_TEST (2000)   samples of MNIST used: MNIST_NPZ, else ../shared/datasets/
#                                       mnist.npz beside the repo, else the splitter's cached download
#   E2E_MIN_ACCURACY (0.85)             accuracy round 2's model must reach on that subset (measured
#                                       0.9505 with the defaults; round 1 alone 0.9005: 1 epoch of 8000
#                                       digits per worker)
#   E2E_CONTAINERS_CONF (auto)          podman settings: auto = only those this machine needs (runc on
#                                       cgroups v1/hybrid, ulimits a root container may not raise,
#                                       cgroupfs + file events without systemd); always = all of
#                                       .ci/containers.conf; never = podman's defaults.
#                                       An explicit CONTAINERS_CONF is used as it is.
#   BASE_IMAGE                          base of the stage images (default: the Dockerfiles' own
#                                       when it exists or can be pulled, else a debootstrap stand-in,
#                                       built once and cached: tests/e2e/make-base-image.sh)
#   SPLIT, AGGREGATION, SERVER_OPTIMIZER, SERVER_LR, SERVER_MOMENTUM, PROX_MU, LOCAL_STEPS, ATTACK, PRESET
#                                       the runners' federated-learning knobs (docs/CONTRACTS.md "Runner
#                                       knobs"; unset: the defaults, which change nothing), rendered into the
#                                       containers' args by scripts/render.sh as on Kubernetes
#   E2E_SKIP_BUILD=1                    use the images already built
#   E2E_SERVER=0                        stop after the accuracy test (debugging; exits 1, never a pass)
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; } # the header comment above
print_conf=0
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --print-containers-conf) print_conf=1 ;;
    *) echo "e2e-containers.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # tests/e2e: this harness and its helpers
root="$(cd "$here/../.." && pwd)"
cd "$root"
# shellcheck source=scripts/images.env disable=SC1091
source "$root/scripts/images.env"
me="e2e-containers"
# shellcheck source=scripts/lib.sh disable=SC1091
source "$root/scripts/lib.sh"
load_preset "$root/scripts/presets" # PRESET=NAME: its knobs (render.sh reads them from the environment)

workers="${WORKER_NUMBER:-3}"
round_deadline="${E2E_ROUND_DEADLINE:-10}"
epoch="${EPOCH:-1}"
batch="${BATCH:-100}"
n_train="${E2E_TRAIN:-24000}"
n_test="${E2E_TEST:-2000}"
min_accuracy="${E2E_MIN_ACCURACY:-0.85}"
conf_mode="${E2E_CONTAINERS_CONF:-auto}"
py="$root/.venv/bin/python"
export TF_CPP_MIN_LOG_LEVEL=2
if ! [[ "$workers" =~ ^[0-9]+$ ]] || ((workers < 2)); then
  echo "e2e-containers.sh: WORKER_NUMBER must be 2 or more (round 2 loses one), got '$workers'" >&2
  exit 2
fi
[[ "$round_deadline" =~ ^[1-9][0-9]*$ ]] ||
  { echo "e2e-containers.sh: E2E_ROUND_DEADLINE must be a positive number of seconds, got '$round_deadline'" >&2; exit 2; }
min_workers=$((workers - 1))
case "$conf_mode" in
  auto | always | never) ;;
  *) echo "e2e-containers.sh: E2E_CONTAINERS_CONF must be auto, always or never, got '$conf_mode'" >&2; exit 2 ;;
esac
rootless=0
[[ $(id -u) -eq 0 ]] || rootless=1
cgroup_fs="$(stat -fc %T /sys/fs/cgroup 2>/dev/null || echo unknown)" # cgroup2fs: v2; tmpfs: v1 or hybrid

# 1. podman settings for this machine, as containers.conf text (empty: podman's defaults suit it).
#    Each setting that auto picks is one .ci/containers.conf holds; the comments say why.
containers_conf() {
  if [[ "$conf_mode" == always ]]; then
    cat "$root/.ci/containers.conf"
    return
  fi
  [[ "$conf_mode" == auto ]] || return 0
  local ulimits=() engine=() hard pid_max
  if [[ "$cgroup_fs" != cgroup2fs ]]; then
    engine+=("# cgroups are v1/hybrid ($cgroup_fs), which crun refuses" 'runtime = "runc"')
  fi
  if ((!rootless)); then
    # A root container asks for podman's default nofile/nproc of 1048576 (rootless ones keep the
    # user's limits); where even root may not raise its hard limit that far, ask for the most it
    # can give: the hard limit, and for nproc at most kernel.pid_max (podman lowers its own to that).
    hard="$(ulimit -Hn)"
    if [[ "$hard" != unlimited ]] && ! (ulimit -Hn 1048576) 2>/dev/null; then ulimits+=("\"nofile=$hard:$hard\""); fi
    hard="$(ulimit -Hu)"
    if [[ "$hard" != unlimited ]] && ! (ulimit -Hu 1048576) 2>/dev/null; then
      pid_max="$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$hard")"
      ((pid_max >= hard)) || hard="$pid_max"
      ulimits+=("\"nproc=$hard:$hard\"")
    fi
  fi
  if [[ ! -d /run/systemd/system ]]; then
    engine+=("# systemd is not running" 'cgroup_manager = "cgroupfs"' 'events_logger = "file"')
  fi
  ((${#ulimits[@]} + ${#engine[@]})) || return 0
  echo "# podman settings this machine needs (tests/e2e/e2e-containers.sh, E2E_CONTAINERS_CONF=auto)"
  if ((${#ulimits[@]})); then
    echo "[containers]"
    echo "# the hard limits root may not raise past here"
    echo "default_ulimits = [$(IFS=,; echo "${ulimits[*]}")]"
  fi
  if ((${#engine[@]})); then
    echo "[engine]"
    printf '%s\n' "${engine[@]}"
  fi
}
if ((print_conf)); then
  if [[ -n "${CONTAINERS_CONF:-}" ]]; then cat "$CONTAINERS_CONF"; else containers_conf; fi
  exit 0
fi

t0=$SECONDS
log() { printf '[e2e %s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - t0))" "$*"; }
fail() {
  log "FAILED: $*" >&2
  echo "E2E VERDICT: FAIL - $*"
  exit 1
}

run_id="mlk-e2e-$$"
volume="$run_id-mnt"
work="$(mktemp -d "${TMPDIR:-/tmp}/mlk-e2e.XXXXXX")"
chmod 755 "$work"
containers=()
cleanup() {
  local c
  if command -v podman >/dev/null 2>&1; then
    for c in "${containers[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
    podman volume rm -f "$volume" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -n "${CONTAINERS_CONF:-}" ]]; then
  [[ -f "$CONTAINERS_CONF" ]] || fail "CONTAINERS_CONF=$CONTAINERS_CONF: no such file"
  log "podman settings: CONTAINERS_CONF=$CONTAINERS_CONF (as given)"
else
  containers_conf >"$work/containers.conf"
  if [[ -s "$work/containers.conf" ]]; then
    export CONTAINERS_CONF="$work/containers.conf"
    log "podman settings ($conf_mode): $(grep -v '^[#[]' "$CONTAINERS_CONF" | tr -s ' \n' ' ')"
  else
    log "podman settings ($conf_mode): podman's defaults"
  fi
fi

# 2. What this needs: podman (+ runc when the settings name it, curl; rootless: uidmap, slirp4netns),
#    the venv (PyYAML). debootstrap only if the stand-in base must be built (make-base-image.sh).
need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [[ -n "${CONTAINERS_CONF:-}" ]] && grep -Eq '^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"runc"' "$CONTAINERS_CONF"; then
  command -v runc >/dev/null 2>&1 || need+=(runc)
fi
if ((rootless)); then
  command -v newuidmap >/dev/null 2>&1 || need+=(uidmap)
  command -v slirp4netns >/dev/null 2>&1 || need+=(slirp4netns)
fi
if ((${#need[@]})); then
  if ((!rootless)) && command -v apt-get >/dev/null 2>&1; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    fail "needs ${need[*]}: install them (Debian: apt-get install ${need[*]})"
  fi
fi
pod_opts=()
if ((rootless)); then
  user="$(id -un)"
  grep -q "^$user:" /etc/subuid 2>/dev/null ||
    fail "rootless podman needs subordinate uids for $user (as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $user)"
fi
podman info >/dev/null 2>"$work/podman-info.err" ||
  fail "podman does not work here: $(grep -m1 . "$work/podman-info.err" || echo 'podman info failed')"
if ((rootless)); then
  controllers="$(podman info --format '{{range .Host.CgroupControllers}}{{.}} {{end}}' 2>/dev/null || true)"
  if [[ "$cgroup_fs" != cgroup2fs || " $controllers " != *" cpu "* || " $controllers " != *" memory "* ]]; then
    pod_opts+=(--no-limits)
    log "rootless podman cannot set cpu/memory limits here (controllers: ${controllers:-none}); the manifests' limits are left out"
  fi
  log "rootless podman as $user"
fi
"$root/scripts/bootstrap.sh" --dev
[[ -f "$root/scripts/render.sh" ]] || fail "scripts/render.sh missing"

# MNIST as the tests find it (tests/helpers.py's mnist_path(): MNIST_NPZ, else ../shared beside the
# repository, else the splitter's checksum-verified download into the user cache).
dataset="$("$py" - "$root/tests" 2>"$work/mnist.err" <<'PY'
import contextlib, sys
sys.path.insert(0, sys.argv[1])
from helpers import MnistUnavailable, mnist_path
try:
    with contextlib.redirect_stdout(sys.stderr):  # the splitter's download progress
        path = mnist_path()
except MnistUnavailable as e:
    sys.exit(str(e))
print(path)
PY
)" || fail "MNIST: $(tail -n 1 "$work/mnist.err") (MNIST_NPZ names a local Keras mnist.npz)"
[[ -f "$dataset" ]] || fail "MNIST_NPZ=$dataset: no such file"
log "MNIST: $dataset"

declare -A took=()
timed() { # timed NAME CMD... : run, record wall seconds (call it outside || lists, so set -e holds)
  local name="$1" start=$SECONDS
  shift
  "$@"
  took[$name]=$((SECONDS - start))
}

# 3. Base: BASE_IMAGE if given; else the Dockerfiles' own base (ARG BASE_IMAGE) if podman has it or
#    can pull it; else the debootstrap stand-in (built once, cached). Then the stage images, with the
#    script users run.
qualified() { # qualified IMAGE: a short name as podman pulls it from Docker Hub
  local first="${1%%/*}"
  if [[ "$1" == */* && ("$first" == *.* || "$first" == *:* || "$first" == localhost) ]]; then echo "$1"
  elif [[ "$1" == */* ]]; then echo "docker.io/$1"
  else echo "docker.io/library/$1"
  fi
}
pick_base() {
  local defaults real
  defaults="$(sed -n 's/^ARG BASE_IMAGE=//p' "${STAGES[@]/%//Dockerfile}" | sort -u)"
  [[ -n "$defaults" && "$defaults" != *$'\n'* ]] || { log "the Dockerfiles' ARG BASE_IMAGE defaults differ or are missing: '${defaults//$'\n'/ }'"; return 1; }
  real="$(qualified "$defaults")"
  if podman image exists "$real"; then
    log "base image: $real (the Dockerfiles' own, present)"
  elif timeout 300 podman pull -q "$real" >/dev/null 2>"$work/pull.err"; then
    log "base image: $real (the Dockerfiles' own, pulled)"
  else
    log "base image: cannot pull $real ($(grep -m1 . "$work/pull.err" | cut -c1-160 || true)); using the debootstrap stand-in"
    "$here/make-base-image.sh" || return 1
    real="${BASE_IMAGE_NAME:-localhost/mlk-base:bookworm}"
  fi
  export BASE_IMAGE="$real"
}
build() {
  # (`|| return`: set -e does not apply inside a function called from an || list)
  if [[ -n "${BASE_IMAGE:-}" ]]; then log "base image: $BASE_IMAGE (BASE_IMAGE)"; else pick_base || return 1; fi
  BUILD_ARGS="${BUILD_ARGS:---network=host}" "$root/scripts/build-images.sh" || return 1
}
if [[ "${E2E_SKIP_BUILD:-0}" == 1 ]]; then
  log "E2E_SKIP_BUILD=1: using the images already built"
else
  log "building the base and the stage images"
  build_started=$SECONDS
  build || fail "image build"
  took[build]=$((SECONDS - build_started))
fi
with_server="${E2E_SERVER:-1}"
for s in "${STAGES[@]}"; do
  [[ "$s" == server && "$with_server" == 0 ]] && continue
  podman image exists "$IMAGE_REGISTRY/$s:$IMAGE_TAG" || fail "image $IMAGE_REGISTRY/$s:$IMAGE_TAG missing"
done

# 4. Render the manifests with the quickstart's own render code (it checks the knobs: a bad one fails here).
fl_problem="$(fl_knob_problem "$workers")"
[[ -z "$fl_problem" ]] || fail "$fl_problem"
render() { # render OUT FILE [VAR=VALUE...]
  local out="$1" file="$2"
  shift 2
  # the placeholders' samples (scripts/images.env), then this run's values
  env "${PLACEHOLDERS[@]}" WORKER_NUMBER="$workers" EPOCH="$epoch" BATCH="$batch" INCREMENTAL_NUMBER=0 \
      "$@" "$root/scripts/render.sh" "$root/manifests/$file" >"$out" \
    || fail "rendering manifests/$file"
}
render "$work/4-splitter.yaml" 4-splitter.yaml
for ((i = 0; i < workers; i++)); do
  render "$work/5-trainer-$i.yaml" 5-trainer.yaml INCREMENTAL_NUMBER="$i"
done
render "$work/6-aggregator.yaml" 6-aggregator.yaml
# Round 2: from round 1's aggregate, the aggregator needing only MIN_WORKERS models after the deadline.
for ((i = 0; i < workers; i++)); do
  render "$work/5-trainer-$i-r2.yaml" 5-trainer.yaml INCREMENTAL_NUMBER="$i" INIT_MODEL=/mnt/aggregated-model.h5
done
render "$work/6-aggregator-r2.yaml" 6-aggregator.yaml MIN_WORKERS="$min_workers" ROUND_DEADLINE="$round_deadline"
render "$work/9999-accuracy-test.yaml" 9999-accuracy-test.yaml
render "$work/9999-ledger-restore.yaml" 9999-ledger-restore.yaml
[[ "$with_server" == 0 ]] || render "$work/7-server.yaml" 7-server.yaml
log "rendered manifests for WORKER_NUMBER=$workers EPOCH=$epoch BATCH=$batch SPLIT=${SPLIT:-iid}" \
  "AGGREGATION=${AGGREGATION:-fedavg} SERVER_OPTIMIZER=${SERVER_OPTIMIZER:-none} PROX_MU=${PROX_MU:-0}" \
  "LOCAL_STEPS=${LOCAL_STEPS:-0} ATTACK=${ATTACK:-none}"

# A subset of MNIST, handed to the splitter as a user would: a mounted file + MNIST_NPZ.
"$py" - "$dataset" "$work/mnist-subset.npz" "$n_train" "$n_test" <<'PY'
import sys
import numpy as np
src, dst, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with np.load(src) as d:
    np.savez(dst, x_train=d["x_train"][:n_train], y_train=d["y_train"][:n_train],
             x_test=d["x_test"][:n_test], y_test=d["y_test"][:n_test])
PY
chmod 644 "$work/mnist-subset.npz"

# The claim: one podman volume, writable by the images' uid 10001 (as the NFS export must be).
podman volume create "$volume" >/dev/null
podman run --rm --user 0:0 --network none -v "$volume:/mnt" --entrypoint chown \
  "$IMAGE_REGISTRY/splitter:$IMAGE_TAG" 10001:10001 /mnt >/dev/null || fail "preparing the volume"

pod_args() { # pod_args YAML [e2e_pod.py options...] -> array "args"
  local yaml="$1"
  shift
  args=()
  mapfile -d '' args < <("$py" "$here/e2e_pod.py" run-args "$yaml" --volume "$volume" \
                          --configmaps "$work/4-splitter.yaml" "${pod_opts[@]}" "$@") || true
  ((${#args[@]})) || fail "cannot turn $(basename "$yaml") into a container"
}
show_logs() { log "logs of $1:"; podman logs "$1" 2>&1 | tail -n 30 | sed 's/^/    /' >&2 || true; }
run_inits() { # run_inits NAME YAML: the pod's init containers, in order, each to completion
  local n i
  n="$("$py" "$here/e2e_pod.py" inits "$2")" || fail "reading $(basename "$2")"
  for ((i = 0; i < n; i++)); do
    pod_args "$2" --init "$i"
    containers+=("$run_id-$1-init-$i")
    log "$1 (init $i): podman run ${args[*]}"
    podman run --name "$run_id-$1-init-$i" --network none "${args[@]}" || fail "init container $i of $1 exited non-zero"
  done
}
run_stage() { # run_stage NAME YAML [e2e_pod.py options...]: run to completion, exit 0 required
  local stage="$1" name="$run_id-$1" yaml="$2"
  shift 2
  run_inits "$stage" "$yaml"
  pod_args "$yaml" "$@"
  containers+=("$name")
  log "$stage: podman run ${args[*]}"
  if ! podman run --name "$name" --network none "${args[@]}" >"$work/$stage.log" 2>&1; then
    sed 's/^/    /' "$work/$stage.log" | tail -n 30 >&2
    fail "stage $stage exited non-zero"
  fi
  sed "s/^/    [$stage] /" "$work/$stage.log"
}

# Splitter.
timed splitter run_stage splitter "$work/4-splitter.yaml" \
  --add-volume "$work/mnist-subset.npz:/data/mnist.npz:ro" --add-env MNIST_NPZ=/data/mnist.npz

# Trainers in parallel; trainer 0 is killed once training is under way, then started again.
start_trainer() { # start_trainer I [ROUND_SUFFIX]: trainer I of round 1, or of the round with that suffix
  local i="$1" name="$run_id-trainer-$1${2:-}"
  pod_args "$work/5-trainer-$i${2:-}.yaml"
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  containers+=("$name")
  podman run -d --name "$name" --network none "${args[@]}" >/dev/null || fail "starting trainer $i${2:-}"
}
wait_container() { # wait_container NAME -> prints exit code
  podman wait "$1" 2>/dev/null | tail -n 1
}
kill_mid_training() { # kill_mid_training NAME: after its "model:" line (fit under way), before "saved:"
  local name="$1" waited=0 rc
  until podman logs "$name" 2>&1 | grep -q '^model:'; do
    sleep 0.2
    waited=$((waited + 1))
    ((waited < 1500)) || fail "$name never started training"
  done
  podman kill "$name" >/dev/null
  rc="$(wait_container "$name")"
  if podman logs "$name" 2>&1 | grep -q '^saved:'; then
    fail "$name finished before it could be killed (kill came too late)"
  fi
  [[ "$rc" != 0 ]] || fail "killed $name exited 0"
  killed_rc="$rc"
}
trainers() {
  local i rc
  pod_args "$work/5-trainer-0.yaml"
  log "trainer: podman run ${args[*]} (x$workers)"
  for ((i = 0; i < workers; i++)); do start_trainer "$i"; done
  kill_mid_training "$run_id-trainer-0"
  log "trainer 0 killed mid-training (exit $killed_rc); running it again as a Job retry would"
  start_trainer 0
  for ((i = 0; i < workers; i++)); do
    rc="$(wait_container "$run_id-trainer-$i")"
    podman logs "$run_id-trainer-$i" 2>&1 | sed "s/^/    [trainer-$i] /"
    [[ "$rc" == 0 ]] || fail "trainer $i exited $rc"
  done
}
timed trainers trainers

timed aggregator run_stage aggregator "$work/6-aggregator.yaml"

# Round 2 as the quickstart runs it with MIN_WORKERS < WORKER_NUMBER: the aggregator starts with the
# trainers; the last trainer is killed for good mid-training, so its round-1 model stays in /mnt/model
# (stale: the aggregator must ignore it) and after the round deadline the others' models are averaged.
round2() {
  local i rc lost=$((workers - 1)) agg="$run_id-aggregator-r2"
  pod_args "$work/5-trainer-0-r2.yaml"
  log "round 2 trainer: podman run ${args[*]} (x$workers)"
  for ((i = 0; i < workers; i++)); do start_trainer "$i" -r2; done
  pod_args "$work/6-aggregator-r2.yaml"
  containers+=("$agg")
  log "round 2 aggregator: podman run -d ${args[*]}"
  podman run -d --name "$agg" --network none "${args[@]}" >/dev/null || fail "starting the round 2 aggregator"
  kill_mid_training "$run_id-trainer-$lost-r2"
  log "trainer $lost killed for good in round 2 (exit $killed_rc); the aggregator needs $min_workers of $workers"
  for ((i = 0; i < lost; i++)); do
    rc="$(wait_container "$run_id-trainer-$i-r2")"
    podman logs "$run_id-trainer-$i-r2" 2>&1 | sed "s/^/    [trainer-$i round 2] /"
    [[ "$rc" == 0 ]] || fail "round 2 trainer $i exited $rc"
  done
  rc="$(wait_container "$agg")"
  podman logs "$agg" >"$work/aggregator-r2.log" 2>&1 || true
  sed 's/^/    [aggregator round 2] /' "$work/aggregator-r2.log"
  [[ "$rc" == 0 ]] || fail "the round 2 aggregator exited $rc"
  grep -q "ignoring $lost-model.h5: a model of an earlier round" "$work/aggregator-r2.log" ||
    fail "the round 2 aggregator did not say it ignored trainer $lost's stale round-1 model"
  grep -q "missing: $lost-model.h5" "$work/aggregator-r2.log" ||
    fail "the round 2 aggregator did not name $lost-model.h5 as missing"
}
timed round2 round2
timed accuracy run_stage accuracy "$work/9999-accuracy-test.yaml"

# 5. Checks on the volume: every shard and model there; round 1 a complete aggregation of all workers
#    (the retried trainer's model took part), round 2 of all but the lost one; the round ledger records
#    both rounds, the lost worker as missing, a test accuracy for every round and worker, hashes that
#    match the files; the history plot is there.
check_volume() {
  cat >"$work/check_volume.py" <<'PY'
import hashlib, json, sys
from pathlib import Path
import h5py, numpy as np
n, n_train = int(sys.argv[1]), int(sys.argv[2])
problems = []
sizes = [len(np.load(f"/mnt/data/{i}.npz")["y"]) for i in range(n)]
if sum(sizes) != n_train:
    problems.append(f"shards hold {sum(sizes)} samples, not {n_train}")
if not Path("/mnt/data/test.npz").is_file():
    problems.append("no data/test.npz")
for i in range(n):
    with h5py.File(f"/mnt/model/{i}-model.h5", "r") as f:
        if f.attrs.get("mlk_kind") != "worker":
            problems.append(f"model/{i}-model.h5 is not a worker model")


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def aggregate(path, workers, samples, rnd):
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
    files = sorted(x["file"] for x in json.loads(a["mlk_inputs"]))
    if (a["mlk_kind"] != "aggregated" or files != workers or int(a["mlk_samples"]) != samples
            or int(a["mlk_round"]) != rnd):
        problems.append(f"{path}: kind={a.get('mlk_kind')} round={a.get('mlk_round')} "
                        f"samples={a.get('mlk_samples')} inputs={files}")


every = [f"{i}-model.h5" for i in range(n)]
aggregate("/mnt/rounds/r1.h5", every, n_train, 1)
aggregate("/mnt/aggregated-model.h5", every[:-1], sum(sizes[:-1]), 2)
ledger = json.loads(Path("/mnt/rounds/ledger.json").read_text())
rounds = ledger.get("rounds") or []
if ledger.get("format") != "mlk-ledger/1" or [r.get("round") for r in rounds] != [1, 2]:
    print(f"volume: ledger format {ledger.get('format')}, rounds {[r.get('round') for r in rounds]}")
    sys.exit(1)
r1, r2 = rounds
for r, workers, missing, least in ((r1, every, 0, n), (r2, every[:-1], 1, n - 1)):
    got = sorted(w["file"] for w in r["workers"])
    if got != workers or r["missing"] != missing or r["expected_workers"] != n or r["min_workers"] != least:
        problems.append(f"ledger round {r['round']}: workers {got}, missing {r['missing']}, "
                        f"expected {r['expected_workers']}, min {r['min_workers']}")
    if r["test_accuracy"] is None or any(w["accuracy"] is None for w in r["workers"]):
        problems.append(f"ledger round {r['round']}: accuracies not filled in by the accuracy test")
    recorded = [(r["aggregate"]["file"], r["aggregate"]["sha256"]), (r["start"]["file"], r["start"]["sha256"])]
    for name, digest in recorded + [(w["kept"], w["sha256"]) for w in r["workers"]]:
        if sha(f"/mnt/{name}") != digest:
            problems.append(f"ledger round {r['round']}: {name} does not match its sha256")
if (r1["start"]["file"], r2["start"]["file"]) != ("rounds/r0.h5", "rounds/r1.h5"):
    problems.append(f"ledger: round starts {r1['start']['file']}, {r2['start']['file']}")
if sha("/mnt/aggregated-model.h5") != r2["aggregate"]["sha256"]:
    problems.append("aggregated-model.h5 is not the aggregate of round 2")
if Path("/mnt/rounds/history.png").read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
    problems.append("rounds/history.png is not a PNG")
if problems:
    print("volume: " + "; ".join(problems))
    sys.exit(1)
print(f"volume: {n} shards + test.npz, {n} worker models; round 1: aggregate of all {n} ({n_train} samples, "
      f"accuracy {r1['test_accuracy']:.4f}); round 2: of {n - 1} ({sum(sizes[:-1])} samples, {every[-1]} "
      f"missing, accuracy {r2['test_accuracy']:.4f}); every ledger sha256 matches; rounds/history.png written")
PY
  chmod 644 "$work/check_volume.py"
  podman run --rm --network none -v "$volume:/mnt:ro" -v "$work/check_volume.py:/check_volume.py:ro" \
    --entrypoint python "$IMAGE_REGISTRY/trainer:$IMAGE_TAG" /check_volume.py "$workers" "$n_train"
}
check_volume || fail "volume contents"

accuracy="$(tail -n 1 "$work/accuracy.log" | "$py" -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["accuracy"])')" \
  || fail "the accuracy test's last line is not {\"accuracy\": ...}"
"$py" -c "import sys; sys.exit(0 if $accuracy >= $min_accuracy else 1)" \
  || fail "accuracy $accuracy below $min_accuracy"
log "accuracy $accuracy >= $min_accuracy"

# RESUME's restore Job: it checks every recorded sha256 and names round 2 as the last complete round;
# after one kept worker model is changed by a byte, it refuses (exit 2) with one line naming that file.
restore() {
  local line digest rc
  run_stage restore "$work/9999-ledger-restore.yaml"
  line="$(tail -n 1 "$work/restore.log")"
  digest="$(podman run --rm --network none -v "$volume:/mnt:ro" --entrypoint sha256sum \
    "$IMAGE_REGISTRY/aggregator:$IMAGE_TAG" /mnt/rounds/r2.h5 | cut -d' ' -f1)"
  [[ "$line" == "{\"last_round\": 2, \"sha256\": \"$digest\"}" ]] ||
    fail "ledger restore: last line '$line', not round 2 with the sha256 of rounds/r2.h5 ($digest)"
  podman run --rm --network none --user 10001:10001 -v "$volume:/mnt" --entrypoint python \
    "$IMAGE_REGISTRY/aggregator:$IMAGE_TAG" -c "open('/mnt/rounds/r1/0-model.h5', 'ab').write(b'x')" ||
    fail "could not change rounds/r1/0-model.h5"
  pod_args "$work/9999-ledger-restore.yaml"
  containers+=("$run_id-restore-tampered")
  rc=0
  podman run --name "$run_id-restore-tampered" --network none "${args[@]}" >"$work/restore-tampered.log" 2>&1 || rc=$?
  sed 's/^/    [restore, changed file] /' "$work/restore-tampered.log"
  [[ "$rc" == 2 ]] || fail "ledger restore of a changed file exited $rc, not 2"
  if [[ "$(wc -l <"$work/restore-tampered.log")" != 1 ]] ||
    ! grep -q 'rounds/r1/0-model.h5: sha256 differs' "$work/restore-tampered.log"; then
    fail "ledger restore of a changed file did not say in one line which file differs"
  fi
  log "ledger restore: round 2 intact ($line); refused after rounds/r1/0-model.h5 changed (exit 2)"
}
timed restore restore

if [[ "$with_server" == 0 ]]; then
  echo "E2E VERDICT: INCOMPLETE - E2E_SERVER=0, batch stages passed (accuracy $accuracy), server not run"
  exit 1
fi

# Server: the Deployment's container, port published on 127.0.0.1, ready on its readinessProbe.
server() {
  local name="$run_id-server" port iport ready path probe_port waited=0
  port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  iport="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  read -r path probe_port < <("$py" "$here/e2e_pod.py" probe "$work/7-server.yaml" readinessProbe --kind Deployment) \
    || fail "7-server.yaml has no httpGet readinessProbe"
  pod_args "$work/7-server.yaml" --kind Deployment --publish "127.0.0.1:$port" --publish "127.0.0.1:$iport"
  containers+=("$name")
  log "server: podman run -d ${args[*]}"
  podman run -d --name "$name" "${args[@]}" >/dev/null || fail "starting the server"
  until ready="$(curl -fsS "http://127.0.0.1:$port$path" 2>/dev/null)"; do
    if [[ "$(podman inspect --format '{{.State.Running}}' "$name")" != true ]]; then
      show_logs "$name"
      fail "server container exited before it was ready"
    fi
    sleep 0.5
    waited=$((waited + 1))
    ((waited < 360)) || { show_logs "$name"; fail "server not ready on $path within 180 s"; }
  done
  log "server ready on $path (probe port $probe_port, published 127.0.0.1:$port): $ready"
  server_port="$port"
  internal_port="$iport" # the pod's containerPort "metrics": /metrics and the full /api/model
}
timed server server

predict() {
  "$py" - "http://127.0.0.1:$server_port/api/predict" "$root/server/static/samples/6.png" <<'PY'
import sys
import requests
url, png = sys.argv[1], sys.argv[2]
with open(png, "rb") as f:
    r = requests.post(url, files={"file": ("6.png", f, "image/png")}, timeout=30)
print(f"POST /api/predict 6.png -> {r.status_code} {r.text.strip()[:200]}")
r.raise_for_status()
body = r.json()
digit = body.get("digit")
sys.exit(0 if digit == 6 else 1)
PY
}
[[ -f "$root/server/static/samples/6.png" ]] || fail "server/static/samples/6.png missing"
predict || { show_logs "$run_id-server"; fail "the server did not answer 6 for samples/6.png"; }

# The Open Inference Protocol (v2) endpoints, the round ledger on the page and /api/model, and the
# promotion gate (the server runs with --gate-data): tests/e2e/check_v2_gate.py against the running
# container, from the trainer image (it trains the candidate models it drops onto the volume: a
# label-shuffled one must be rejected, a better one promoted).
v2_gate() {
  local rc=0
  containers+=("$run_id-v2-gate")
  podman run --name "$run_id-v2-gate" --network host --user 10001:10001 --group-add 10001 --read-only \
    --security-opt no-new-privileges --cap-drop ALL --tmpfs /tmp \
    --env HOME=/tmp --env HDF5_USE_FILE_LOCKING=FALSE --env TF_CPP_MIN_LOG_LEVEL=2 \
    --volume "$volume:/mnt" --volume "$here/check_v2_gate.py:/check_v2_gate.py:ro" \
    --volume "$root/server/static/samples/6.png:/6.png:ro" \
    --entrypoint python "$IMAGE_REGISTRY/trainer:$IMAGE_TAG" /check_v2_gate.py "http://127.0.0.1:$server_port" \
    --internal "http://127.0.0.1:$internal_port" \
    --model /mnt/aggregated-model.h5 --test /mnt/data/test.npz --train /mnt/data/0.npz --sample /6.png:6 \
    --expect-round 2 >"$work/v2-gate.log" 2>&1 || rc=$?
  sed 's/^/    [v2 + gate] /' "$work/v2-gate.log"
  ((rc == 0)) || { show_logs "$run_id-server"; fail "v2 endpoints, ledger display or promotion gate: check failed (exit $rc)"; }
  log "v2 + gate: $(tail -n 1 "$work/v2-gate.log")"
}
timed v2gate v2_gate

# 6. Summary.
echo
echo "== e2e summary (WORKER_NUMBER=$workers EPOCH=$epoch BATCH=$batch, $n_train train / $n_test test samples)"
printf '%-12s %-34s %8s\n' stage image "size MB"
for s in "${STAGES[@]}"; do
  size="$(podman image inspect --format '{{.Size}}' "$IMAGE_REGISTRY/$s:$IMAGE_TAG")"
  printf '%-12s %-34s %8d\n' "$s" "$IMAGE_REGISTRY/$s:$IMAGE_TAG" "$((size / 1000000))"
done
printf '%-12s %8s\n' step "wall s"
for k in build splitter trainers aggregator round2 accuracy restore server v2gate; do
  [[ -n "${took[$k]:-}" ]] && printf '%-12s %8d\n' "$k" "${took[$k]}"
done
printf '%-12s %8d\n' total "$((SECONDS - t0))"
echo "accuracy     $accuracy (threshold $min_accuracy)"
echo "E2E VERDICT: PASS - $workers workers (round 1: one killed and retried; round 2: one lost, $min_workers averaged), ledger checked and restored, accuracy $accuracy, server answered 6, v2 + gate checked, in $((SECONDS - t0)) s"
