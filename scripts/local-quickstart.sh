#!/usr/bin/env bash
# The whole pipeline on this machine, no Kubernetes: split MNIST -> WORKER_NUMBER trainers in
# parallel -> FedAvg aggregate, for ROUNDS rounds -> accuracy test -> (SERVE=1) prediction server.
# WORK_DIR is laid out like the cluster's NFS volume (docs/CONTRACTS.md).
#
# Environment (defaults in brackets):
#   WORKER_NUMBER [3]   trainers (= shards), run as parallel processes sharing the cores
#   EPOCH [2]           epochs per trainer per round
#   BATCH [100]         batch size
#   ROUNDS [2]          rounds; round r's trainers start from round r-1's aggregated model
#   MNIST_NPZ []        local Keras-layout mnist.npz (unset: the splitter downloads it)
#   WORK_DIR [./work]   data/, model/, logs/, aggregated-model.h5
#   SERVE [1]           1: start server/server.py first, so its page shows the run live (--progress-dir WORK_DIR),
#                       and keep it serving the result; 0: no server, stop after the accuracy test
#   PORT [5000]         the server's port
#   INTERNAL_PORT [9090]  the server's internal port (/metrics and the full /api/model; docs/serving.md)
#   SERVER_HOST [127.0.0.1]  the address it listens on (0.0.0.0: reachable from other machines too)
#   VENV [<repo>/.venv] the virtualenv (created/updated by scripts/bootstrap.sh)
#   MIN_WORKERS [WORKER_NUMBER]  a round goes on with this many workers' models (a count, or a fraction of
#                       WORKER_NUMBER rounded up, e.g. 0.67, as on Kubernetes) when others fail or miss
#                       ROUND_DEADLINE (the missing ones are recorded in the ledger); fewer: the run fails
#   ROUND_DEADLINE []   seconds a round's trainers get; then those still training are stopped and left out
#                       (fewer than MIN_WORKERS done: the run fails). Empty: no deadline, as before
#   Federated learning (docs/CONTRACTS.md "Runner knobs"; the defaults change nothing):
#   SPLIT [iid]         iid or label-skew (each worker gets a few mostly single-digit runs: splitter --strategy)
#   AGGREGATION [fedavg]  fedavg, median, trimmed-mean or krum (aggregator --aggregation)
#   SERVER_OPTIMIZER [none]  none, fedavgm or fedadam: a server step over the round's update
#   SERVER_LR []        its learning rate (empty: the optimiser's default, fedavgm 1, fedadam 0.01)
#   SERVER_MOMENTUM []  fedavgm's momentum (empty: 0.9)
#   PROX_MU [0]         FedProx: the trainers' proximal term mu (0: off)
#   LOCAL_STEPS [0]     at most this many batches per trainer per round (0: EPOCH whole epochs)
#   ATTACK []           K:KIND makes worker K hostile (shuffled-labels, sign-flip, scale10, backdoor): demos, benchmarks
#   PRESET []           NAME loads scripts/presets/NAME.env (e.g. label-skew), for the knobs not set otherwise
#   RESUME [0]          1: continue from the last complete round of WORK_DIR/rounds/ledger.json (its sha256s
#                       are checked first); 0: a new run (WORK_DIR's rounds/ and aggregated model are removed)
# Each round is kept in WORK_DIR/rounds/ (r{n}.h5, its inputs in r{n}/, ledger.json, the plot history.png).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="local-quickstart"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
no_arguments "$@"
load_preset "$root/scripts/presets" # PRESET=NAME: its knobs, where the environment sets none

fail() { # fail STAGE MESSAGE...: one clear line naming the stage, then exit 1
  local stage="$1"
  shift
  printf '%s: stage %s failed: %s\n' "$me" "$stage" "$*" >&2
  exit 1
}

# --- configuration ----------------------------------------------------------------------------
WORKER_NUMBER="${WORKER_NUMBER:-3}"
EPOCH="${EPOCH:-2}"
BATCH="${BATCH:-100}"
ROUNDS="${ROUNDS:-2}"
MNIST_NPZ="${MNIST_NPZ:-}"
WORK_DIR="${WORK_DIR:-./work}"
SERVE="${SERVE:-1}"
PORT="${PORT:-5000}"
INTERNAL_PORT="${INTERNAL_PORT:-9090}"
SERVER_HOST="${SERVER_HOST:-127.0.0.1}"
VENV="${VENV:-$root/.venv}"
MIN_WORKERS="${MIN_WORKERS:-$WORKER_NUMBER}"
ROUND_DEADLINE="${ROUND_DEADLINE:-}"
RESUME="${RESUME:-0}"

