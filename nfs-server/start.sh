#!/bin/sh
# Hand the export's top folders to the stages' uid 10001 (NFS ignores fsGroup), then become the NFS
# server (PID 1: SIGTERM ends it cleanly in about 2 s). Its log goes to stdout.
set -eu
[ -d /exports ] && grep -q ' /exports ' /proc/self/mountinfo ||
  { echo "nfs-server: /exports is not a mounted volume (the VFS backend cannot export an overlay root)" >&2; exit 1; }
mkdir -p /exports/data /exports/model
chown 10001:10001 /exports /exports/data /exports/model
chmod 0775 /exports /exports/data /exports/model
mkdir -p /var/lib/nfs/ganesha /run/ganesha
exec ganesha.nfsd -F -f /etc/ganesha/ganesha.conf -L STDOUT -p /run/ganesha/ganesha.pid
