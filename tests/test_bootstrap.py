"""scripts/bootstrap.sh: supported Python versions, recovery from a half-made virtualenv, the cheap re-run.
Every test uses a temp VENV and stand-in interpreters (bash scripts that log their calls), so nothing is
installed or downloaded."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bootstrap.sh"
STAGE_REQS = [REPO / f"{stage}/requirements.txt" for stage in ("splitter", "trainer", "aggregator", "server")]


def script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def fake_python(tmp_path, version="(3, 11)", creates_venv=True):
    """A stand-in `python3`: answers the version check with `version`; `-m venv DIR` makes a stand-in
    virtualenv whose python accepts every `-m pip ...` (logged, nothing installed)."""
    calls = tmp_path / "calls"
    venv_python = script(tmp_path / "venv-python", f'echo "venv-python $*" >>"{calls}"\nexit 0\n')
    make = (f'mkdir -p "$3/bin" && cp "{venv_python}" "$3/bin/python" && touch "$3/pyvenv.cfg"' if creates_venv
            else 'echo "Error: ensurepip is not available" >&2; exit 1')
    python = script(tmp_path / "python3", f'''echo "python3 $*" >>"{calls}"
if [[ "$1" == -c ]]; then echo "{version}"; exit 0; fi
if [[ "$1 $2" == "-m venv" ]]; then {make}; exit; fi
exit 1
''')
    return python, calls


def run(venv, python, *args):
    env = dict(os.environ, VENV=str(venv), PYTHON=str(python))
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def logged(calls):
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("version, shown", [("(3, 10)", "Python 3.10"), ("(3, 14)", "Python 3.14"),
                                            ("(2, 7)", "Python 2.7"), ("garbage", "of unknown version")])
def test_refuses_unsupported_python_in_one_line(tmp_path, version, shown):
    python, calls = fake_python(tmp_path, version)
    venv = tmp_path / "venv"
    proc = run(venv, python)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{python} is {shown}" in proc.stderr and "supported are 3.11, 3.12 or 3.13" in proc.stderr
    assert not venv.exists()
    assert not any("venv" in c for c in logged(calls))


@pytest.mark.parametrize("version", ["(3, 11)", "(3, 12)", "(3, 13)"])
def test_supported_python_builds_the_venv_and_installs_the_pins(tmp_path, version):
    python, calls = fake_python(tmp_path, version)
    venv = tmp_path / "venv"
    proc = run(venv, python, "--dev")
    assert proc.returncode == 0, proc.stderr
    assert f"python3 -m venv {venv}" in logged(calls)
    installs = [c for c in logged(calls) if c.startswith("venv-python -m pip install")]
    assert installs[0] == "venv-python -m pip install --quiet --upgrade pip"
    assert all(f"-r {r}" in installs[1] for r in STAGE_REQS + [REPO / "requirements-dev.txt"])
    assert (venv / ".requirements-dev.sha256").is_file() and (venv / ".requirements.sha256").is_file()


def test_half_made_venv_is_removed_and_made_again(tmp_path):
    venv = tmp_path / "venv"
    (venv / "lib").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "lib" / "left-over").write_text("from the interrupted run")
    script(venv / "bin" / "python", 'if [[ "$*" == "-m pip --version" ]]; then echo "No module named pip" >&2; exit 1; fi\n'
                                    "exit 0\n")
    python, calls = fake_python(tmp_path)
    proc = run(venv, python)
    assert proc.returncode == 0, proc.stderr
    assert f"bootstrap: {venv} is half-made (its python has no working pip); removing it and making it again" \
        in proc.stderr.splitlines()
    assert not (venv / "lib" / "left-over").exists()
    assert f"python3 -m venv {venv}" in logged(calls)
    assert "venv-python -m pip install --quiet --upgrade pip" in logged(calls)
    assert (venv / ".requirements.sha256").is_file()


def test_half_made_venv_then_a_failing_create_stops_with_one_line(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3.11")  # its base interpreter was removed
    python, _ = fake_python(tmp_path, creates_venv=False)
    proc = run(venv, python)
    assert proc.returncode == 1
    assert "half-made" in proc.stderr and "could not create a virtualenv" in proc.stderr.splitlines()[-1]
    assert not venv.exists()


def test_a_directory_that_is_not_a_venv_is_left_alone(tmp_path):
    venv = tmp_path / "not-a-venv"
    script(venv / "bin" / "python", "exit 1\n")
    (venv / "precious").write_text("keep me")
    python, calls = fake_python(tmp_path)
    proc = run(venv, python)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "not a virtualenv (no pyvenv.cfg)" in proc.stderr
    assert (venv / "precious").read_text() == "keep me" and logged(calls) == []


def test_a_stamped_venv_is_reused_without_running_anything(tmp_path):
    venv = tmp_path / "venv"
    calls = tmp_path / "calls"
    script(venv / "bin" / "python", f'echo "venv-python $*" >>"{calls}"\nexit 1\n')
    (venv / ".requirements.sha256").write_text(hashlib.sha256(b"".join(p.read_bytes() for p in STAGE_REQS)).hexdigest()
                                               + "\n")
    python, _ = fake_python(tmp_path)
    proc = run(venv, python)
    assert proc.returncode == 0 and proc.stderr == ""
    assert logged(calls) == []  # neither the pip check nor an install: re-running stays cheap
