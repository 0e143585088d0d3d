#!/usr/bin/env bash
# A real Kubernetes node on this machine for a local control plane (scripts/local-cluster.sh): the
# kubelet of the control plane's version and containerd 2.x (runc, cgroupfs driver), built once from
# their Go modules into the cache and run as plain background processes with their state, pid files
# and logs under the cache, so that pods of the project's own images really run. Nothing is
# downloaded at run time but Go modules for the first build.
#
#   scripts/real-node.sh up [--exclusive] KUBECONFIG   build (first time), start containerd and the
#                       kubelet, import the images from podman, apply StorageClass local-rwx with its
#                       PersistentVolumes, wait until the node is Ready; one summary line last.
#                       --exclusive: taint the cluster's simulated kwok nodes NoSchedule, so that
#                       workloads land on the real node. Running it again keeps what runs.
#   scripts/real-node.sh down    drain and delete the node, its PersistentVolumes (and their data)
#                       and StorageClass (the earlier default class is the default again), stop the
#                       kubelet, kube-proxy, the pods and containerd, unmount every volume (NFS mounts
#                       included: their FUSE daemons end), remove the pod network, kube-proxy's nftables
#                       tables and the cgroups (the images and the build cache are kept)
#   scripts/real-node.sh build   only build (containerd, crictl, the kubelet, kube-proxy, the pause image)
#
# What the node has: pod network on a bridge of its own; kube-proxy (nftables mode), so that Service
# ClusterIPs route from this machine and its pods (no cluster DNS: pods use the host's resolver);
# StorageClass local-rwx (kubernetes.io/no-provisioner, WaitForFirstConsumer), the cluster's default
# while the node is up, with pre-made local PersistentVolumes of ReadWriteMany and ReadWriteOnce on host
# folders, on which the kubelet applies fsGroup; NFS volumes, which the kubelet mounts through the
# project's own mount.nfs (scripts/real-node/: a userspace NFSv4.1 client over FUSE, as this kernel has
# no NFS client); logs, exec and port-forward. A kwokctl cluster needs two settings for it
# (docs/real-node.md).
#
# Environment (defaults in brackets):
#   LOCAL_CLUSTER_CACHE [<project>/.cache/local-cluster]  build cache; node state in real-node/
#   REAL_NODE_NAME [real-node]         the Node's name
#   REAL_NODE_POD_CIDR [10.85.0.0/24]  pod addresses; its first address is the node's (the bridge)
#   REAL_NODE_PVS [4]                  how many PersistentVolumes of local-rwx
#   REAL_NODE_IMAGES [splitter trainer aggregator server nfs-server]  images imported from podman
#                                      ($IMAGE_REGISTRY/<name>:$IMAGE_TAG, scripts/images.env)
#   GO [go on PATH if 1.26+, else Go 1.26.8 fetched once from the Go module proxy: scripts/fetch-go.py]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="real-node"
SAY_TO_STDERR=1 # stdout is the summary line alone
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
# The pinned releases: the control plane's KUBE_VERSION (the kubelet and kube-proxy are the same build),
# ETCD_VERSION and KWOK_VERSION (its binaries' folder), CONTAINERD_VERSION, CRICTL_VERSION.
# shellcheck source=scripts/versions.env
source "$root/scripts/versions.env"

bridge="mlkcni0"
class="local-rwx"
pv_label="mlk.local/real-node"
taint="mlk.local/simulated"
default_class_annotation="storageclass.kubernetes.io/is-default-class"

# --- arguments and settings -------------------------------------------------------------------------
parse_args() { # sets verb, kubeconfig_arg, exclusive; a usage mistake: one line, exit 2
  verb="" kubeconfig_arg="" exclusive=0
  local arg
  for arg in "$@"; do
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      --exclusive) exclusive=1 ;;
      up | down | build)
        [[ -z "$verb" ]] || { echo "$me: one verb only (up, down, build)" >&2; exit 2; }
        verb="$arg" ;;
      -*) unknown_argument "$arg" ;;
      *)
        [[ "$verb" == up && -z "$kubeconfig_arg" ]] || unknown_argument "$arg"
        kubeconfig_arg="$arg" ;;
    esac
  done
  [[ -n "$verb" ]] || { echo "$me: say up KUBECONFIG, down or build (try --help)" >&2; exit 2; }
  [[ "$verb" != up || -n "$kubeconfig_arg" ]] || { echo "$me: up needs the cluster's KUBECONFIG file" >&2; exit 2; }
  ((exclusive == 0)) || [[ "$verb" == up ]] || { echo "$me: --exclusive goes with up" >&2; exit 2; }
}

