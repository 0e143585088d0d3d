"""scripts/zygote.py: a program run in a fork of the server is the program run on its own (same weights, same
output and exit code, same errors); without a server it runs on its own; its process group and its client
end it; its command line is argparse's (usage errors one line, exit 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ZYGOTE = ROOT / "scripts/zygote.py"
TRAINER = ROOT / "trainer/trainer.py"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def weights(path):
    arrays = []
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(lambda name, obj: arrays.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zygote-data")
    rng = np.random.default_rng(5)
    np.savez(tmp / "0.npz", x=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 300))
    return tmp / "0.npz"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = Path(tmp_path_factory.mktemp("zygote"))
    socket_path = folder / "socket"
    with open(folder / "stderr", "w") as stderr:  # TensorFlow may log there on import (e.g. that oneDNN is on)
        proc = subprocess.Popen([sys.executable, str(ZYGOTE), "serve", "--socket", str(socket_path)], env=ENV,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline()  # printed once TensorFlow is imported
    try:
        assert "serving trainer.py, evaluate.py" in line, line + (folder / "stderr").read_text()
        yield socket_path, proc
    finally:  # a server that never said it serves is not left running either
        proc.terminate()
        proc.wait(timeout=30)


def run(socket_path, *args, **kwargs):
    return subprocess.run([sys.executable, str(ZYGOTE), "run", "--socket", str(socket_path), "--", *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


def train_args(shard, out):
    return ["trainer.py", "--data", shard, "--epoch", "1", "--batch", "32", "--savemodel", out, "--threads", "1"]


def test_trainer_in_a_fork_equals_the_trainer_on_its_own(server, shard, tmp_path):
    socket_path, proc = server
    forked = run(socket_path, *train_args(shard, tmp_path / "forked.h5"))
    assert forked.returncode == 0, forked.stderr
    assert f"saved: {tmp_path / 'forked.h5'}" in forked.stdout  # the client's stdout is the program's
    alone = subprocess.run([sys.executable, str(TRAINER), *map(str, train_args(shard, tmp_path / "alone.h5")[1:])],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    a, b = weights(tmp_path / "forked.h5"), weights(tmp_path / "alone.h5")
    assert [name for name, _ in a] == [name for name, _ in b] and len(a) >= 6
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b)), "the fork trained different weights"
    again = run(socket_path, *train_args(shard, tmp_path / "again.h5"))  # the server serves more than once
    assert again.returncode == 0 and proc.poll() is None
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, weights(tmp_path / "again.h5")))


def test_bad_input_gives_the_programs_own_error_and_exit_code(server, tmp_path):
    socket_path, _ = server
    forked = run(socket_path, "trainer.py", "--data", tmp_path / "absent.npz", "--epoch", "1", "--batch", "8",
                 "--savemodel", tmp_path / "m.h5")
    assert forked.returncode == 2
    assert forked.stderr.strip().startswith("trainer.py: error:") and "no such file" in forked.stderr
    assert len(forked.stderr.strip().splitlines()) == 1
    usage = run(socket_path, "trainer.py", "--epoch", "x")
    assert usage.returncode == 2 and "trainer.py: error:" in usage.stderr


def test_only_the_programs_beside_it_run(server, tmp_path):
    socket_path, _ = server
    refused = run(socket_path, "/bin/true")
    assert refused.returncode == 2 and "can only run trainer.py, evaluate.py" in refused.stderr


def test_without_a_server_the_program_runs_on_its_own(shard, tmp_path):
    # from another folder: the programs are found in ../trainer beside the script's own folder
    done = run(tmp_path / "no-such-socket", *train_args(shard, tmp_path / "m.h5"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.h5").is_file()
    assert run(tmp_path / "no-such-socket", "trainer.py", "--epoch", "1").returncode == 2


def zygote_cli(*args):
    return subprocess.run([sys.executable, str(ZYGOTE), *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv", [[], ["bogus"], ["serve"], ["serve", "--socket"], ["run", "--socket", "s"],
                                  ["run", "--", "trainer.py"], ["serve", "--socket", "s", "extra"]])
def test_usage_errors_are_one_line_and_exit_2(argv):
    done = zygote_cli(*argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("zygote.py") and ": error: " in done.stderr and done.stderr.count("\n") == 1, \
        done.stderr


def test_help_names_both_subcommands(tmp_path):
    done = zygote_cli("--help")
    assert done.returncode == 0 and "serve --socket PATH" in done.stdout
    assert "run --socket PATH -- PROGRAM.py [ARGS...]" in done.stdout
    assert "usage: zygote.py run --socket PATH -- PROGRAM.py" in zygote_cli("run", "--help").stdout
    refused = zygote_cli("run", "--socket", tmp_path / "s", "--", "/bin/true")  # checked before any connect
    assert refused.returncode == 2
    assert refused.stderr == "zygote.py: error: can only run trainer.py, evaluate.py, not /bin/true\n"


def forked_children(server_pid):
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == server_pid and fields[0] != "Z":
                children.append(int(entry))
    return children


def fork_of(server_pid, client_pid):
    """The server's child in the client's process group, or None."""
    for pid in forked_children(server_pid):
        try:
            if os.getpgid(pid) == client_pid:
                return pid
        except ProcessLookupError:
            pass
    return None


def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["process group", "client alone"])
def test_the_fork_ends_with_its_client(server, shard, tmp_path, how):
    socket_path, proc = server
    args = train_args(shard, tmp_path / "m.h5")
    args[args.index("--epoch") + 1] = "1000"  # minutes of training: only a kill ends it
    client = subprocess.Popen([sys.executable, str(ZYGOTE), "run", "--socket", str(socket_path), "--", *map(str, args)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              process_group=0)  # its own group in this session, as bash's set -m gives a job
    # This client's fork: the one in its process group (an earlier test's fork may still be on its way out).
    assert wait_until(lambda: fork_of(proc.pid, client.pid)), "no fork joined the client's process group"
    child = fork_of(proc.pid, client.pid)
    if how == "process group":
        os.killpg(client.pid, signal.SIGTERM)
    else:
        client.kill()
    client.wait(timeout=30)
    assert wait_until(lambda: child not in forked_children(proc.pid)), "the fork outlived its client"
    assert not (tmp_path / "m.h5").exists()
