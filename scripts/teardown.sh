#!/usr/bin/env bash
# Remove everything scripts/quickstart.sh (or the manual steps) created, users of the volume first,
# then the volume, then the NFS server. The data on the disk is kept unless DELETE_DISK=1.
#
# Environment (defaults in brackets):
#   KUBECTL [kubectl]   the kubectl command, words allowed (e.g. "kubectl --context kind-mlk")
#   DELETE_DISK [0]     1: also delete the PVC behind the NFS server (NFS_BACKEND=pvc) and, when
#                       GCE_DISK_ZONE is set, the GCE disk GCE_DISK [ml-kube-disk] with GCLOUD [gcloud]
set -euo pipefail

me="teardown"
say() { printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$me" "$*"; }
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }

DELETE_DISK="${DELETE_DISK:-0}"
GCE_DISK="${GCE_DISK:-ml-kube-disk}"
GCE_DISK_ZONE="${GCE_DISK_ZONE:-}"
GCLOUD="${GCLOUD:-gcloud}"
[[ "$DELETE_DISK" == 0 || "$DELETE_DISK" == 1 ]] || die "DELETE_DISK must be 0 or 1, got '$DELETE_DISK'"
read -ra kubectl_cmd <<<"${KUBECTL:-kubectl}"
((${#kubectl_cmd[@]})) || die "KUBECTL must not be empty"
command -v "${kubectl_cmd[0]}" >/dev/null 2>&1 || die "'${kubectl_cmd[0]}' not found (install kubectl or set KUBECTL)"

remove() { # remove KIND NAME-or-selector...: delete and wait; absent is fine
  say "deleting $*"
  "${kubectl_cmd[@]}" delete "$@" --ignore-not-found=true --wait=true >/dev/null || die "could not delete $*"
}

remove service mnist-server-svc
remove deployment mnist-server
remove jobs -l app.kubernetes.io/name=mlk-mnist --cascade=foreground
remove deployment busybox
remove configmap mnist-config
remove persistentvolumeclaim nfs
remove persistentvolume nfs
remove service nfs-server
remove deployment nfs-server
if [[ "$DELETE_DISK" == 1 ]]; then
  remove persistentvolumeclaim nfs-server-disk
  if [[ -n "$GCE_DISK_ZONE" ]]; then
    say "deleting GCE disk $GCE_DISK in $GCE_DISK_ZONE"
    "$GCLOUD" compute disks delete "$GCE_DISK" --zone "$GCE_DISK_ZONE" --quiet || die "could not delete GCE disk $GCE_DISK"
  fi
  say "done; the disk's data is deleted"
else
  say "done; the data disk is kept (PVC nfs-server-disk or GCE disk $GCE_DISK; DELETE_DISK=1 removes it)"
fi
