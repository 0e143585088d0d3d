#!/usr/bin/env bash
# Policy scan of the Kubernetes manifests with checkov: every file in manifests/ (and variants/) is
# rendered with scripts/render.sh and scanned; the project-wide exceptions and their reasons are in
# .checkov.yaml, the NFS server's in annotations on it. Exit 0 only when nothing else fails.
# checkov conflicts with the project's pins, so it lives in its own virtualenv, .venv-checkov
# (created on first use; CHECKOV_VENV overrides the place). MANIFESTS [manifests/]: the folder to scan.
set -euo pipefail

me="policy-check.sh"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" # this file is tests/policy-check.sh
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
no_arguments "$@"
venv="${CHECKOV_VENV:-$root/.venv-checkov}"
checkov_version="3.3.30"
python="${PYTHON:-python3}"
manifests="${MANIFESTS:-$root/manifests}"

installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true)"
if [[ ! -x "$venv/bin/checkov" || "$installed" != "$checkov_version" ]]; then
  echo "$me: installing checkov==$checkov_version into $venv" >&2
  "$python" -m venv "$venv" || { echo "$me: cannot create a virtualenv with $python (Debian: apt-get install python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$checkov_version" \
    || { echo "$me: pip could not install checkov==$checkov_version" >&2; exit 1; }
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The placeholders' sample values (scripts/images.env): the policies do not depend on them.
# shellcheck source=scripts/images.env disable=SC1091
source "$root/scripts/images.env"
export "${PLACEHOLDERS[@]}"
shopt -s nullglob
files=("$manifests"/*.yaml "$manifests"/variants/*.yaml)
((${#files[@]})) || { echo "$me: no manifests under $manifests" >&2; exit 1; }
for file in "${files[@]}"; do
  name="${file#"$manifests/"}"
  "$root/scripts/render.sh" "$file" >"$work/${name//\//-}"
done

echo "$me: scanning ${#files[@]} rendered manifests with checkov $checkov_version" >&2
if ! "$venv/bin/checkov" --config-file "$root/.checkov.yaml" --directory "$work"; then
  echo "$me: checkov found failing checks (fix them, or add a skip with its reason to .checkov.yaml)" >&2
  exit 1
fi
echo "$me: passed" >&2
