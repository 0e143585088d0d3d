#!/usr/bin/env bash
# Run the whole test suite: (unless SKIP_E2E=1) the container end-to-end run, then the pytest suite:
# unit tests, the local pipeline on real digits, the server in a real browser, the manifest/Dockerfile/
# script checks, the local Kubernetes control plane and the real node.
# Installs what it needs itself (Debian packages when run as root, the virtualenv always).
# Extra arguments go to pytest, e.g. scripts/test.sh -k splitter (then the container run is left out);
# -h/--help prints this (pytest's own: .venv/bin/python -m pytest --help).
#   SKIP_E2E=1   leave out the container end-to-end run (tests/e2e/e2e-containers.sh)
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; } # the header comment above
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# System packages the tests use: a browser for the page test, shellcheck for the scripts, nginx (the
# server's buffering proxy, which server/server.py starts; Debian keeps it in /usr/sbin) and wrk (the
# server benchmark's load generator).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
PATH="$PATH:/usr/sbin" command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# The real node's NFS volumes: FUSE (libfuse3) for its userspace client, nftables for its kube-proxy.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
PATH="$PATH:/usr/sbin" command -v nft >/dev/null 2>&1 || need+=(nftables)
if ((${#need[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

"$root/scripts/bootstrap.sh" --dev
export TF_CPP_MIN_LOG_LEVEL=2
# The container run first: it builds the stage images, which the real-node tests then run under a kubelet.
if [[ "${SKIP_E2E:-0}" != "1" && $# -eq 0 ]]; then
  "$root/tests/e2e/e2e-containers.sh"
fi
"$root/.venv/bin/python" -m pytest "$@"