for name in WORKER_NUMBER EPOCH BATCH ROUNDS PORT INTERNAL_PORT; do
  value="${!name}"
  if ! positive_int "$value"; then
    fail config "$name must be a positive integer, got '$value'"
  fi
done
((PORT <= 65535)) || fail config "PORT must be at most 65535, got '$PORT'"
((INTERNAL_PORT <= 65535 && INTERNAL_PORT != PORT)) ||
  fail config "INTERNAL_PORT must be at most 65535 and differ from PORT ($PORT), got '$INTERNAL_PORT'"
[[ "$SERVE" == 0 || "$SERVE" == 1 ]] || fail config "SERVE must be 0 or 1, got '$SERVE'"
[[ -n "$WORK_DIR" ]] || fail config "WORK_DIR must not be empty"
MIN_WORKERS="$(min_workers_count "$MIN_WORKERS" "$WORKER_NUMBER")" ||
  fail config "MIN_WORKERS must be a whole number >= 1 or a fraction between 0 and 1 (e.g. 0.67), got '$MIN_WORKERS'"
((MIN_WORKERS <= WORKER_NUMBER)) || fail config "MIN_WORKERS must be at most WORKER_NUMBER ($WORKER_NUMBER), got '$MIN_WORKERS'"
[[ -z "$ROUND_DEADLINE" ]] || positive_int "$ROUND_DEADLINE" ||
  fail config "ROUND_DEADLINE must be empty or a positive integer (seconds), got '$ROUND_DEADLINE'"
[[ "$RESUME" == 0 || "$RESUME" == 1 ]] || fail config "RESUME must be 0 or 1, got '$RESUME'"
problem="$(fl_knob_problem "$WORKER_NUMBER")"
[[ -z "$problem" ]] || fail config "$problem"
fl_flags # splitter_fl, trainer_fl, aggregator_fl: what SPLIT ... LOCAL_STEPS add (nothing at the defaults)

# --- timing -----------------------------------------------------------------------------------
now_ms() { local t="${EPOCHREALTIME//[.,]/}"; echo $((t / 1000)); }
seconds() { printf '%d.%01d' $(($1 / 1000)) $((($1 % 1000) / 100)); }
stage_names=()
stage_ms=()
stage_started=0
begin() { stage_started="$(now_ms)"; say "== $1"; }
finish() { # finish NAME: record and print how long the stage took
  local took=$(($(now_ms) - stage_started))
  stage_names+=("$1")
  stage_ms+=("$took")
  say "== $1 done in $(seconds "$took")s"
}
run_started="$(now_ms)"

# --- children: the round loop and the fork server run in their own process groups, so they can be
# stopped as a whole (the round loop stops its trainers when it is stopped) --------------------
set -m
rounds_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
stop_rounds() {
  [[ -z "$rounds_pid" ]] || kill -TERM -- "-$rounds_pid" 2>/dev/null || true
  rounds_pid=""
}
zygote_pid=""
zygote_dir=""
stop_zygote() {
  [[ -z "$zygote_pid" ]] || kill -TERM -- "-$zygote_pid" 2>/dev/null || true
  [[ -z "$zygote_dir" ]] || rm -rf "$zygote_dir"
  zygote_pid=""
  zygote_dir=""
}
server_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
stop_server() {
  [[ -z "$server_pid" ]] || kill -TERM -- "-$server_pid" 2>/dev/null || true
  server_pid=""
}
trap 'stop_rounds; stop_zygote; stop_server' EXIT
trap 'printf "\n%s: interrupted; stopping trainers\n" "$me" >&2; exit 130' INT TERM

# run_logged STAGE LOG CMD...: run a stage, show its output and keep it in LOG
run_logged() {
  local stage="$1" log="$2"
  shift 2
  local rc=0
  "$@" </dev/null 2>&1 | tee "$log" || rc=$?
  ((rc == 0)) || fail "$stage" "exit code $rc (log: $log)"
}

# --- set-up -----------------------------------------------------------------------------------
say "WORKER_NUMBER=$WORKER_NUMBER EPOCH=$EPOCH BATCH=$BATCH ROUNDS=$ROUNDS SERVE=$SERVE WORK_DIR=$WORK_DIR" \
  "MIN_WORKERS=$MIN_WORKERS ROUND_DEADLINE=${ROUND_DEADLINE:-none} RESUME=$RESUME"
