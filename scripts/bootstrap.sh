#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the stage programs' pinned
# requirements into it. With --dev, also the test-only requirements.
# Re-running is cheap: nothing is installed when the requirement files have not changed.
# A half-made virtualenv (its python runs no pip, e.g. after an interrupted first run) is
# removed and made again. Supported: Python 3.11, 3.12 and 3.13; others are refused.
#   scripts/bootstrap.sh [--dev]
#   VENV   where the virtualenv lives (default: <project>/.venv)
#   PYTHON the interpreter to build it from (default: python3)
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; } # the header comment above
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bootstrap: unknown argument '$arg' (only --dev; try --help)" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
supported="3.11, 3.12 or 3.13"

reqs=("$root"/splitter/requirements.txt "$root"/trainer/requirements.txt
      "$root"/aggregator/requirements.txt "$root"/server/requirements.txt)
if ((dev)); then
  reqs+=("$root/requirements-dev.txt")
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

# Installing: first make sure the virtualenv is whole (a stamped one was, so this runs only here).
if [[ -e "$venv/bin/python" || -L "$venv/bin/python" ]] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [[ ! -f "$venv/pyvenv.cfg" ]]; then
    echo "bootstrap: $venv/bin/python has no working pip and $venv is not a virtualenv (no pyvenv.cfg); remove it or set VENV" >&2
    exit 1
  fi
  echo "bootstrap: $venv is half-made (its python has no working pip); removing it and making it again" >&2
  rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "bootstrap: $python not found; install Python $supported (Debian: apt-get install python3 python3-venv) or set PYTHON" >&2
    exit 1
  fi
  version="$("$python" -c 'import sys; print(sys.version_info[:2])' 2>/dev/null || true)"
  if [[ "$version" =~ ^\(([0-9]+),\ ([0-9]+)\)$ ]]; then
    version="Python ${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  else
    version="of unknown version (not a working Python?)"
  fi
  case "$version" in
    "Python 3.11" | "Python 3.12" | "Python 3.13") ;;
    *)
      echo "bootstrap: $python is $version; supported are $supported (set PYTHON, e.g. PYTHON=python3.11)" >&2
      exit 1
      ;;
  esac
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