settings() { # the environment's settings (checked) and the paths of the build cache and the node's state
  cache="${LOCAL_CLUSTER_CACHE:-$root/.cache/local-cluster}"
  node="${REAL_NODE_NAME:-real-node}"
  pod_cidr="${REAL_NODE_POD_CIDR:-10.85.0.0/24}"
  pv_count="${REAL_NODE_PVS:-4}"
  # shellcheck source=scripts/images.env disable=SC1091
  source "$root/scripts/images.env"
  read -r -a stages <<<"${REAL_NODE_IMAGES-${IMAGES[*]}}"
  [[ "$node" =~ ^[a-z0-9][a-z0-9.-]{0,50}$ ]] || die "REAL_NODE_NAME must be a lower-case DNS name, got '$node'"
  if ! positive_int "$pv_count" || ((pv_count > 99)); then die "REAL_NODE_PVS must be a number from 1 to 99, got '$pv_count'"; fi
  kbin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION" # the control plane's, and the kubelet
  cbin="$cache/bin/containerd-$CONTAINERD_VERSION"
  crictl_bin="$cache/bin/crictl-$CRICTL_VERSION/crictl"
  state="$cache/real-node"
  sock="$state/containerd/containerd.sock"
  cgroup_name="mlk-$node"
  nfs_python="${MLK_NFS_PYTHON:-$root/.venv/bin/python}"
}

# --- build ------------------------------------------------------------------------------------------

go_do() { # go_do WHAT CMD...: run a build command, its output in a log; on failure one line naming it
  local what="$1" log
  shift
  log="$cache/logs/build-${what// /-}.log"
  mkdir -p "$cache/logs"
  if ! "$@" >"$log" 2>&1; then
    die "building $what failed: $(grep -m1 -E 'go: |error|cannot|refused|not found' "$log" || tail -n 1 "$log") (full log: $log)"
  fi
}

build_containerd() {
  local c missing=0
  for c in containerd containerd-shim-runc-v2 ctr; do [[ -x "$cbin/$c" ]] || missing=1; done
  ((missing)) || return 0
  say "building containerd $CONTAINERD_VERSION (containerd, containerd-shim-runc-v2, ctr) into $cbin: a few minutes, once"
  mkdir -p "$cbin/.gobin"
  # No cgo: the btrfs, devmapper and zfs snapshotters are left out (overlayfs is what is used).
  GOBIN="$cbin/.gobin" go_do containerd "$go_cmd" install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
  for c in containerd containerd-shim-runc-v2 ctr; do mv "$cbin/.gobin/$c" "$cbin/$c"; done
}

build_crictl() {
  [[ -x "$crictl_bin" ]] && return 0
  say "building crictl $CRICTL_VERSION"
  mkdir -p "${crictl_bin%/*}/.gobin"
  GOBIN="${crictl_bin%/*}/.gobin" go_do crictl "$go_cmd" install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  mv "${crictl_bin%/*}/.gobin/crictl" "$crictl_bin"
}

# The kubelet and kube-proxy, as scripts/local-cluster.sh builds the control plane: from its wrapper
# module (which lists cmd/kubelet and cmd/kube-proxy), with the same version stamp.
build_node_binary() { # build_node_binary NAME: k8s.io/kubernetes/cmd/NAME into $kbin
  local name="$1"
  [[ -x "$kbin/$name" ]] && return 0
  local src="$cache/src/kubernetes-$KUBE_VERSION" minor ldflags="" pkg
  [[ -f "$src/go.mod" && -f "$src/tools.go" ]] ||
    die "no $name in $kbin and no Kubernetes build module in $src: run scripts/local-cluster.sh build first"
  say "building $name $KUBE_VERSION into $kbin: a few minutes, once"
  minor="${KUBE_VERSION#v1.}"
  minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  (cd "$src" && go_do "$name" "$go_cmd" build -trimpath -ldflags="-s -w $ldflags" -o "$kbin/$name.tmp" "k8s.io/kubernetes/cmd/$name")
  mv "$kbin/$name.tmp" "$kbin/$name"
}

go_arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) uname -m ;;
  esac
}

