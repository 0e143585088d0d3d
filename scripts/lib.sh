# shellcheck shell=bash
# What the project's shell scripts share, sourced after each sets `me` (its name in messages):
#   usage           print the calling script's header comment (line 2 to the first non-comment line)
#   no_arguments "$@"   -h/--help: usage, exit 0; anything else: one line, exit 2
#   unknown_argument ARG  one line naming ARG, exit 2
#   say MESSAGE     "HH:MM:SS me: MESSAGE" on stdout (on stderr when SAY_TO_STDERR=1)
#   warn MESSAGE    "HH:MM:SS me: warning: MESSAGE" on stderr
#   die MESSAGE     "me: MESSAGE" on stderr, exit DIE_CODE (default 1)
#   positive_int VALUE  true for 1..999999999
#   ip2int A.B.C.D / int2ip N   an IPv4 address as a number and back
#   current_namespace KUBECTL...  the namespace KUBECTL (its words: -n, --context ...) works in
#   min_workers_count VALUE N   MIN_WORKERS as a count of N workers: a whole number >= 1, or a fraction
#                   0 < f < 1 of N rounded up (as aggregator.py's --min-workers); fails on anything else
#   load_preset DIR  PRESET=NAME: set each knob of DIR/NAME.env that the environment leaves unset (and export it)
#   fl_knob_defaults / fl_knob_problem N  the federated-learning knobs (SPLIT, AGGREGATION, SERVER_OPTIMIZER,
#                   SERVER_LR, SERVER_MOMENTUM, PROX_MU, LOCAL_STEPS, ATTACK) given their defaults / the first
#                   thing wrong with them for N workers ("" when none)
#   fl_flags        sets splitter_fl, trainer_fl and aggregator_fl: the flags the knobs add (none at the defaults)
#   fl_attack_of I  the --attack KIND of worker I (ATTACK=I:KIND), "" for an honest one
#   go_env CACHE    sets go_cmd to a Go toolchain (GO; else a go 1.26+ on PATH; else the pinned one from
#                   the Go module proxy, fetched once into CACHE/go by scripts/fetch-go.py) and exports the
#                   build's caches under CACHE
: "${me:?set me before sourcing scripts/lib.sh}"
usage() { sed -n '2,/^[^#]/{/^[^#]/d;s/^# \{0,1\}//;p}' "$0"; }
unknown_argument() { echo "$me: unknown argument '$1' (try --help)" >&2; exit 2; }
no_arguments() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      *) unknown_argument "$arg" ;;
    esac
  done
}
say() {
  if [[ "${SAY_TO_STDERR:-0}" == 1 ]]; then
    printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$me" "$*" >&2
  else
    printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$me" "$*"
  fi
}
warn() { printf '%s %s: warning: %s\n' "$(date -u +%H:%M:%S)" "$me" "$*" >&2; }
die() { printf '%s: %s\n' "$me" "$*" >&2; exit "${DIE_CODE:-1}"; }
positive_int() { [[ "$1" =~ ^[1-9][0-9]{0,8}$ ]]; }
ip2int() { local IFS=. a b c d; read -r a b c d <<<"$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }
int2ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
current_namespace() {
  local ns
  # a -n/--namespace among the words shows in what a client-side dry run would create; else the context's
  ns="$("$@" create configmap mlk-namespace-probe --dry-run=client -o 'jsonpath={.metadata.namespace}' 2>/dev/null </dev/null || true)"
  [[ -n "$ns" ]] || ns="$("$@" config view --minify -o 'jsonpath={..namespace}' 2>/dev/null || true)"
  printf '%s' "${ns:-default}"
}
min_workers_count() {
  if [[ "$1" =~ ^0?\.0*[1-9][0-9]{0,8}$ ]]; then
    awk -v f="$1" -v n="$2" 'BEGIN { k = f * n; c = int(k); if (c < k) c++; print c }'
  elif positive_int "$1"; then
    echo "$1"
  else
    return 1
  fi
}
go_at_least() { # go_at_least GO MAJOR.MINOR: true when that go command is that version or newer
  local version major minor
  version="$(GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null)" || return 1
  [[ "$version" =~ ^go([0-9]+)\.([0-9]+) ]] || return 1
  major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
  ((major > ${2%%.*} || (major == ${2%%.*} && minor >= ${2#*.})))
}
go_env() {
  local cache="$1" lib_dir
  lib_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  if [[ -n "${GO:-}" ]]; then
    go_cmd="$GO"
    command -v "$go_cmd" >/dev/null 2>&1 || die "GO='$GO' is not a command"
  elif command -v go >/dev/null 2>&1 && go_at_least go 1.26; then
    go_cmd=go
  else
    say "no Go 1.26+ on PATH: fetching the pinned toolchain from the Go module proxy into $cache/go"
    go_cmd="$(python3 "$lib_dir/fetch-go.py" --dest "$cache/go")" || die "no Go toolchain: install Go 1.26 or newer, or set GO"
  fi
  export GOMODCACHE="$cache/gomod" GOCACHE="$cache/gocache" GOFLAGS="-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0
  export GOPATH="$cache/gopath"
}
# kubectl_bin: the kubectl to use (local-cluster.sh, real-node.sh): .venv's (scripts/bootstrap.sh --dev
# installs it), else one on PATH; dies naming bootstrap.sh when there is none
kubectl_bin() {
  local k
  k="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/kubectl"
  [[ -x "$k" ]] || k="$(command -v kubectl || true)"
  [[ -n "$k" ]] || die "kubectl not found: run scripts/bootstrap.sh --dev (it installs kubectl into .venv)"
  printf '%s' "$k"
}

# --- federated-learning knobs (issue 31; docs/CONTRACTS.md "Runner knobs") ------------------------------------
PRESET_KNOBS=(SPLIT AGGREGATION SERVER_OPTIMIZER SERVER_LR SERVER_MOMENTUM PROX_MU LOCAL_STEPS ATTACK ROUNDS EPOCH BATCH)
load_preset() { # load_preset DIR
  [[ -n "${PRESET:-}" ]] || return 0
  local file="$1/${PRESET}.env" line name known
  if ! [[ "$PRESET" =~ ^[a-z0-9-]+$ && -f "$file" ]]; then
    known="$(find "$1" -maxdepth 1 -name '*.env' -printf '%f ' 2>/dev/null | sed 's/\.env / /g')"
    die "PRESET must name a file of $1 (${known% }), got '$PRESET'"
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^([A-Z_]+)=([A-Za-z0-9._:-]*)$ ]] || die "$file: not a NAME=VALUE line: '$line'"
    name="${BASH_REMATCH[1]}"
    [[ " ${PRESET_KNOBS[*]} " == *" $name "* ]] || die "$file: $name is not a knob a preset may set (${PRESET_KNOBS[*]})"
    [[ -n "${!name:-}" ]] || export "$name=${BASH_REMATCH[2]}"
  done <"$file"
}
fl_knob_defaults() {
  SPLIT="${SPLIT:-iid}"
  AGGREGATION="${AGGREGATION:-fedavg}"
  SERVER_OPTIMIZER="${SERVER_OPTIMIZER:-none}"
  SERVER_LR="${SERVER_LR:-}"
  SERVER_MOMENTUM="${SERVER_MOMENTUM:-}"
  PROX_MU="${PROX_MU:-0}"
  LOCAL_STEPS="${LOCAL_STEPS:-0}"
  ATTACK="${ATTACK:-}"
}
fl_knob_problem() { # fl_knob_problem N: prints the first bad knob's message (nothing when all are good)
  local number='^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$'
  fl_knob_defaults
  case "$SPLIT" in iid | label-skew) ;; *) echo "SPLIT must be iid or label-skew, got '$SPLIT'"; return ;; esac
  case "$AGGREGATION" in fedavg | median | trimmed-mean | krum) ;;
    *) echo "AGGREGATION must be fedavg, median, trimmed-mean or krum, got '$AGGREGATION'"; return ;; esac
  case "$SERVER_OPTIMIZER" in none | fedavgm | fedadam) ;;
    *) echo "SERVER_OPTIMIZER must be none, fedavgm or fedadam, got '$SERVER_OPTIMIZER'"; return ;; esac
  if [[ -n "$SERVER_LR$SERVER_MOMENTUM" && "$SERVER_OPTIMIZER" == none ]]; then
    echo "SERVER_LR and SERVER_MOMENTUM need SERVER_OPTIMIZER=fedavgm or fedadam"; return
  fi
  [[ -z "$SERVER_MOMENTUM" || "$SERVER_OPTIMIZER" == fedavgm ]] || { echo "SERVER_MOMENTUM needs SERVER_OPTIMIZER=fedavgm"; return; }
  [[ -z "$SERVER_LR" || "$SERVER_LR" =~ $number ]] || { echo "SERVER_LR must be a number > 0, got '$SERVER_LR'"; return; }
  [[ -z "$SERVER_MOMENTUM" || "$SERVER_MOMENTUM" =~ $number ]] ||
    { echo "SERVER_MOMENTUM must be a number 0 <= m < 1, got '$SERVER_MOMENTUM'"; return; }
  [[ "$PROX_MU" =~ $number ]] || { echo "PROX_MU must be a number >= 0, got '$PROX_MU'"; return; }
  [[ "$LOCAL_STEPS" =~ ^[0-9]{1,9}$ ]] || { echo "LOCAL_STEPS must be a whole number >= 0 (0: whole epochs), got '$LOCAL_STEPS'"; return; }
  if [[ -n "$ATTACK" ]]; then
    if ! [[ "$ATTACK" =~ ^([0-9]{1,9}):(shuffled-labels|sign-flip|scale10|backdoor)$ ]] || ((BASH_REMATCH[1] >= $1)); then
      echo "ATTACK must be K:KIND, K a worker 0..$(($1 - 1)) and KIND shuffled-labels, sign-flip, scale10 or backdoor, got '$ATTACK'"
    fi
  fi
}
fl_flags() {
  fl_knob_defaults
  splitter_fl=() trainer_fl=() aggregator_fl=()
  [[ "$SPLIT" == iid ]] || splitter_fl+=(--strategy "$SPLIT")
  [[ "$PROX_MU" =~ ^0*\.?0*$ ]] || trainer_fl+=(--prox-mu "$PROX_MU")
  [[ "$LOCAL_STEPS" =~ ^0+$ ]] || trainer_fl+=(--steps "$((10#$LOCAL_STEPS))")
  [[ "$AGGREGATION" == fedavg ]] || aggregator_fl+=(--aggregation "$AGGREGATION")
  [[ "$SERVER_OPTIMIZER" == none ]] || aggregator_fl+=(--server-optimizer "$SERVER_OPTIMIZER")
  [[ -z "$SERVER_LR" ]] || aggregator_fl+=(--server-lr "$SERVER_LR")
  [[ -z "$SERVER_MOMENTUM" ]] || aggregator_fl+=(--server-momentum "$SERVER_MOMENTUM")
  return 0
}
fl_attack_of() { # fl_attack_of I
  if [[ -n "${ATTACK:-}" && "${ATTACK%%:*}" =~ ^[0-9]+$ ]] && ((10#${ATTACK%%:*} == $1)); then echo "${ATTACK#*:}"; fi
}
