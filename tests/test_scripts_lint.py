"""Every shell script (scripts/*.sh, the test harnesses tests/**/*.sh and the CI entry point .ci/run) is clean
under shellcheck, following
sourced files (scripts/images.env) as CI sees them from the repo root."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "scripts").glob("*.sh")) + sorted(REPO.glob("tests/**/*.sh")) + [REPO / ".ci" / "run"]


def shellcheck():
    path = shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck is not installed (Debian: apt-get install shellcheck; scripts/test.sh does this as root)")
    return path


def test_there_are_scripts_to_check():
    paths = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"scripts/quickstart.sh", "scripts/teardown.sh", "scripts/render.sh", "tests/policy-check.sh",
            "tests/e2e/e2e-containers.sh", "tests/e2e/make-base-image.sh", ".ci/run"} <= paths


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script):
    proc = subprocess.run([shellcheck(), "--external-sources", "--severity=style", "--format=gcc",
                           str(script.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "lib.sh"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_strict_bash_header(script):  # scripts/lib.sh is sourced by them (shell=bash directive), not run
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines[:40]
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def test_shellcheck_would_catch_a_mistake(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nset -euo pipefail\nfor f in $(ls *.txt); do rm $f; done\n")
    proc = subprocess.run([shellcheck(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2045" in proc.stdout