# The pod sandbox ("pause") image: Kubernetes' own pause.c from the k8s.io/kubernetes module, linked
# statically, in an OCI image archive of one layer (scripts/real-node/oci_layout.py; no registry, no
# image builder).
pause_tag() { sed -n 's/^TAG ?= //p' "$GOMODCACHE/k8s.io/kubernetes@$KUBE_VERSION/build/pause/Makefile"; }
pause_dir() { echo "$cache/bin/pause-$(pause_tag)-k8s-$KUBE_VERSION"; }
build_pause() {
  local src="$GOMODCACHE/k8s.io/kubernetes@$KUBE_VERSION/build/pause/linux/pause.c" dir work
  [[ -f "$src" ]] || go_do "kubernetes module" "$go_cmd" mod download "k8s.io/kubernetes@$KUBE_VERSION"
  [[ -f "$src" ]] || die "no build/pause/linux/pause.c in the k8s.io/kubernetes@$KUBE_VERSION module"
  dir="$(pause_dir)"
  [[ -s "$dir/pause-oci.tar" ]] && return 0
  command -v gcc >/dev/null 2>&1 || die "gcc is needed for the pause image (Debian: apt-get install gcc libc6-dev)"
  command -v python3 >/dev/null 2>&1 || die "python3 is needed for the pause image's OCI layout (Debian: apt-get install python3)"
  say "building the pause image $(pause_tag) from pause.c"
  work="$dir/.work"
  rm -rf "$work"
  mkdir -p "$work/rootfs"
  gcc -Os -Wall -Werror -static -DVERSION="v$(pause_tag)-mlk" -o "$work/rootfs/pause" "$src" >"$work/gcc.log" 2>&1 ||
    die "compiling pause.c failed (static glibc: Debian libc6-dev): $(head -n 1 "$work/gcc.log")"
  strip "$work/rootfs/pause" 2>/dev/null || true
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" pause
  # index.json, the manifest, the config and oci-layout, the layer moved in under its digest
  python3 "$root/scripts/real-node/oci_layout.py" --layer "$work/layer.tar" --arch "$(go_arch)" \
    --name "$(pause_image)" --ref "$(pause_tag)" --user 65535:65535 --entrypoint /pause "$work/oci" >/dev/null ||
    die "writing the pause image's OCI layout failed (scripts/real-node/oci_layout.py, above)"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$dir/pause-oci.tar.tmp" oci-layout index.json blobs
  mv "$dir/pause-oci.tar.tmp" "$dir/pause-oci.tar"
  rm -rf "$work"
}
pause_image() { echo "$DEFAULT_IMAGE_REGISTRY/pause:$(pause_tag)"; }

build() {
  go_env "$cache"
  local start=$SECONDS
  build_containerd
  build_crictl
  build_node_binary kubelet
  build_node_binary kube-proxy
  build_pause
  say "binaries ready ($((SECONDS - start)) s): $cbin, ${crictl_bin%/*}, $kbin/kubelet, $kbin/kube-proxy, $(pause_dir)"
}

# --- helpers ----------------------------------------------------------------------------------------
k() { "$kubectl" --kubeconfig "$state/kubeconfig" --request-timeout=20s "$@"; }
ctr_() { "$cbin/ctr" --address "$sock" --namespace k8s.io "$@"; }
crictl_() {
  [[ -f "$state/crictl.yaml" ]] || printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n' "$sock" "$sock" >"$state/crictl.yaml"
  "$crictl_bin" --config "$state/crictl.yaml" "$@"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; } # alive PIDFILE

# spawn PIDFILE LOG CMD...: start CMD in a session of its own (it outlives this script), its pid in
# PIDFILE (written by the process itself, which then becomes CMD), its output appended to LOG
spawn() {
  local pidfile="$1" log="$2" i
  shift 2
  rm -f "$pidfile"
  # The subshell becomes CMD (exec), holding no descriptor of this script's: a caller reading this
  # script's output to its end is not kept waiting by the daemon.
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  (cd "$state" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@") </dev/null >>"$log" 2>&1 &
  for ((i = 0; i < 50; i++)); do [[ -s "$pidfile" ]] && return 0; sleep 0.1; done
  die "could not start $1"
}

stop_pid() { # stop_pid PIDFILE NAME: TERM, then KILL after 20 s
  local pidfile="$1" name="$2" pid i
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) still running after 20 s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$pidfile"
}

