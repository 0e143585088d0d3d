"""scripts/local-quickstart.sh end to end: a real run on a subset of real MNIST, and its failure paths
(bad configuration, bad dataset, a failing worker, Ctrl-C) — each must stop the run and name the stage."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import helpers
from helpers import clean_env
from helpers import mlk_attrs as attrs

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local-quickstart.sh"
VENV = Path(sys.prefix)  # the project venv running these tests (scripts/test.sh bootstraps it)

# 2 workers x 1 epoch x 2 rounds, batch 32 (more steps than 100 on so few digits), on 6000 real training digits. Measured on this 2-core machine:
# 0.939 test accuracy on the 1000 test digits (whole file: ~55 s); the bar leaves room for TF/thread nondeterminism.
ACCURACY_BAR = 0.92


def run(env_overrides, timeout=300, **kwargs):
    env = clean_env(**{"TF_CPP_MIN_LOG_LEVEL": "2", "VENV": str(VENV), **env_overrides})
    return subprocess.run(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, **kwargs)


REAL_RUN = {"WORKER_NUMBER": "2", "EPOCH": "1", "ROUNDS": "2", "BATCH": "32", "SERVE": "0"}


@pytest.fixture(scope="module")
def real_run(subset, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    started = time.perf_counter()
    proc = run({**REAL_RUN, "WORK_DIR": str(work), "MNIST_NPZ": str(subset)})
    proc.seconds = time.perf_counter() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return work, proc


def test_lays_out_work_dir_like_the_volume(real_run):
    work, _ = real_run
    for name in ("data/0.npz", "data/1.npz", "data/test.npz", "model/0-model.h5", "model/1-model.h5",
                 "aggregated-model.h5"):
        assert (work / name).is_file(), name
    assert not (work / "data/2.npz").exists()
    assert sorted(p.name for p in (work / "model").iterdir()) == [  # each beside its live progress (issue 32)
        "0-model.h5", "0-model.progress.json", "1-model.h5", "1-model.progress.json"]
    with np.load(work / "data/test.npz") as d:
        assert d["x"].shape == (1000, 28, 28)
    assert sum(attrs(work / f"model/{i}-model.h5")["mlk_samples"] for i in range(2)) == 6000


def test_aggregated_model_is_round_two_of_two_workers(real_run):
    work, _ = real_run
    agg = attrs(work / "aggregated-model.h5")
    assert agg["mlk_kind"] == "aggregated"
    assert agg["mlk_round"] == 2 and agg["mlk_workers"] == 2 and agg["mlk_samples"] == 6000
    workers = [attrs(work / f"model/{i}-model.h5") for i in range(2)]
    assert all(w["mlk_round"] == 2 and w["mlk_epochs"] == 1 for w in workers)
    # round 2 started both workers from round 1's aggregate: one shared initial fingerprint
    assert workers[0]["mlk_init_fingerprint"] == workers[1]["mlk_init_fingerprint"] == agg["mlk_init_fingerprint"]


def test_prints_accuracy_above_the_bar_and_a_summary(real_run):
    work, proc = real_run
    result = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    assert result["accuracy"] >= ACCURACY_BAR, proc.stdout[-2000:]
    summary = re.search(r"test accuracy: (\d\.\d{4})", proc.stdout)
    assert summary and abs(float(summary.group(1)) - result["accuracy"]) < 1e-4
    for stage in ("split", "train (round 1/2)", "aggregate (round 1/2)", "train (round 2/2)",
                  "aggregate (round 2/2)", "evaluate", "total"):
        assert re.search(rf"^\s+{re.escape(stage)}\s+\d+\.\ds$", proc.stdout, re.M), stage
    print(f"quickstart subset run: {proc.seconds:.1f}s, accuracy {result['accuracy']:.4f}")


def test_shows_each_workers_progress_and_keeps_its_log(real_run):
    work, proc = real_run
    for i in range(2):
        assert re.search(rf"^\[worker {i}\] epoch 1/1 - loss [\d.]+ - accuracy [\d.]+ - \d+ samples/s$",
                         proc.stdout, re.M)
        for r in (1, 2):
            log = (work / f"logs/round-{r}-worker-{i}.log").read_text()
            assert "epoch 1/1" in log and f"saved: {work}/model/{i}-model.h5" in log
            assert "[worker" not in log  # the log holds the trainer's own lines, unprefixed
    assert re.search(r"2 trainers with \d+ TensorFlow thread", proc.stdout)


def weights(path):
    """{dataset path: array} of every weight of an .h5 model."""
    import h5py

    found = {}
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return found


def ledger_rounds(work):
    return json.loads((work / "rounds/ledger.json").read_text())["rounds"]


def test_keeps_every_round_in_the_ledger_with_accuracies_and_a_plot(real_run):
    work, proc = real_run
    rounds = ledger_rounds(work)
    assert [e["round"] for e in rounds] == [1, 2]
    assert (work / "aggregated-model.h5").read_bytes() == (work / "rounds/r2.h5").read_bytes()
    assert rounds[0]["start"]["file"] == "rounds/r0.h5" and rounds[1]["start"]["file"] == "rounds/r1.h5"
    result = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    assert rounds[-1]["test_accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)
    for e in rounds:
        assert e["expected_workers"] == e["min_workers"] == 2 and e["missing"] == 0 and e["samples"] == 6000
        assert 0.5 < e["test_accuracy"] <= 1 and e["round_seconds"] > 0
        assert [w["file"] for w in e["workers"]] == ["0-model.h5", "1-model.h5"]
        assert all(0.5 < w["accuracy"] <= 1 and w["update_norm"] > 0 for w in e["workers"])
    png = (work / "rounds/history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"history: {work}/rounds/ledger.json" in proc.stdout
    verify = subprocess.run([str(VENV / "bin/python"), str(REPO / "aggregator/ledger.py"), "verify", "--dir", str(work)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and json.loads(verify.stdout.splitlines()[-1])["last_round"] == 2


def test_resume_after_a_kill_between_rounds_is_bit_exact(real_run, subset, tmp_path):
    """The same run, killed once round 1 is in the ledger (round 2's trainers running), then RESUME=1: the final
    aggregate's weights equal the uninterrupted run's bit for bit. Then a changed round file is refused."""
    reference, _ = real_run
    work = tmp_path / "work"
    env = clean_env(TF_CPP_MIN_LOG_LEVEL="2", VENV=str(VENV), WORK_DIR=str(work), MNIST_NPZ=str(subset), **REAL_RUN)
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (work / "rounds/ledger.json").exists() and len(ledger_rounds(work)) == 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed between rounds"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and len(ledger_rounds(work)) == 1

    resumed = run({**REAL_RUN, "WORK_DIR": str(work), "MNIST_NPZ": str(subset), "RESUME": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing with round 2 of 2" in resumed.stdout and "train (round 1/2)" not in resumed.stdout
    assert [e["round"] for e in ledger_rounds(work)] == [1, 2]
    for name in ("rounds/r1.h5", "aggregated-model.h5"):
        got, want = weights(work / name), weights(reference / name)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), f"{name}: {k} differs"

    data = bytearray((work / "rounds/r1.h5").read_bytes())
    data[-64] ^= 1
    (work / "rounds/r1.h5").write_bytes(bytes(data))
    refused = run({**REAL_RUN, "WORK_DIR": str(work), "MNIST_NPZ": str(subset), "RESUME": "1"}, timeout=120)
    assert refused.returncode != 0
    assert "rounds/r1.h5" in refused.stderr and "sha256 differs" in refused.stderr
    assert "stage resume failed" in refused.stderr and "== split" not in refused.stdout


# --- where MNIST comes from (helpers.mnist_path(), used by the fixtures above and the dev scripts) ---

def test_mnist_lookup_order_is_env_then_shared_then_the_splitters_download(tmp_path, monkeypatch):
    splitter = helpers.splitter_module()
    source = tmp_path / "served.npz"
    source.write_bytes(b"a stand-in for mnist.npz")
    fetched = []

    def fake_fetch(url, dest):  # the splitter's own download_mnist runs, minus the network
        fetched.append(url)
        Path(dest).write_bytes(source.read_bytes())

    monkeypatch.setattr(splitter, "fetch", fake_fetch)
    monkeypatch.setattr(splitter, "MNIST_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shared = tmp_path / "shared" / "datasets" / "mnist.npz"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"shared copy")
    monkeypatch.setattr(helpers, "SHARED_MNIST", shared)

    monkeypatch.setenv("MNIST_NPZ", str(tmp_path / "mine.npz"))
    assert helpers.mnist_path() == tmp_path / "mine.npz"  # MNIST_NPZ wins, even over an existing shared copy
    monkeypatch.setenv("MNIST_NPZ", "")  # empty counts as unset, as in the splitter
    assert helpers.mnist_path() == shared
    monkeypatch.delenv("MNIST_NPZ")
    assert helpers.mnist_path() == shared and fetched == []
    shared.unlink()
    cached = tmp_path / "cache" / "mlk-mnist" / "mnist.npz"
    assert helpers.mnist_path() == cached and cached.read_bytes() == source.read_bytes()
    assert fetched == [splitter.MNIST_URL]
    assert helpers.mnist_path() == cached and len(fetched) == 1  # the verified cached copy is reused


def test_mnist_lookup_reports_a_failed_download_in_one_line(tmp_path, monkeypatch):
    splitter = helpers.splitter_module()

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(splitter, "fetch", offline)
    monkeypatch.delenv("MNIST_NPZ", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(helpers, "SHARED_MNIST", tmp_path / "no-shared" / "mnist.npz")
    with pytest.raises(helpers.MnistUnavailable, match="set MNIST_NPZ") as e:
        helpers.mnist_path()
    assert "\n" not in str(e.value)


# --- failure paths -------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("WORKER_NUMBER", "0"), ("EPOCH", "-1"), ("BATCH", "ten"),
                                         ("ROUNDS", "1.5"), ("PORT", "70000"), ("SERVE", "yes"),
                                         ("INTERNAL_PORT", "5000")])
def test_bad_setting_is_refused_before_any_work(tmp_path, name, value):
    work = tmp_path / "work"
    proc = run({"SERVE": "0", "WORK_DIR": str(work), name: value}, timeout=30)
    assert proc.returncode != 0
    assert "stage config failed" in proc.stderr and name in proc.stderr and f"'{value}'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not work.exists()


def test_bad_dataset_fails_the_split_stage(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_text("not a zip")
    proc = run({"MNIST_NPZ": str(bad), "WORK_DIR": str(tmp_path / "work"), "SERVE": "0"}, timeout=60)
    assert proc.returncode != 0
    assert "stage split failed" in proc.stderr
    assert f"splitter: error: {bad}" in proc.stdout + proc.stderr  # the splitter's own reason is shown
    assert "train (round" not in proc.stdout


def fake_venv(tmp_path, fail_shard, hang_shard="none"):
    """A venv whose python records each process id, fails trainer runs on the shards fail_shard matches (a bash
    pattern) and lets those on hang_shard sleep (a trainer that never finishes).

    bootstrap.sh accepts a venv whose stamp matches the requirement files, so the stamp is written
    the way bootstrap.sh writes it."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    reqs = [REPO / f"{stage}/requirements.txt" for stage in ("splitter", "trainer", "aggregator", "server")]
    (venv / ".requirements.sha256").write_text(hashlib.sha256(b"".join(p.read_bytes() for p in reqs)).hexdigest()
                                               + "\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    wrapper = venv / "bin/python"
    wrapper.write_text(f"""#!/usr/bin/env bash
for arg in "$@"; do
  if [[ "$arg" == */data/{fail_shard}.npz ]]; then
    sleep 2  # let the other workers start, so the test can see them being stopped
    echo "injected failure on shard {fail_shard}" >&2; exit 3
  fi
  if [[ "$arg" == */data/{hang_shard}.npz ]]; then echo $$ > "{pids}/$$"; exec sleep 600; fi
done
if [[ "$*" == *trainer.py* ]]; then echo $$ > "{pids}/$$"; fi
exec "{VENV}/bin/python" "$@"
""")
    wrapper.chmod(0o755)
    return venv, pids


def gone(pid, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, waiting to be reaped by whoever inherited it
            return True
        time.sleep(0.1)
    return False


def test_failing_worker_stops_the_run_and_its_siblings(subset, tmp_path):
    venv, pids = fake_venv(tmp_path, fail_shard=1)
    work = tmp_path / "work"
    proc = run({"VENV": str(venv), "WORKER_NUMBER": "2", "EPOCH": "20", "ROUNDS": "2", "SERVE": "0",
                "WORK_DIR": str(work), "MNIST_NPZ": str(subset)}, timeout=120)
    assert proc.returncode != 0
    assert "stage train (round 1/2) failed: worker 1 exited with code 3" in proc.stderr
    assert "injected failure on shard 1" in proc.stderr  # the log tail is shown
    assert "round-1-worker-1.log" in proc.stderr
    assert "aggregate" not in proc.stdout and not (work / "aggregated-model.h5").exists()
    started = [int(p.name) for p in pids.iterdir()]
    assert started, "worker 0 never started"
    assert all(gone(pid) for pid in started), "worker 0 kept running after its sibling failed"
    assert not (work / "model/0-model.h5").exists()


def test_ctrl_c_stops_the_trainers(subset, tmp_path):
    venv, pids = fake_venv(tmp_path, fail_shard=99)
    env = {k: v for k, v in os.environ.items() if k not in ("ROUNDS", "SERVE")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", VENV=str(venv), WORKER_NUMBER="2", EPOCH="20", SERVE="0",
               WORK_DIR=str(tmp_path / "work"), MNIST_NPZ=str(subset))
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(list(pids.iterdir())) == 2, "trainers did not start"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert all(gone(int(p.name)) for p in pids.iterdir()), "a trainer kept running after Ctrl-C"


def test_a_lost_and_a_late_worker_do_not_stop_the_run_with_min_workers(subset, tmp_path):
    """3 workers, MIN_WORKERS=1: worker 1 fails, worker 2 never finishes and is stopped at ROUND_DEADLINE; the
    round averages worker 0's model and the ledger names the two missing."""
    venv, pids = fake_venv(tmp_path, fail_shard=1, hang_shard=2)
    work = tmp_path / "work"
    proc = run({"VENV": str(venv), "WORKER_NUMBER": "3", "MIN_WORKERS": "1", "ROUND_DEADLINE": "90", "EPOCH": "1",
                "ROUNDS": "1", "SERVE": "0", "WORK_DIR": str(work), "MNIST_NPZ": str(subset)}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker 1 is lost; the round goes on" in proc.stderr
    assert "round deadline (90s) passed with 1 worker(s) still training" in proc.stderr
    assert all(gone(int(p.name)) for p in pids.iterdir()), "the late trainer kept running"
    [entry] = ledger_rounds(work)
    assert entry["expected_workers"] == 3 and entry["min_workers"] == 1 and entry["missing"] == 2
    assert entry["missing_workers"] == ["1-model.h5", "2-model.h5"]
    assert [w["file"] for w in entry["workers"]] == ["0-model.h5"] and entry["test_accuracy"] > 0.5
    agg = attrs(work / "aggregated-model.h5")
    assert agg["mlk_workers"] == 1 and agg["mlk_missing"] == "1-model.h5,2-model.h5"


def test_fewer_than_min_workers_fails_the_round(subset, tmp_path):
    venv, _ = fake_venv(tmp_path, fail_shard="[12]")
    proc = run({"VENV": str(venv), "WORKER_NUMBER": "3", "MIN_WORKERS": "2", "EPOCH": "20", "ROUNDS": "1",
                "SERVE": "0", "WORK_DIR": str(tmp_path / "work"), "MNIST_NPZ": str(subset)}, timeout=120)
    assert proc.returncode != 0
    assert "stage train (round 1/1) failed: worker" in proc.stderr and "is lost; the round goes on" in proc.stderr
    assert not (tmp_path / "work/aggregated-model.h5").exists()


@pytest.mark.parametrize("name, value", [("MIN_WORKERS", "4"), ("MIN_WORKERS", "0"), ("ROUND_DEADLINE", "soon"),
                                         ("RESUME", "yes")])
def test_bad_k_of_n_or_resume_setting_is_refused(tmp_path, name, value):
    proc = run({"SERVE": "0", "WORK_DIR": str(tmp_path / "work"), name: value}, timeout=30)
    assert proc.returncode != 0 and "stage config failed" in proc.stderr and name in proc.stderr
    assert not (tmp_path / "work").exists()


def test_a_fraction_of_the_workers_is_a_valid_min_workers_as_on_kubernetes(tmp_path):
    """MIN_WORKERS=0.67 (2 of 3, rounded up as the aggregator does) passes the local run's checks as it
    passes quickstart.sh's; a later bad setting is what stops this run."""
    proc = run({"SERVE": "0", "WORK_DIR": str(tmp_path / "work"), "MIN_WORKERS": "0.67", "RESUME": "yes"}, timeout=30)
    assert proc.returncode != 0 and "stage config failed" in proc.stderr
    assert "RESUME must be 0 or 1" in proc.stderr and "MIN_WORKERS" not in proc.stderr


@pytest.mark.parametrize("name, value", [("SPLIT", "dirichlet"), ("AGGREGATION", "mean"), ("SERVER_OPTIMIZER", "sgd"),
                                         ("PROX_MU", "a lot"), ("LOCAL_STEPS", "-3"), ("ATTACK", "3:backdoor"),
                                         ("PRESET", "nope")])
def test_bad_federated_learning_knob_is_refused_before_any_work(tmp_path, name, value):
    proc = run({"SERVE": "0", "WORK_DIR": str(tmp_path / "work"), name: value}, timeout=30)
    assert proc.returncode != 0 and name in proc.stderr and f"'{value}'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()


def test_federated_learning_knobs_reach_the_splitter_trainers_and_aggregator(subset, tmp_path):
    """A real run with every knob off its default: the label-skew split, 5 steps a round, FedProx, a sign-flipping
    worker 2, and the median with server momentum, each recorded where it should be."""
    work = tmp_path / "work"
    proc = run({"WORKER_NUMBER": "3", "EPOCH": "1", "ROUNDS": "2", "BATCH": "32", "SERVE": "0", "WORK_DIR": str(work),
                "MNIST_NPZ": str(subset), "SPLIT": "label-skew", "LOCAL_STEPS": "5", "PROX_MU": "0.01",
                "ATTACK": "2:sign-flip", "AGGREGATION": "median", "SERVER_OPTIMIZER": "fedavgm",
                "SERVER_MOMENTUM": "0.5"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "(label-skew," in (work / "logs/split.log").read_text()
    book = json.loads((work / "rounds/ledger.json").read_text())
    for entry in book["rounds"]:
        assert entry["aggregation"] == {"rule": "median"}
        assert entry["server_optimizer"]["name"] == "fedavgm" and entry["server_optimizer"]["momentum"] == 0.5
        for worker in entry["workers"]:
            assert attrs(work / worker["kept"])["mlk_steps"] == 5
    for i in range(3):
        log = (work / "logs/round-2-worker-{}.log".format(i)).read_text()
        assert "FedProx: mu 0.01" in log
        assert ("ATTACK: this worker is hostile (sign-flip)" in log) == (i == 2)
