#!/usr/bin/env bash
# Copy the shared code, common/mlkcommon.py, into every stage folder that uses it, as
# <stage>/mlkcommon.py with a generated first line. Each stage folder is its own image build context
# and imports nothing from another folder (docs/CONTRACTS.md), so the stages get copies of the one
# source: edit common/mlkcommon.py, then run this script and commit the copies with it.
# tests/test_common.py fails while a copy differs from the source.
#
#   scripts/sync-common.sh [--check] [-h|--help]
#
#   --check   change nothing: list the copies that differ from the source and exit 1 if any does
set -euo pipefail

me="sync-common"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
check=0
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --check) check=1 ;;
    *) unknown_argument "$arg" ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source_file="common/mlkcommon.py"
# The stage folders whose programs import mlkcommon (tests/test_common.py keeps the same list).
stages=(splitter trainer aggregator server)
header="# GENERATED from common/mlkcommon.py by scripts/sync-common.sh: edit that file, then run the script."

[[ -f "$root/$source_file" ]] || { echo "$me: $source_file not found" >&2; exit 1; }
expected="$(mktemp)"
trap 'rm -f "$expected"' EXIT
{ printf '%s\n' "$header"; cat "$root/$source_file"; } >"$expected"

stale=0
for stage in "${stages[@]}"; do
  copy="$stage/mlkcommon.py"
  if cmp -s "$expected" "$root/$copy"; then
    continue
  fi
  if ((check)); then
    echo "$me: $copy differs from $source_file (run scripts/sync-common.sh)"
    stale=1
    continue
  fi
  # temporary name in the same folder, then rename: a reader never sees half a file
  tmp="$root/$stage/.mlkcommon.py.tmp"
  cp "$expected" "$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$root/$copy"
  echo "$me: wrote $copy"
done
if ((check)); then
  ((stale == 0)) && echo "$me: every copy matches $source_file"
  exit "$stale"
fi