# The CIDR's network and first address; refuses one that overlaps a route of another interface.
check_cidr() {
  [[ "$pod_cidr" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]{1,2})$ ]] || die "REAL_NODE_POD_CIDR must be an IPv4 CIDR, got '$pod_cidr'"
  local bits="${pod_cidr#*/}" net mask route dev rnet rbits rmask lo hi rlo rhi
  ((bits >= 8 && bits <= 28)) || die "REAL_NODE_POD_CIDR needs a prefix between /8 and /28, got '$pod_cidr'"
  mask=$(((0xffffffff << (32 - bits)) & 0xffffffff))
  net=$(($(ip2int "${pod_cidr%/*}") & mask))
  lo=$net hi=$((net | (~mask & 0xffffffff)))
  while read -r route dev; do
    [[ "$route" == default || "$dev" == "$bridge" ]] && continue
    rnet="${route%/*}" rbits=32
    [[ "$route" == */* ]] && rbits="${route#*/}"
    [[ "$rnet" =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]] || continue
    rmask=$(((0xffffffff << (32 - rbits)) & 0xffffffff))
    rlo=$(($(ip2int "$rnet") & rmask)) rhi=$((rlo | (~rmask & 0xffffffff)))
    ((hi < rlo || lo > rhi)) || die "REAL_NODE_POD_CIDR $pod_cidr overlaps the route $route on $dev (ip route): choose another"
  done < <(ip -4 route show table all type unicast 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $1, $(i + 1); break}}')
  pod_net="$(int2ip "$net")/$bits"
  node_ip="$(int2ip $((net + 1)))"
}

# The kwokctl cluster's settings a real node needs (docs/real-node.md); nothing to check elsewhere.
check_kwok_cluster() {
  local conf
  conf="$(dirname "$(readlink -f "$kubeconfig_arg")")/kwok.yaml"
  [[ -f "$conf" ]] || return 0
  local manage_all
  manage_all="$(grep -oE -- '--manage-all-nodes=(true|false)' "$conf" | tail -n 1 || true)"
  [[ "$manage_all" != "--manage-all-nodes=true" ]] ||
    die "this kwokctl cluster's kwok-controller manages every node, so it would fake $node's status and pods: start it with kwok-controller --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake (docs/real-node.md)"
  grep -qE -- '--kubelet-preferred-address-types=InternalIP' "$conf" ||
    die "this kwokctl cluster's kube-apiserver reaches kubelets by host name first, which does not resolve to $node (logs, exec and port-forward fail): start it with --kubelet-preferred-address-types=InternalIP,Hostname,InternalDNS,ExternalDNS,ExternalIP (docs/real-node.md)"
}

