#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the stage programs' pinned
# requirements into it. With --dev, also the test-only requirements.
# Re-running is cheap: nothing is installed when the requirement files have not changed.
#   VENV   where the virtualenv lives (default: <project>/.venv)
#   PYTHON the interpreter to build it from (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"

reqs=("$root"/splitter/requirements.txt "$root"/trainer/requirements.txt
      "$root"/aggregator/requirements.txt "$root"/server/requirements.txt)
if [[ "${1:-}" == "--dev" ]]; then
  reqs+=("$root/requirements-dev.txt")
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "bootstrap: $python not found; install Python 3.11 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi

# One stamp per mode: a dev install (a superset) also satisfies a plain one, so switching
# between `bootstrap.sh` and `bootstrap.sh --dev` never reinstalls back and forth.
base_hash="$(cat "${reqs[@]:0:4}" | sha256sum | cut -d' ' -f1)"
all_hash="$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)"
stamp_base="$venv/.requirements.sha256"
stamp_dev="$venv/.requirements-dev.sha256"
dev_hash="$(cat "${reqs[@]:0:4}" "$root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" ]]; then
  if [[ -f "$stamp_dev" && "$(cat "$stamp_dev")" == "$dev_hash" ]]; then
    exit 0
  fi
  if [[ ${#reqs[@]} -eq 4 && -f "$stamp_base" && "$(cat "$stamp_base")" == "$base_hash" ]]; then
    exit 0
  fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "bootstrap: creating virtualenv $venv" >&2
  "$python" -m venv "$venv" || {
    echo "bootstrap: could not create a virtualenv (Debian: apt-get install python3-venv)" >&2
    exit 1
  }
fi
echo "bootstrap: installing requirements into $venv (first run takes a few minutes)" >&2
"$venv/bin/python" -m pip install --quiet --upgrade pip
args=()
for r in "${reqs[@]}"; do args+=(-r "$r"); done
"$venv/bin/python" -m pip install --quiet "${args[@]}"
echo "$base_hash" >"$stamp_base"
if [[ ${#reqs[@]} -eq 5 ]]; then echo "$all_hash" >"$stamp_dev"; else rm -f "$stamp_dev"; fi
