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


def readme_layout():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_every_script_is_in_the_readme_layout_and_every_named_file_exists():
    """Adding a script without saying where it belongs fails here; so does naming one that is gone."""
    import re

    layout = readme_layout()
    scripts_part = layout[layout.index("\nscripts/"):layout.index("\nsamples/")]
    for path in sorted((REPO / "scripts").iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__":
            continue
        name = f"{path.name}/" if path.is_dir() else path.name
        stem = path.name.split(".")[0] if path.suffix == ".sh" else path.name
        assert re.search(rf"(?<![\w-]){re.escape(stem)}(?![\w-])", scripts_part) or f"scripts/{name}" in layout, \
            f"scripts/{name} is not in README.md's Layout"
    tracked = {Path(p).name for p in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                                     check=True).stdout.splitlines()}
    for named in set(re.findall(r"[\w-]+\.(?:py|sh|env|conf|md)\b", layout)):
        assert named in tracked, f"README.md's Layout names {named}, which is not in the repository"


@pytest.mark.parametrize("value, workers", [("0.67", 3), (".5", 4), ("0.34", 3), ("0.1", 7), ("0.999", 10), ("2", 3),
                                            ("1", 1)])
def test_min_workers_count_agrees_with_the_aggregator(value, workers):
    """scripts/lib.sh's min_workers_count (quickstart.sh, local-quickstart.sh) counts as aggregator.py's
    --min-workers does: the same whole number, or the same fraction rounded up."""
    import math

    from aggregator import min_workers_value

    shell = subprocess.run(["bash", "-c", f'me=t; source scripts/lib.sh; min_workers_count "{value}" {workers}'],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    parsed = min_workers_value(value)
    expected = parsed if isinstance(parsed, int) else max(1, math.ceil(parsed * workers))
    assert int(shell) == expected


@pytest.mark.parametrize("value", ["0", "1.5", "-1", "abc", "", "0.0", "1.0001"])
def test_min_workers_count_refuses_what_the_aggregator_refuses(value):
    import argparse

    from aggregator import min_workers_value

    with pytest.raises(argparse.ArgumentTypeError):
        min_workers_value(value)
    proc = subprocess.run(["bash", "-c", f'me=t; source scripts/lib.sh; min_workers_count "{value}" 3'], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout == ""
