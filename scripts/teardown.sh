#!/usr/bin/env bash
# Remove what scripts/quickstart.sh (or the manual steps) created: everything labelled
# app.kubernetes.io/name=mlk-mnist, users of the volume first, then the volume, then the NFS server.
# The data is kept unless DELETE_DISK=1. Running it again, or on a cluster without the pipeline, is a
# no-op that exits 0.
#
#   scripts/teardown.sh [-h|--help]
#
# Environment (defaults in brackets):
#   KUBECTL [kubectl]   the kubectl command, words allowed (e.g. "kubectl --context kind-mlk -n mlk")
#   DELETE_DISK [0]     1: also delete the data: the NFS server's claim nfs-server-disk (NFS_BACKEND=pvc),
#                       the ReadWriteMany claim nfs (NFS_BACKEND=rwx), and, when GCE_DISK_ZONE is set,
#                       the GCE disk GCE_DISK [ml-kube-disk] (NFS_BACKEND=gce) with GCLOUD [gcloud],
#                       once no VM uses it any more (up to DISK_DETACH_TIMEOUT [300] seconds)
set -euo pipefail

me="teardown"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
no_arguments "$@"

DELETE_DISK="${DELETE_DISK:-0}"
GCE_DISK="${GCE_DISK:-ml-kube-disk}"
GCE_DISK_ZONE="${GCE_DISK_ZONE:-}"
GCLOUD="${GCLOUD:-gcloud}"
DISK_DETACH_TIMEOUT="${DISK_DETACH_TIMEOUT:-300}"
[[ "$DELETE_DISK" == 0 || "$DELETE_DISK" == 1 ]] || die "DELETE_DISK must be 0 or 1, got '$DELETE_DISK'"
positive_int "$DISK_DETACH_TIMEOUT" || die "DISK_DETACH_TIMEOUT must be a positive integer, got '$DISK_DETACH_TIMEOUT'"
read -ra kubectl_cmd <<<"${KUBECTL:-kubectl}"
((${#kubectl_cmd[@]})) || die "KUBECTL must not be empty"
command -v "${kubectl_cmd[0]}" >/dev/null 2>&1 || die "'${kubectl_cmd[0]}' not found (install kubectl or set KUBECTL)"
k() { "${kubectl_cmd[@]}" "$@"; }

app="app.kubernetes.io/name=mlk-mnist"

remove() { # remove WHAT KUBECTL-DELETE-ARGS...: delete and wait; nothing there is fine
  local what="$1" out
  shift
  local err
  err="$(mktemp)"
  out="$(k delete "$@" --ignore-not-found=true --wait=true 2>"$err")" || { cat "$err" >&2; rm -f "$err"; die "could not delete $what"; }
  rm -f "$err"
  ! grep -q " deleted" <<<"$out" || say "deleted $what"
}

# The rwx backend's claim holds the data itself (no NFS server behind it): kept like a disk.
rwx_claim=""
if [[ "$(k get pvc nfs -o 'jsonpath={.spec.storageClassName}' --ignore-not-found=true 2>/dev/null || true)" != "" ]]; then
  rwx_claim=1
fi

remove "the server" deployment,service,poddisruptionbudget -l "$app,app.kubernetes.io/component=server"
remove "the Jobs" jobs -l "$app" --cascade=foreground
remove "busybox" deployment -l "$app,app.kubernetes.io/component=busybox"
remove "the config" configmap -l "$app"
# Pods of no Job or Deployment (the dataset upload) would hold the claim and keep its deletion waiting.
remove "the other pods" pods -l "$app"
if [[ -z "$rwx_claim" ]]; then
  remove "the volume" persistentvolumeclaim nfs
  # this namespace's only (3-nfs-pv-pvc.yaml): another namespace's run keeps its own
  remove "the NFS PersistentVolume" persistentvolume "mlk-nfs-$(current_namespace "${kubectl_cmd[@]}")"
fi
remove "the NFS server" service,deployment,networkpolicy -l "$app,app.kubernetes.io/component=nfs-server" --cascade=foreground

if [[ "$DELETE_DISK" == 0 ]]; then
  if [[ -n "$rwx_claim" ]]; then
    say "done; the data is kept in claim nfs (DELETE_DISK=1 removes it)"
  else
    say "done; the data disk is kept (claim nfs-server-disk, or the GCE disk $GCE_DISK; DELETE_DISK=1 removes it)"
  fi
  exit 0
fi

start=$SECONDS
[[ -z "$rwx_claim" ]] || remove "the data claim nfs" persistentvolumeclaim nfs
remove "the NFS server's data claim" persistentvolumeclaim nfs-server-disk
# NFS_BACKEND=gce: the disk's PersistentVolume (Retain: the disk itself stays until gcloud deletes it)
remove "the GCE disk's PersistentVolume" persistentvolume "mlk-disk-$(current_namespace "${kubectl_cmd[@]}")"
if [[ -n "$GCE_DISK_ZONE" ]]; then
  command -v "$GCLOUD" >/dev/null 2>&1 || die "'$GCLOUD' not found: the GCE disk $GCE_DISK was NOT deleted"
  if ! "$GCLOUD" compute disks describe "$GCE_DISK" --zone "$GCE_DISK_ZONE" --format='value(name)' >/dev/null 2>&1; then
    say "done; no GCE disk $GCE_DISK in $GCE_DISK_ZONE (nothing to delete)"
    exit 0
  fi
  # The node detaches the disk some seconds after the NFS server's pod is gone.
  deadline=$((SECONDS + DISK_DETACH_TIMEOUT))
  while users="$("$GCLOUD" compute disks describe "$GCE_DISK" --zone "$GCE_DISK_ZONE" --format='value(users)')" && [[ -n "$users" ]]; do
    ((SECONDS < deadline)) || die "GCE disk $GCE_DISK is still attached to $users after ${DISK_DETACH_TIMEOUT}s: NOT deleted"
    sleep 5
  done
  "$GCLOUD" compute disks delete "$GCE_DISK" --zone "$GCE_DISK_ZONE" --quiet ||
    die "could not delete GCE disk $GCE_DISK: it is NOT deleted"
  say "done; the data is deleted, GCE disk $GCE_DISK included ($((SECONDS - start)) s)"
else
  say "done; the cluster's data claims are deleted ($((SECONDS - start)) s). A GCE disk $GCE_DISK, if you made one, is NOT deleted: set GCE_DISK_ZONE to delete it too"
fi