[[ -z "${PRESET:-}" ]] || say "PRESET=$PRESET (scripts/presets/$PRESET.env)"
say "SPLIT=$SPLIT AGGREGATION=$AGGREGATION SERVER_OPTIMIZER=$SERVER_OPTIMIZER SERVER_LR=${SERVER_LR:-default}" \
  "SERVER_MOMENTUM=${SERVER_MOMENTUM:-default} PROX_MU=$PROX_MU LOCAL_STEPS=$LOCAL_STEPS ATTACK=${ATTACK:-none}"
begin setup
# The web server's front is nginx (docs/serving.md): checked before any training, installed as root on Debian.
if [[ "$SERVE" == 1 ]] && ! PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin" command -v nginx >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing nginx-light (the prediction server's front)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } ||
      fail setup "apt-get could not install nginx-light"
  else
    fail setup "SERVE=1 needs nginx, the prediction server's front: install it (Debian: sudo apt-get install nginx-light), or run with SERVE=0"
  fi
fi
VENV="$VENV" "$root/scripts/bootstrap.sh" || fail setup "scripts/bootstrap.sh could not prepare $VENV"
py="$VENV/bin/python"
mkdir -p "$WORK_DIR" || fail setup "cannot create WORK_DIR $WORK_DIR"
work="$(cd "$WORK_DIR" && pwd)"
mkdir -p "$work/data" "$work/model" "$work/logs" || fail setup "cannot create directories in $work"
export PYTHONUNBUFFERED=1
cores="$(nproc)"
# Each trainer may use up to twice its share of the cores (at most all of them): when the first trainers of a
# round finish, the last ones fill the cores instead of leaving them idle. With an exact share (1 thread
# each for 3 trainers on 2 cores) the kernel ran two trainers on one core and one on the other, and a round
# lasted 42 s instead of 35 s (measured, docs/benchmarks.md).
threads=$(((2 * cores + WORKER_NUMBER - 1) / WORKER_NUMBER))
((threads <= cores)) || threads=$cores
((threads >= 1)) || threads=1
say "$cores cores: $WORKER_NUMBER trainers with $threads TensorFlow thread(s) each"
# The trainers and the accuracy test run as forks of one process that has imported TensorFlow already
# (scripts/zygote.py): about 4 CPU-seconds saved per run of them, ten runs at the defaults. Without it
# (it failed to start), each program simply starts on its own.
zygote_dir="$(mktemp -d "${TMPDIR:-/tmp}/mlk-zygote.XXXXXX")" || fail setup "cannot create a temporary directory"
"$py" "$root/scripts/zygote.py" serve --socket "$zygote_dir/socket" </dev/null >"$work/logs/zygote.log" 2>&1 &
zygote_pid=$!
tf_program=("$py" "$root/scripts/zygote.py" run --socket "$zygote_dir/socket" --)
first_round=1
if [[ "$RESUME" == 1 ]]; then
  # Verify every sha256 in the ledger, then put the last complete round's aggregate back in place.
  restored="$("$py" "$root/aggregator/ledger.py" restore --dir "$work")" ||
    fail resume "the ledger $work/rounds/ledger.json cannot be resumed from (above); start a new run with RESUME=0"
  printf '%s\n' "$restored"
  last_round="$(tail -n 1 <<<"$restored" | "$py" -c 'import json, sys; print(json.load(sys.stdin)["last_round"])')"
  first_round=$((last_round + 1))
  say "resuming: rounds 1..$last_round are complete and verified; continuing with round $first_round of $ROUNDS"
else
  rm -rf "$work/rounds" "$work/aggregated-model.h5" "$work/aggregated-model.progress.json" "$work/model" ||
    fail setup "cannot clear $work/rounds"
  mkdir -p "$work/model" || fail setup "cannot create $work/model"
fi
finish setup

# --- the server, first: its page shows the run as it happens -----------------------------------
# Started before the split (SERVE=1), so the page says "training" from the start and follows every round
# (server.py --progress-dir: the progress files the trainers and the aggregator write in WORK_DIR); it picks
# up each aggregate as it lands and keeps serving the last one when training ends. Its log: logs/server.log.
start_server() {
  say "serving at http://$SERVER_HOST:$PORT/ from now on (the page shows training live; log: $work/logs/server.log)"
  "$py" "$root/server/server.py" --model "$work/aggregated-model.h5" --host "$SERVER_HOST" --port "$PORT" \
    --internal-port "$INTERNAL_PORT" --progress-dir "$work" </dev/null >"$work/logs/server.log" 2>&1 &
  server_pid=$!
}
check_server() { # the server must still run; else its log's last lines and the stage fails
  [[ -z "$server_pid" ]] || kill -0 "$server_pid" 2>/dev/null && return 0
  tail -n 5 "$work/logs/server.log" >&2 || true
  fail serve "server/server.py exited (log: $work/logs/server.log)"
}
if [[ "$SERVE" == 1 && -f "$root/server/server.py" ]]; then
  start_server
