"""The shared code, common/mlkcommon.py, and its copies in the stage folders (docs/CONTRACTS.md).

Each stage folder is its own image build context, so scripts/sync-common.sh copies the one source into
<stage>/mlkcommon.py behind a generated header. Checked here: every copy is the header plus the source
to the byte; no program keeps a Parser class, an atomic writer, a sha256 or mlk_* attribute helper of
its own; and every program answers a usage error with one line on stderr and exit code 2, before
TensorFlow is imported and before it writes anything.
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "common" / "mlkcommon.py"
SYNC = ROOT / "scripts" / "sync-common.sh"
HEADER = "# GENERATED from common/mlkcommon.py by scripts/sync-common.sh: edit that file, then run the script.\n"
STAGES = ("splitter", "trainer", "aggregator", "server")

sys.path.insert(0, str(ROOT / "common"))
import mlkcommon  # noqa: E402

# A file that defines one of these has its own copy of what mlkcommon.py holds.
OWN_COPIES = {
    "Parser class": re.compile(r"^\s*class \w+\((argparse\.)?ArgumentParser\)", re.M),
    "atomic writer (os.replace/os.rename)": re.compile(r"\bos\.(replace|rename)\("),
    "temporary file for an atomic write": re.compile(r"\btempfile\.mkstemp\("),
    "sha256 of a file": re.compile(r"def \w*sha256\w*\(|hashlib\.sha256\(\w+\.read\(|hashlib\.file_digest\("),
    "mlk_* attribute reader": re.compile(r"""startswith\(["']mlk_["']\)"""),
}


def checked_files():
    """The programs and their modules in the stage folders (not the copies), and scripts/make-samples.py."""
    files = [p for stage in STAGES for p in sorted((ROOT / stage).glob("*.py")) if p.name != "mlkcommon.py"]
    return files + [ROOT / "scripts" / "make-samples.py"]


def marked(path):
    return pytest.param(path, id=path.relative_to(ROOT).as_posix())


# --- the copies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_copy_is_the_header_plus_the_source(stage):
    copy = ROOT / stage / "mlkcommon.py"
    assert copy.is_file(), f"{stage}/mlkcommon.py missing: run scripts/sync-common.sh"
    assert copy.read_text() == HEADER + SOURCE.read_text(), (
        f"{stage}/mlkcommon.py differs from common/mlkcommon.py: edit common/mlkcommon.py, then run "
        "scripts/sync-common.sh (never edit a copy)")


def test_sync_script_serves_exactly_these_stages_and_the_importing_ones_have_copies():
    listed = re.search(r"^stages=\(([^)]*)\)", SYNC.read_text(), re.M)
    assert listed and tuple(listed.group(1).split()) == STAGES
    importers = {p.parent.name for p in ROOT.glob("*/*.py")  # scripts/, benchmarks/: no image, they import common/
                 if p.parent.name not in ("common", "scripts", "benchmarks", "tests") and p.name != "mlkcommon.py"
                 and re.search(r"^\s*from mlkcommon import", p.read_text(), re.M)}
    assert importers <= set(STAGES), f"stage folders importing mlkcommon that get no copy: {importers - set(STAGES)}"


def test_sync_check_agrees():
    proc = subprocess.run([str(SYNC), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_source_imports_only_the_standard_library_at_module_level():
    top = re.findall(r"^(?:import|from) (\w+)", SOURCE.read_text(), re.M)
    assert set(top) <= set(sys.stdlib_module_names), set(top) - set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", [marked(p) for p in checked_files()])
def test_no_program_keeps_its_own_copy_of_the_shared_code(path):
    text = path.read_text()
    found = [what for what, pattern in OWN_COPIES.items() if pattern.search(text)]
    assert not found, f"{path.relative_to(ROOT)} defines its own {', '.join(found)}: import it from mlkcommon"


# --- every program: a usage error is one line on stderr and exit code 2 ---------------------------

# Runs a program as `python PROGRAM ARGS...` would, then says on stdout whether TensorFlow was imported.
DRIVER = """
import atexit, os, runpy, sys
atexit.register(lambda: ("tensorflow" in sys.modules or "keras" in sys.modules) and print("IMPORTED TENSORFLOW"))
program = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(program))
runpy.run_path(program, run_name="__main__")
"""


def programs(tmp):
    """{program: (argv that would run, bad number flag)}; nothing named in the argv exists except tmp."""
    return {
        "splitter/splitter.py": (["--n_container", "2", "--savedir", f"{tmp}/data"], "--n_container"),
        "trainer/trainer.py": (["--data", f"{tmp}/0.npz", "--epoch", "1", "--batch", "10",
                                "--savemodel", f"{tmp}/m.h5"], "--epoch"),
        "trainer/evaluate.py": (["--modelpath", f"{tmp}/m.h5", "--data", f"{tmp}/test.npz"], "--batch"),
        "aggregator/aggregator.py": (["--dir", str(tmp), "--savefile", f"{tmp}/a.h5"], "--expect"),
        "server/server.py": (["--model", f"{tmp}/m.h5"], "--workers"),
        "scripts/make-samples.py": (["--out", f"{tmp}/samples", "--dataset", f"{tmp}/mnist.npz"], "--seed"),
    }


def with_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


CASES = {
    "no-arguments": lambda argv, flag: [],
    "unknown-flag": lambda argv, flag: argv + ["--bogus"],
    "not-a-number": lambda argv, flag: with_flag(argv, flag, "two"),
    "negative": lambda argv, flag: with_flag(argv, flag, "-1"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("program", list(programs("T")))
def test_usage_error_is_one_line_and_exit_2(program, case, tmp_path):
    argv, flag = programs(tmp_path)[program]
    argv = CASES[case](argv, flag)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / program), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    name = Path(program).stem
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert len(proc.stderr.splitlines()) == 1, f"stderr should be one line:\n{proc.stderr}"
    assert proc.stderr.startswith(name) and "error" in proc.stderr, proc.stderr
    if case == "unknown-flag":
        assert "--bogus" in proc.stderr
    elif case != "no-arguments":
        assert flag in proc.stderr
    assert "IMPORTED TENSORFLOW" not in proc.stdout, "TensorFlow was imported before the usage error"
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == [], "a usage error wrote files"


# --- the shared code itself --------------------------------------------------------------------------

def test_parser_error_is_one_line_exit_2_and_help_exits_0(capsys):
    parser = mlkcommon.Parser(prog="p.py")
    parser.add_argument("--n", type=mlkcommon.int_at_least(1), required=True)
    assert mlkcommon.parse_args(parser, ["--n", "0"]) == 2
    assert capsys.readouterr().err == "p.py: error: argument --n: must be >= 1, got 0\n"
    assert mlkcommon.parse_args(parser, ["--n", "x"]) == 2
    assert "invalid int value: 'x'" in capsys.readouterr().err
    assert mlkcommon.parse_args(parser, ["-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: p.py")
    assert mlkcommon.parse_args(parser, ["--n", "3"]) == argparse.Namespace(n=3)
    assert mlkcommon.error("p", "two\nlines", 1) == 1
    assert capsys.readouterr().err == "p: error: two lines\n"


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with mlkcommon.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin-") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and target.read_bytes() == b"old"
    mlkcommon.write_bytes_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and target.read_bytes() == b"new"
    assert mlkcommon.sha256_file(target) == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"


def test_mlk_attrs_round_trip(tmp_path):
    import h5py
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = "{}"
        f.attrs["mlk_old"] = 1
    mlkcommon.write_mlk_attrs(path, {"mlk_kind": "worker", "mlk_samples": 5, "mlk_inputs": [{"file": "a"}]},
                              replace=True)
    assert mlkcommon.read_mlk_attrs(path) == {"mlk_kind": "worker", "mlk_samples": 5, "mlk_inputs": [{"file": "a"}]}
    with h5py.File(path, "r") as f:
        assert f.attrs["model_config"] == "{}" and mlkcommon.read_mlk_attrs(f)["mlk_samples"] == 5
    with pytest.raises(ValueError):
        mlkcommon.write_mlk_attrs(path, {"kind": "x"})


def test_utc_iso_is_the_one_time_stamp_format():
    import datetime

    assert mlkcommon.utc_iso(0) == "1970-01-01T00:00:00Z"
    assert mlkcommon.utc_iso(1764892800.9) == "2025-12-05T00:00:00Z"  # whole seconds, truncated
    now = datetime.datetime.strptime(mlkcommon.utc_iso(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - now).total_seconds()) < 5
    for path in [p for stage in STAGES for p in (ROOT / stage).glob("*.py") if p.name != "mlkcommon.py"]:
        assert "%Y-%m-%dT%H:%M:%SZ" not in path.read_text(), f"{path}: use mlkcommon.utc_iso"


def test_fingerprint_is_the_contracts_definition():
    """docs/CONTRACTS.md: sha256 over each array's shape text ("2x3;") and float32 little-endian bytes, in order."""
    import hashlib

    import numpy as np

    a = np.arange(6, dtype=np.float64).reshape(2, 3)  # float64 in: hashed as float32
    b = np.array([1.5], dtype=np.float32)
    by_hand = hashlib.sha256(b"2x3;" + np.arange(6, dtype="<f4").tobytes() + b"1;" + b.astype("<f4").tobytes())
    assert mlkcommon.fingerprint([a, b]) == by_hand.hexdigest()
    assert mlkcommon.fingerprint([b, a]) != by_hand.hexdigest()  # the order counts
    assert mlkcommon.fingerprint(iter([a, b])) == by_hand.hexdigest()  # any iterable


@pytest.mark.parametrize("text, reason", [
    (b"{not json", "not a readable JSON ledger"),
    (b"\xff\xfe", "not a readable JSON ledger"),
    (b"[]", "not a round ledger"),
    (b'{"format": "other/1", "rounds": []}', "not a round ledger"),
    (b'{"format": "mlk-ledger/1", "rounds": {}}', "must be a list"),
    (b'{"format": "mlk-ledger/1", "rounds": [{"round": "1"}]}', 'integer "round"'),
])
def test_read_ledger_refuses_what_is_not_a_ledger(text, reason, tmp_path):
    path = tmp_path / "ledger.json"
    path.write_bytes(text)
    with pytest.raises(mlkcommon.LedgerFormatError, match=re.escape(reason)) as caught:
        mlkcommon.read_ledger(path)
    assert "\n" not in str(caught.value)


def test_read_ledger_reads_a_ledger_and_says_when_there_is_none(tmp_path):
    path = tmp_path / "ledger.json"
    with pytest.raises(FileNotFoundError):
        mlkcommon.read_ledger(path)
    path.write_text('{"format": "mlk-ledger/1", "rounds": [{"round": 1, "aggregate": {}}], "extra": 1}')
    assert mlkcommon.read_ledger(path)["rounds"] == [{"round": 1, "aggregate": {}}]
    for stage in ("aggregator/ledger.py", "trainer/evaluate.py", "server/app.py"):
        assert '"mlk-ledger/1"' not in (ROOT / stage).read_text(), f"{stage}: use mlkcommon.LEDGER_FORMAT"


def test_wait_until_reports_while_waiting_and_says_when_time_ran_out(capsys):
    looks = []

    def fourth_look():
        looks.append(1)
        return len(looks) >= 4

    waited = mlkcommon.wait_until(fourth_look, 30, "/mnt/data/0.npz", "(the splitter writes it)", "p: ", poll=0.05,
                                  report_every=0.04)
    lines = capsys.readouterr().out.splitlines()
    assert waited is not None and 0.05 <= waited < 5 and len(looks) == 4
    assert lines[0] == "p: waiting up to 30s for /mnt/data/0.npz (the splitter writes it)"
    assert lines[1].startswith("p: still waiting for /mnt/data/0.npz (")
    assert lines[-1].startswith("p: /mnt/data/0.npz is there after ")
    assert mlkcommon.wait_until(lambda: True, 30, "x") == 0.0 and capsys.readouterr().out == ""
    assert mlkcommon.wait_until(lambda: False, 0.2, "x", poll=0.05) is None
    assert capsys.readouterr().out == "waiting up to 0.2s for x\n"
