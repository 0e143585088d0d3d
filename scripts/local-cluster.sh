#!/usr/bin/env bash
# A local Kubernetes cluster for trying the quickstart and the manifests without a cloud: the real
# kube-apiserver, etcd, kube-controller-manager and kube-scheduler, built from their Go modules, with
# three kwok nodes (simulated: pods are scheduled and get a status, no container runs). Nothing is
# downloaded at run time; the first `up` builds the binaries once into the cache folder.
#
#   scripts/local-cluster.sh up       build (first time), start, print KUBECONFIG=<path> as the last line
#   scripts/local-cluster.sh up --node real   the same plus this machine as a real node (kubelet and
#                                     containerd: scripts/real-node.sh, docs/real-node.md) that takes the
#                                     workloads, so the project's images really run
#   scripts/local-cluster.sh down     stop the cluster (and a real node) and remove its state (the build cache is kept)
#   scripts/local-cluster.sh build    only build the binaries
#   scripts/local-cluster.sh env      print KUBECONFIG=<path> of the running cluster
#
# Then:  export KUBECONFIG=...; NFS_BACKEND=pvc scripts/quickstart.sh
# What it proves and what it does not: docs/kubernetes.md ("The local control plane").
#
# Environment (defaults in brackets):
#   LOCAL_CLUSTER_CACHE [<project>/.cache/local-cluster]  build cache and cluster state (git-ignored)
#   LOCAL_CLUSTER_NAME [mlk]    cluster name
#   GO [go on PATH if 1.26+, else Go 1.26.8 fetched once from the Go module proxy: scripts/fetch-go.py]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="local-cluster"
SAY_TO_STDERR=1 # stdout's last line is KUBECONFIG=...
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
# The pinned releases (KUBE_VERSION, ETCD_VERSION, KWOK_VERSION), shared with real-node.sh.
# shellcheck source=scripts/versions.env
source "$root/scripts/versions.env"

verb="" node=kwok expect_node=0
for arg in "$@"; do
  if ((expect_node)); then
    node="$arg" expect_node=0
    continue
  fi
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    up | down | build | env) [[ -z "$verb" ]] || { echo "$me: one verb only (up, down, build, env)" >&2; exit 2; }; verb="$arg" ;;
    --node) expect_node=1 ;;
    --node=*) node="${arg#--node=}" ;;
    *) unknown_argument "$arg" ;;
  esac
done
((expect_node == 0)) || { echo "$me: --node needs a value: kwok or real" >&2; exit 2; }
[[ "$node" == kwok || "$node" == real ]] || { echo "$me: --node must be kwok or real, got '$node'" >&2; exit 2; }
[[ -n "$verb" ]] || { echo "$me: say up, down, build or env (try --help)" >&2; exit 2; }