fi

# --- split ------------------------------------------------------------------------------------
begin split
dataset=()
[[ -z "$MNIST_NPZ" ]] || dataset=(--dataset "$MNIST_NPZ")
run_logged split "$work/logs/split.log" \
  "$py" "$root/splitter/splitter.py" --n_container "$WORKER_NUMBER" --savedir "$work/data" "${dataset[@]}" \
  "${splitter_fl[@]}"
finish split
check_server

# --- rounds of parallel training + aggregation ------------------------------------------------
# The round loop and its rules (K of N, the round deadline, lost and late workers) are scripts/rounds.py's;
# it runs the trainers as processes, each in its own process group, and prints each stage as this script does.
timings="$work/logs/round-timings.tsv"
k_of_n=()
((MIN_WORKERS == WORKER_NUMBER)) || k_of_n=(--min-workers "$MIN_WORKERS")
[[ -z "$ROUND_DEADLINE" ]] || k_of_n+=(--deadline "$ROUND_DEADLINE")
for arg in "${trainer_fl[@]}"; do k_of_n+=("--trainer-arg=$arg"); done
for arg in "${aggregator_fl[@]}"; do k_of_n+=("--aggregator-arg=$arg"); done
[[ -z "$ATTACK" ]] || k_of_n+=(--attack "$ATTACK")
if ((first_round <= ROUNDS)); then
  "$py" "$root/scripts/rounds.py" local --work "$work" --workers "$WORKER_NUMBER" --epoch "$EPOCH" \
    --batch "$BATCH" --rounds "$ROUNDS" --first-round "$first_round" --threads "$threads" --python "$py" \
    --me "$me" --timings "$timings" --score-data "$work/data/test.npz" "${k_of_n[@]}" -- "${tf_program[@]}" </dev/null &
  rounds_pid=$!
  rc=0
  wait "$rounds_pid" || rc=$?
  rounds_pid=""
  ((rc == 0)) || exit "$rc" # rounds.py named the stage and the reason
  while IFS=$'\t' read -r name ms; do
    stage_names+=("$name")
    stage_ms+=("$ms")
  done <"$timings"
fi

# --- accuracy test ----------------------------------------------------------------------------
begin evaluate
run_logged evaluate "$work/logs/evaluate.log" \
  "${tf_program[@]}" evaluate.py --modelpath "$work/aggregated-model.h5" --data "$work/data/test.npz" \
  --ledger "$work/rounds/ledger.json"
accuracy="$(tail -n 1 "$work/logs/evaluate.log" |
  "$py" -c 'import json, sys; print("%.4f" % json.load(sys.stdin)["accuracy"])')" ||
  fail evaluate "no JSON result line in $work/logs/evaluate.log"
finish evaluate
stop_zygote

# --- summary ----------------------------------------------------------------------------------
total=$(($(now_ms) - run_started))
echo
echo "== summary: $WORKER_NUMBER workers x $EPOCH epochs x $ROUNDS rounds, batch $BATCH"
for k in "${!stage_names[@]}"; do
  printf '   %-28s %8ss\n' "${stage_names[$k]}" "$(seconds "${stage_ms[$k]}")"
done
printf '   %-28s %8ss\n' "total" "$(seconds "$total")"
echo "   test accuracy: $accuracy"
echo "   model: $work/aggregated-model.h5"
echo "   history: $work/rounds/ledger.json, plot $work/rounds/history.png"

# --- serve ------------------------------------------------------------------------------------
if [[ "$SERVE" == 1 ]]; then
  if [[ -n "$server_pid" ]]; then
    check_server
    say "serving the model at http://$SERVER_HOST:$PORT/, metrics at http://$SERVER_HOST:$INTERNAL_PORT/metrics (Ctrl-C to stop; again later without training: .venv/bin/python server/server.py --model $work/aggregated-model.h5 --host $SERVER_HOST --port $PORT --internal-port $INTERNAL_PORT)"
    trap 'printf "\n%s: stopping the server\n" "$me" >&2; exit 0' INT TERM # the EXIT trap stops it
    rc=0
    wait "$server_pid" || rc=$?
    server_pid=""
    exit "$rc"
  fi
  say "the prediction server (server/server.py) is not available yet; stopping after the accuracy test"
fi
exit 0