preflight() {
  [[ $(id -u) -eq 0 ]] || die "needs root (containerd, the kubelet, the pod network and cgroups)"
  local need=() runc_path
  command -v runc >/dev/null 2>&1 || need+=(runc)
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback && -x /usr/lib/cni/portmap ]] ||
    need+=(containernetworking-plugins)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
  command -v nft >/dev/null 2>&1 || need+=(nftables)          # kube-proxy's nftables mode
  command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)     # libfuse3 for the NFS mounts' FUSE client
  if ((${#need[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} (Debian packages)"
    say "installing ${need[*]} (Debian packages)"
    if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
      die "could not install ${need[*]}"
    fi
  fi
  runc_path="$(command -v runc)"
  runc="$runc_path"
  [[ -c /dev/fuse ]] || die "no /dev/fuse: the NFS volumes are mounted through FUSE (modprobe fuse)"
  "$nfs_python" -c 'import mfusepy, nfs_rs' 2>/dev/null ||
    die "$nfs_python cannot import nfs_rs and mfusepy (the NFS mounts' client): run scripts/bootstrap.sh --dev"
}

cgroup_mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/mounts; }

# --- containerd -------------------------------------------------------------------------------------
write_containerd_config() {
  mkdir -p "$state/containerd" "$state/cni/net.d"
  # Config version 3, everything under the cache: root, state, socket, runc's state, netns mounts, opt.
  # restrict_oom_score_adj: the kubelet asks for -998 for sandboxes, and this machine's root lacks
  # CAP_SYS_RESOURCE to lower oom_score_adj (runc then fails with "can't get final child's PID").
  cat >"$state/containerd/config.toml" <<EOF
version = 3
root = "$state/containerd/root"
state = "$state/containerd/state"

[grpc]
  address = "$sock"

[plugins.'io.containerd.internal.v1.opt']
  path = "$state/containerd/opt"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$(pause_image)"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$runc"
        Root = "$state/containerd/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$state/cni/net.d"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  # The pod network: a bridge of its own, the node's address its gateway; no masquerading (pods
  # reach this machine and each other, nothing beyond).
  cat >"$state/cni/net.d/10-mlk-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "mlk-real-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$pod_net", "gateway": "$node_ip"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$state/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

start_containerd() {
  if alive "$state/containerd.pid" && ctr_ version >/dev/null 2>&1; then
    say "containerd already running (pid $(cat "$state/containerd.pid"))"
    return 0
  fi
  stop_pid "$state/containerd.pid" containerd
  mkdir -p "$state/logs"
  PATH="$cbin:$PATH" spawn "$state/containerd.pid" "$state/logs/containerd.log" \
    "$cbin/containerd" --config "$state/containerd/config.toml"
  local i
  for ((i = 0; i < 60; i++)); do
    ctr_ version >/dev/null 2>&1 && { say "containerd $CONTAINERD_VERSION started (pid $(cat "$state/containerd.pid"), log $state/logs/containerd.log)"; return 0; }
    alive "$state/containerd.pid" || break
    sleep 0.5
  done
  die "containerd did not start: $(grep -m1 -iE 'level=(fatal|error)' "$state/logs/containerd.log" || tail -n 1 "$state/logs/containerd.log") (log: $state/logs/containerd.log)"
}

# import_image REF ID LOADER...: import the image archive LOADER writes to stdout, unless REF is there
# with that ID (any ID when ID is empty)
import_image() {
  local ref="$1" id="$2" have
  shift 2
  have="$(crictl_ inspecti -o go-template --template '{{.status.id}}' "$ref" 2>/dev/null || true)"
  [[ -z "$have" || ( -n "$id" && "$have" != "sha256:${id#sha256:}" ) ]] || return 0
  "$@" | ctr_ images import --platform "linux/$(go_arch)" - >"$state/logs/import.log" 2>&1 ||
    die "importing $ref failed: $(grep -v DEPRECATION "$state/logs/import.log" | tail -n 1)"
}

import_images() {
  local start=$SECONDS s ref id imported=() missing=()
  import_image "$(pause_image)" "" cat "$(pause_dir)/pause-oci.tar"
  for s in "${stages[@]}"; do
    ref="$IMAGE_REGISTRY/$s:$IMAGE_TAG"
    if ! command -v podman >/dev/null 2>&1 || ! id="$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null)"; then
      missing+=("$s")
      continue
    fi
    import_image "$ref" "$id" podman save --format docker-archive "$ref"
    imported+=("$s")
  done
  images_summary="images ${imported[*]:-none}"
  ((${#missing[@]} == 0)) || {
    images_summary+=" (not in podman: ${missing[*]}; scripts/build-images.sh ${missing[*]})"
    say "not in podman storage, so not on the node: ${missing[*]} (build them: scripts/build-images.sh ${missing[*]})"
  }
  say "images on the node ($((SECONDS - start)) s): $(crictl_ images -o json 2>/dev/null | grep -oE '"[a-z0-9.]+/[^"]+:[^"]+"' | tr -d '"' | tr '\n' ' ')"
}

# --- kubelet ----------------------------------------------------------------------------------------
setup_network() {
  ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
  ip -4 addr show dev "$bridge" | grep -q "inet $node_ip/" || ip addr add "$node_ip/${pod_net#*/}" dev "$bridge"
  ip link set "$bridge" up
  [[ "$(cat /proc/sys/net/ipv4/ip_forward)" == 1 ]] || say "net.ipv4.ip_forward is 0: pods reach only this machine (enough here)"
}

setup_cgroups() {
  local m
  while read -r m; do
    [[ "$m" == /sys/fs/cgroup/unified || -d "$m/$cgroup_name" ]] && continue
    mkdir -p "$m/$cgroup_name"
    if [[ -f "$m/cpuset.cpus" && -f "$m/$cgroup_name/cpuset.cpus" ]]; then # v1 cpuset starts empty
      cat "$m/cpuset.cpus" >"$m/$cgroup_name/cpuset.cpus"
      cat "$m/cpuset.mems" >"$m/$cgroup_name/cpuset.mems"
    fi
  done < <(cgroup_mounts)
}

write_kubelet_config() {
  mkdir -p "$state/kubelet/root" "$state/kubelet/pod-logs"
  cat >"$state/kubelet/config.yaml" <<EOF
# scripts/real-node.sh: the kubelet of node $node
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# This machine has cgroup v1, which the kubelet refuses since 1.35 unless told.
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_name
containerRuntimeEndpoint: unix://$sock
podLogsDir: $state/kubelet/pod-logs
staticPodPath: ""
# The apiserver reaches the kubelet for logs, exec and port-forward: a local dev node trusts it.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
# The images come from podman, not a registry: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

start_kubelet() {
  if alive "$state/kubelet.pid" && cmp -s "$kubeconfig_arg" "$state/kubeconfig"; then
    say "kubelet already running (pid $(cat "$state/kubelet.pid"))"
    kubelet_started=0
    return 0
  fi
  stop_pid "$state/kubelet.pid" kubelet
  cp "$kubeconfig_arg" "$state/kubeconfig"
  printf '%s\n' "$node" >"$state/node-name"
  # The cluster's admin credentials (a local dev cluster); labels kubernetes.io/os, arch and hostname
  # come from the kubelet itself.
  # PATH: the kubelet's `mount` is scripts/real-node/bin/mount, which sends NFS mounts to the project's
  # mount.nfs (log: nfs-mounts.log) and everything else to the system's mount.
  spawn "$state/kubelet.pid" "$state/logs/kubelet.log" env PATH="$root/scripts/real-node/bin:$PATH" \
    MLK_NFS_PYTHON="$nfs_python" MLK_NFS_MOUNT_LOG="$state/logs/nfs-mounts.log" \
    "$kbin/kubelet" --config "$state/kubelet/config.yaml" \
    --kubeconfig "$state/kubeconfig" --root-dir "$state/kubelet/root" --hostname-override "$node" \
    --node-ip "$node_ip" --node-labels "type=real,$pv_label=true" --v=2
  kubelet_started=1
  say "kubelet $KUBE_VERSION started (pid $(cat "$state/kubelet.pid"), log $state/logs/kubelet.log)"
}

# wait_ready SINCE: until the kubelet answers its health check and has reported the node Ready at or
# after SINCE (a UTC timestamp), not merely a Ready status left by an earlier kubelet
wait_ready() {
  local since="$1" i ready
  for ((i = 0; i < 120; i++)); do
    alive "$state/kubelet.pid" || die "the kubelet stopped: $(grep -m1 -E '^F[0-9]{4} ' "$state/logs/kubelet.log" | cut -c1-300 || tail -n 1 "$state/logs/kubelet.log") (log: $state/logs/kubelet.log)"
    ready="$(k get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' 2>/dev/null || true)"
    if [[ "${ready%% *}" == True && ! "${ready#* }" < "$since" ]] &&
      [[ "$(curl -fsS --max-time 2 http://127.0.0.1:10248/healthz 2>/dev/null)" == ok ]]; then
      return 0
    fi
    sleep 1
  done
  die "node $node not Ready after 120 s: $(k get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>&1) (log: $state/logs/kubelet.log)"
}

# --- kube-proxy -------------------------------------------------------------------------------------
# nftables mode: its rules live in tables of its own (ip/ip6 kube-proxy), so nothing mixes with the
# host's iptables and `down` removes them whole. It touches no sysctl: conntrack limits stay as they are
# (maxPerCore 0) and NodePorts are not offered on localhost (no route_localnet).
service_cidrs() { k get servicecidrs -o 'jsonpath={range .items[*]}{range .spec.cidrs[*]}{@}{"\n"}{end}{end}' 2>/dev/null | grep -v ':' || true; }

start_kube_proxy() {
  if alive "$state/kube-proxy.pid" && cmp -s "$kubeconfig_arg" "$state/kube-proxy.kubeconfig"; then
    say "kube-proxy already running (pid $(cat "$state/kube-proxy.pid"))"
  else
    stop_pid "$state/kube-proxy.pid" kube-proxy
    cp "$kubeconfig_arg" "$state/kube-proxy.kubeconfig"
    cat >"$state/kube-proxy.yaml" <<EOF
# scripts/real-node.sh: kube-proxy of node $node
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $state/kube-proxy.kubeconfig
hostnameOverride: $node
mode: nftables
clusterCIDR: $pod_net
nodePortAddresses: ["$node_ip/32"]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
EOF
    spawn "$state/kube-proxy.pid" "$state/logs/kube-proxy.log" "$kbin/kube-proxy" --config "$state/kube-proxy.yaml" --v=2
    say "kube-proxy $KUBE_VERSION started (pid $(cat "$state/kube-proxy.pid"), nftables mode, log $state/logs/kube-proxy.log)"
  fi
  # Service addresses go to the bridge, never to the default route: until kube-proxy's rules match (or
  # for an address no Service has), a connection fails here instead of leaving the machine.
  local cidr i
  for cidr in $(service_cidrs); do ip route replace "$cidr" dev "$bridge"; done
  for ((i = 0; i < 60; i++)); do
    curl -fsS --max-time 2 http://127.0.0.1:10256/healthz >/dev/null 2>&1 && return 0
    alive "$state/kube-proxy.pid" || break
    sleep 1
  done
  die "kube-proxy is not healthy: $(grep -m1 -E '^[EF][0-9]{4} ' "$state/logs/kube-proxy.log" | cut -c1-300 || tail -n 1 "$state/logs/kube-proxy.log") (log: $state/logs/kube-proxy.log)"
}

# --- storage ----------------------------------------------------------------------------------------
# StorageClass local-rwx and REAL_NODE_PVS local PersistentVolumes on folders of this machine. Local
# rather than hostPath volumes: the kubelet applies fsGroup to them (hostPath it leaves root's), as a
# CSI driver with fsGroupPolicy File does on a real ReadWriteMany class. A released volume (its claim
# deleted) is emptied and made Available again by the next up.
apply_storage() {
  local i name dir phase manifest
  manifest="apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $class
  labels: {$pv_label: \"true\"}
  annotations: {$default_class_annotation: \"true\"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
"
  for ((i = 0; i < pv_count; i++)); do
    name="$node-pv-$i" dir="$state/volumes/pv-$i"
    phase="$(k get pv "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
    if [[ "$phase" == Released ]]; then
      say "emptying released volume $name"
      find "$dir" -mindepth 1 -delete
      k patch pv "$name" --type json -p '[{"op":"remove","path":"/spec/claimRef"}]' >/dev/null
    fi
    mkdir -p "$dir"
    manifest+="---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $name
  labels: {$pv_label: \"true\"}
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteMany, ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: $class
  local: {path: \"$dir\"}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [\"$node\"]}]
"
  done
  make_default_class
  k apply -f - <<<"$manifest" >/dev/null || die "could not apply StorageClass $class and its PersistentVolumes"
}

# The node's class is the cluster's default while the node is up (a claim without a class, like the NFS
# server's disk, must get a volume this node can mount, not kwok's simulated one); the classes that
# were the default are noted and become it again at `down`.
make_default_class() {
  local c
  for c in $(k get storageclass -o "jsonpath={range .items[?(@.metadata.annotations.storageclass\.kubernetes\.io/is-default-class==\"true\")]}{.metadata.name}{\"\n\"}{end}"); do
    [[ "$c" != "$class" ]] || continue
    grep -qxF "$c" "$state/default-classes" 2>/dev/null || echo "$c" >>"$state/default-classes"
    k annotate storageclass "$c" "$default_class_annotation=false" --overwrite >/dev/null ||
      die "could not make StorageClass $c non-default"
    say "StorageClass $class is the default while the node is up ($c was; down makes it the default again)"
  done
}

restore_default_class() {
  local c
  [[ -f "$state/default-classes" ]] || return 0
  while read -r c; do
    k annotate storageclass "$c" "$default_class_annotation=true" --overwrite >/dev/null 2>&1 &&
      say "StorageClass $c is the default again"
  done <"$state/default-classes"
  rm -f "$state/default-classes"
}

simulated_nodes() {
  k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.metadata.annotations.kwok\.x-k8s\.io/node}{"\n"}{end}' |
    awk -F '\t' '$2 == "fake" {print $1}'
}

# --- verbs ------------------------------------------------------------------------------------------
# The cluster of KUBECONFIG answers (its path made absolute; kubectl found).
check_cluster() {
  [[ -f "$kubeconfig_arg" ]] || die "no such KUBECONFIG file: $kubeconfig_arg"
  kubeconfig_arg="$(readlink -f "$kubeconfig_arg")"
  kubectl="$(kubectl_bin)"
  "$kubectl" --kubeconfig "$kubeconfig_arg" --request-timeout=10s get --raw=/readyz >/dev/null 2>&1 ||
    die "the cluster of $kubeconfig_arg does not answer"
}

taint_simulated_nodes() { # --exclusive: workloads land on the real node
  local n tainted=()
  for n in $(simulated_nodes); do
    k taint nodes "$n" "$taint=true:NoSchedule" --overwrite >/dev/null && tainted+=("$n")
  done
  say "tainted the simulated nodes $taint=true:NoSchedule: ${tainted[*]:-none}"
}

up() {
  check_cluster
  check_kwok_cluster
  check_cidr
  preflight
  local t0=$SECONDS t1 t2 since
  build
  t1=$SECONDS
  mkdir -p "$state/logs" "$state/volumes"
  write_containerd_config
  setup_network
  setup_cgroups
  start_containerd
  import_images
  t2=$SECONDS
  write_kubelet_config
  since="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  start_kubelet
  ((kubelet_started)) || since=""
  wait_ready "$since"
  start_kube_proxy
  apply_storage
  ((exclusive == 0)) || taint_simulated_nodes
  say "done: build $((t1 - t0)) s, containerd and images $((t2 - t1)) s, kubelet to Ready $((SECONDS - t2)) s"
  echo "$me: node $node Ready (kubelet $KUBE_VERSION, containerd $CONTAINERD_VERSION, runc $("$runc" --version | awk 'NR == 1 {print $3}'), kube-proxy nftables), pods $pod_net, default StorageClass $class with $pv_count volumes, NFS mounts through FUSE, $images_summary; logs in $state/logs"
}

drain_node() { # untaint the simulated nodes, cordon the node and delete its pods
  local n
  k get node "$node" >/dev/null 2>&1 || return 0
  say "draining $node"
  for n in $(k get nodes -o jsonpath="{range .items[?(@.spec.taints[*].key==\"$taint\")]}{.metadata.name} {end}"); do
    k taint nodes "$n" "$taint-" >/dev/null 2>&1 || true
  done
  k cordon "$node" >/dev/null 2>&1 || true
  k delete pods --all-namespaces --field-selector "spec.nodeName=$node" --grace-period=5 --timeout=60s >/dev/null 2>&1 || true
}

delete_node_objects() { # the Node, its PersistentVolumes and StorageClass; the earlier default class back
  k delete node "$node" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  k delete pv -l "$pv_label=true" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  restore_default_class
  k delete storageclass "$class" --ignore-not-found >/dev/null 2>&1 || true
}

# Pods the kubelet left: their sandboxes through the CRI (which releases their network), then
# containerd; then any shim or container still there.
stop_pods_and_containerd() {
  if alive "$state/containerd.pid" && [[ -x "$crictl_bin" ]]; then
    crictl_ rmp --all --force >/dev/null 2>&1 || say "crictl rmp failed: stopping the containers with runc"
  fi
  stop_pid "$state/containerd.pid" containerd
  local f id
  if [[ -d "$state/containerd/runc/k8s.io" ]] && command -v runc >/dev/null 2>&1; then
    for id in $(runc --root "$state/containerd/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$state/containerd/runc/k8s.io" delete --force "$id" >/dev/null 2>&1 || true
    done
  fi
  for f in "$state"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    [[ -f "$f" ]] && stop_pid "$f" "containerd-shim ($(basename "$(dirname "$f")"))"
  done
  return 0
}

# Mounts under the state folder (sandbox netns, volumes, tmpfs of projected volumes), deepest first;
# then the pods' and the volumes' folders, unless a mount is still there.
unmount_state() {
  local m left
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done < <(awk -v p="$state/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r)
  left="$(awk -v p="$state/" 'index($2, p) == 1' /proc/mounts | wc -l)"
  # The NFS mounts' FUSE daemons end with their mounts; one whose mount is gone but lingers is ended.
  pkill -TERM -f "$root/scripts/real-node/mount_nfs.py .* --daemon" 2>/dev/null || true
  if ((left == 0)); then
    rm -rf "$state/containerd/state" "$state/cni/ipam" "$state/kubelet/root/pods" "$state/volumes"
  else
    say "$left mounts under $state are still there: kept the kubelet's and the volumes' folders"
  fi
}

remove_network_and_cgroups() {
  local m
  if ip link show "$bridge" >/dev/null 2>&1; then ip link delete "$bridge"; fi
  while read -r m; do
    if [[ -d "$m/$cgroup_name" ]]; then find "$m/$cgroup_name" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done < <(cgroup_mounts)
  # What containerd and CNI keep outside the state folder whatever the settings: the shims' sockets
  # (/run/containerd/s) and CNI's result cache; left only if something else uses them.
  rm -f /var/lib/cni/results/mlk-real-node-*
  rmdir /run/containerd/s /run/containerd /var/lib/cni/results /var/lib/cni 2>/dev/null || true
}

down() {
  [[ $(id -u) -eq 0 ]] || die "needs root"
  if [[ ! -d "$state" ]]; then say "no node state in $state (nothing to do)"; return 0; fi
  if [[ -f "$state/node-name" ]]; then node="$(cat "$state/node-name")"; fi
  cgroup_name="mlk-$node"
  kubectl="$(kubectl_bin)"
  local api=0
  if [[ -f "$state/kubeconfig" ]] && k get --raw=/readyz >/dev/null 2>&1; then api=1; fi
  ((api == 0)) || drain_node
  stop_pid "$state/kubelet.pid" kubelet
  stop_pid "$state/kube-proxy.pid" kube-proxy
  if [[ -x "$kbin/kube-proxy" ]]; then "$kbin/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  ((api == 0)) || delete_node_objects
  stop_pods_and_containerd
  unmount_state
  remove_network_and_cgroups
  rm -f "$state/kubeconfig" "$state/kube-proxy.kubeconfig" "$state/node-name"
  say "node $node down (images kept in $state/containerd/root)"
}

main() {
  parse_args "$@"
  settings
  case "$verb" in
    build) build ;;
    up) up ;;
    down) down ;;
  esac
}

main "$@"