cache="${LOCAL_CLUSTER_CACHE:-$root/.cache/local-cluster}"
name="${LOCAL_CLUSTER_NAME:-mlk}"
[[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "LOCAL_CLUSTER_NAME must be lower-case letters, digits and -, got '$name'"
bin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
export KWOK_WORKDIR="$cache/kwok"
kubeconfig="$KWOK_WORKDIR/clusters/$name/kubeconfig.yaml"

# --- build ------------------------------------------------------------------------------------------
# go_do WHAT CMD...: run a go command, its output in a log; on failure one line naming the log's last error
go_do() {
  local what="$1" log
  shift
  log="$cache/logs/build-${what// /-}.log"
  mkdir -p "$cache/logs"
  if ! "$@" >"$log" 2>&1; then
    # the reason: go's last line usually (the module proxy's answer, the compile error), not its progress
    die "building $what failed: $(grep -v -E '^go: (downloading|finding|extracting) ' "$log" | tail -n 1 | sed 's/^[[:space:]]*//') (full log: $log)"
  fi
}

build_kubernetes() { # build_kubernetes CMD...: commands of k8s.io/kubernetes/cmd
  local src="$cache/src/kubernetes-$KUBE_VERSION" staging_version="v0.${KUBE_VERSION#v1.}" mod modinfo
  local cmds=("$@")
  local missing=0 c
  for c in "${cmds[@]}"; do [[ -x "$bin/$c" ]] || missing=1; done
  ((missing)) || return 0
  say "building Kubernetes $KUBE_VERSION (${cmds[*]}) into $bin: several minutes per binary on 2 cores, once"
  mkdir -p "$src" "$bin"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths, so
  # `go install` refuses it. A wrapper module pins each staging module the main module requires to
  # the matching v0.Y.Z, listed from the published go.mod rather than typed here.
  modinfo="$("$go_cmd" mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>&1)" ||
    die "the Go module proxy gave no k8s.io/kubernetes@$KUBE_VERSION: $(grep -m1 -E '"Error"|go: ' <<<"$modinfo" || tail -n 1 <<<"$modinfo")"
  mod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$modinfo")"
  [[ -f "$mod" ]] || die "the Go proxy gave no go.mod for k8s.io/kubernetes@$KUBE_VERSION"
  {
    printf 'module mlk.local/kubernetes-build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
    # staging modules: the replace block's k8s.io/* entries that the require blocks also name
    comm -12 <(sed -n '/^replace (/,/^)/{s/^[[:space:]]*\(k8s\.io\/[^ ]*\) => .*/\1/p}' "$mod" | sort -u) \
      <(sed -n '/^require (/,/^)/{s/^[[:space:]]*\(k8s\.io\/[^ ]*\) .*/\1/p}' "$mod" | sort -u) |
      sed "s|.*|\t& => & $staging_version|"
    printf ')\n'
  } >"$src/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
    printf ')\n'
  } >"$src/tools.go"
  (cd "$src" && go_do "kubernetes modules" "$go_cmd" mod tidy)
  # The version the binaries report (kubectl version, skew checks), as Kubernetes' own build sets it.
  local minor="${KUBE_VERSION#v1.}" ldflags="" pkg
  minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  for c in "${cmds[@]}"; do
    [[ -x "$bin/$c" ]] && continue
    say "building $c"
    (cd "$src" && go_do "$c" "$go_cmd" build -trimpath -ldflags="-s -w $ldflags" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$bin/$c.tmp" "$bin/$c"
  done
}

build_etcd() {
  local src="$cache/src/etcd-$ETCD_VERSION"
  [[ -x "$bin/etcd" ]] && return 0
  say "building etcd $ETCD_VERSION"
  mkdir -p "$src" "$bin"
  printf 'module mlk.local/etcd-build\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$src/go.mod"
  # etcd's own main package lives in a module that is not published for go install: call its Main.
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' >"$src/main.go"
  (cd "$src" && go_do "etcd modules" "$go_cmd" mod tidy)
  (cd "$src" && go_do etcd "$go_cmd" build -trimpath -ldflags="-s -w" -o "$bin/etcd.tmp" .)
  mv "$bin/etcd.tmp" "$bin/etcd"
}

build_kwok() {
  local c
  for c in kwok kwokctl; do
    [[ -x "$bin/$c" ]] && continue
    say "building $c $KWOK_VERSION"
    mkdir -p "$bin/.gobin"
    GOBIN="$bin/.gobin" go_do "$c" "$go_cmd" install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/$c@$KWOK_VERSION"
    mv "$bin/.gobin/$c" "$bin/$c"
  done
}

build() {
  go_env "$cache"
  local start=$SECONDS
  build_etcd
  build_kwok
  build_kubernetes kube-apiserver kube-controller-manager kube-scheduler
  [[ "$node" != real ]] || build_kubernetes kubelet
  say "binaries ready in $bin ($((SECONDS - start)) s)"
}

# --- cluster ----------------------------------------------------------------------------------------
up() {
  build
  local start=$SECONDS k
  k="$(kubectl_bin)"
  if [[ -f "$kubeconfig" ]] && "$k" --kubeconfig "$kubeconfig" get --raw=/readyz >/dev/null 2>&1; then
    say "cluster $name already running"
  else
    [[ ! -d "$KWOK_WORKDIR/clusters/$name" ]] || "$bin/kwokctl" delete cluster --name "$name" >/dev/null 2>&1 || true
    say "starting cluster $name (kube-apiserver $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
    mkdir -p "$cache/logs"
    if ! PATH="$bin:$PATH" "$bin/kwokctl" create cluster --name "$name" --runtime binary \
      --kube-apiserver-binary "$bin/kube-apiserver" \
      --kube-controller-manager-binary "$bin/kube-controller-manager" \
      --kube-scheduler-binary "$bin/kube-scheduler" \
      --etcd-binary "$bin/etcd" \
      --kwok-controller-binary "$bin/kwok" \
      --kubeconfig "" \
      --config "$root/scripts/local-cluster/kwokctl.yaml" \
      --wait 3m >"$cache/logs/create-$name.log" 2>&1; then
      die "the cluster did not start: $(grep -m1 -iE 'error|fail' "$cache/logs/create-$name.log" || tail -n 1 "$cache/logs/create-$name.log") (full log: $cache/logs/create-$name.log)"
    fi
  fi
  # kwok's own stage sets, from its module: nodes become Ready and keep a lease; a scheduled pod
  # runs and is Ready; a Job's running pod succeeds; deleted pods go; claims of the default
  # StorageClass kwok-volume are provisioned and bound.
  local stages="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage" set
  [[ -d "$stages" ]] || go_do "kwok module" "$go_cmd" mod download "sigs.k8s.io/kwok@$KWOK_VERSION"
  for set in node/fast node/heartbeat-with-lease pod/fast volume/fast; do
    "$k" --kubeconfig "$kubeconfig" apply -k "$stages/$set" >/dev/null || die "could not apply kwok's stages $set"
  done
  "$k" --kubeconfig "$kubeconfig" apply -f "$root/scripts/local-cluster/nodes.yaml" >/dev/null ||
    die "could not apply scripts/local-cluster/nodes.yaml"
  "$k" --kubeconfig "$kubeconfig" wait --for=condition=Ready node --all --timeout=60s >/dev/null ||
    die "the kwok nodes did not become Ready"
  say "cluster $name up in $((SECONDS - start)) s: 3 kwok nodes, default StorageClass kwok-volume"
  if [[ "$node" == real ]]; then
    # Its summary to stderr too: KUBECONFIG=... stays the last line on stdout.
    "$root/scripts/real-node.sh" up --exclusive "$kubeconfig" >&2 || die "the real node did not come up (above)"
  fi
  echo "KUBECONFIG=$kubeconfig"
}

down() {
  # The machine's real node, when it belongs to this cluster (real-node.sh keeps a copy of its kubeconfig).
  if [[ -f "$cache/real-node/kubelet.pid" && -f "$kubeconfig" ]] && cmp -s "$cache/real-node/kubeconfig" "$kubeconfig"; then
    "$root/scripts/real-node.sh" down >&2 || die "could not stop the real node (above)"
  fi
  if [[ -x "$bin/kwokctl" && -d "$KWOK_WORKDIR/clusters/$name" ]]; then
    "$bin/kwokctl" delete cluster --name "$name" >/dev/null 2>&1 || die "kwokctl could not delete cluster $name"
    say "cluster $name deleted"
  else
    say "no cluster $name (nothing to do)"
  fi
}

case "$verb" in
  build) build ;;
  up) up ;;
  down) down ;;
  env)
    [[ -f "$kubeconfig" ]] || die "no cluster $name: run scripts/local-cluster.sh up"
    echo "KUBECONFIG=$kubeconfig"
    ;;
esac
