"""Live progress files (docs/CONTRACTS.md "Live progress"): the trainer's beside its model, the aggregator's
beside the aggregate; written atomically, at most once a second."""

import json

import h5py
import numpy as np
import pytest

import aggregator  # noqa: E402
import trainer  # noqa: E402
from mlkcommon import PROGRESS_FORMAT, progress_path, write_progress  # noqa: E402

from helpers import tiny_model


def make_shard(path, n=200):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, n).astype(np.uint8))
    return path


def read(path):
    return json.loads(open(path).read())


def test_progress_path_is_beside_the_output():
    assert progress_path("/mnt/model/0-model.h5") == "/mnt/model/0-model.progress.json"
    assert progress_path("/mnt/aggregated-model.h5") == "/mnt/aggregated-model.progress.json"


def test_write_progress_is_atomic_and_reports_failure_instead_of_raising(tmp_path):
    target = tmp_path / "p.progress.json"
    assert write_progress(target, {"state": "training", "step": 3}) is None
    doc = read(target)
    assert doc["format"] == PROGRESS_FORMAT and doc["state"] == "training" and doc["step"] == 3
    assert isinstance(doc["updated_at"], float)
    assert [p.name for p in tmp_path.iterdir()] == ["p.progress.json"]  # no temporary file left
    assert write_progress(tmp_path / "absent-dir" / "p.json", {"state": "x"}) is not None
    assert write_progress(target, {"loss": float("nan")}) is not None  # not JSON: refused, old file kept
    assert read(target)["step"] == 3


def test_trainer_writes_its_progress_beside_the_model(tmp_path, capsys):
    shard = make_shard(tmp_path / "0.npz")
    out = tmp_path / "model" / "0-model.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "2", "--batch", "50", "--savemodel", str(out)]) == 0
    doc = read(tmp_path / "model" / "0-model.progress.json")
    assert doc["kind"] == "worker" and doc["worker"] == "0-model.h5" and doc["round"] == 1
    assert doc["state"] == "done" and doc["epoch"] == 2 and doc["epochs"] == 2
    assert doc["step"] == doc["steps"] == 8  # 2 epochs x 200/50 batches
    assert doc["eta_seconds"] == 0 and doc["loss"] > 0 and doc["elapsed_seconds"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["0-model.h5", "0-model.progress.json"]


def test_trainer_no_progress_and_an_unwritable_progress_path(tmp_path, capsys):
    shard = make_shard(tmp_path / "0.npz")
    out = tmp_path / "m" / "0-model.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "100", "--savemodel", str(out),
                         "--no-progress"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["0-model.h5"]
    # progress is a view: a path that cannot be written warns once and training still succeeds
    bad = tmp_path / "no-such-dir" / "p.json"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "100", "--savemodel", str(out),
                         "--progress", str(bad)]) == 0
    assert capsys.readouterr().out.count("warning: cannot write progress") == 1


def test_progress_writes_at_most_once_a_second_and_estimates_the_time_left(tmp_path):
    now = [100.0]
    path = tmp_path / "w.progress.json"
    progress = trainer.Progress(path, "0-model.h5", 2, epochs=2, steps_per_epoch=10, clock=lambda: now[0])
    assert progress.write("training", 1, 0, force=True)
    assert read(path)["eta_seconds"] is None  # no step yet: no estimate
    now[0] = 100.5
    assert not progress.write("training", 1, 5, loss=0.9)  # within the second: skipped
    assert read(path)["step"] == 0
    now[0] = 101.0
    assert progress.write("training", 1, 5, loss=0.9)
    doc = read(path)
    assert (doc["step"], doc["steps"], doc["loss"], doc["round"]) == (5, 20, 0.9, 2)
    assert doc["eta_seconds"] == pytest.approx(3.0)  # 1 s for 5 steps, 15 to go
    now[0] = 101.2
    assert progress.write("training", 2, 11, loss=float("nan"), force=True)  # a state change is not held back
    assert read(path)["loss"] is None  # NaN is not JSON: written as null


def save_worker(path, seed, rnd=1):
    tiny_model(seed).save(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs.update({"mlk_kind": "worker", "mlk_samples": 100, "mlk_init_fingerprint": "fp0", "mlk_round": rnd,
                        "mlk_epochs": 1})


def test_aggregator_writes_the_round_state(tmp_path, capsys):
    models = tmp_path / "model"
    models.mkdir()
    for i in (0, 1):
        save_worker(models / f"{i}-model.h5", i + 1)
    (models / "0-model.progress.json").write_text("{}")  # the trainers' progress files are not models
    savefile = tmp_path / "aggregated-model.h5"
    assert aggregator.main(["--dir", str(models), "--savefile", str(savefile), "--expect", "3", "--min-workers", "2",
                            "--deadline", "0", "--timeout", "0"]) == 0
    doc = read(tmp_path / "aggregated-model.progress.json")
    assert doc["kind"] == "round" and doc["state"] == "aggregated" and doc["round"] == 1
    assert (doc["expected"], doc["min_workers"], doc["present"]) == (3, 2, 2)
    assert doc["missing"] == ["2-model.h5"] and doc["flagged"] == [] and doc["dropped"] == []
    # the next round is expected from the ledger while waiting; too few models: "failed", with the reason
    assert aggregator.main(["--dir", str(tmp_path / "empty"), "--savefile", str(savefile)]) == 2  # no --dir: no state
    assert read(tmp_path / "aggregated-model.progress.json")["state"] == "aggregated"
    for p in models.glob("*.h5"):
        p.unlink()
    assert aggregator.main(["--dir", str(models), "--savefile", str(savefile), "--expect", "2", "--timeout", "0"]) == 2
    doc = read(tmp_path / "aggregated-model.progress.json")
    assert doc["state"] == "failed" and doc["round"] == 2 and doc["present"] == 0 and "timed out" in doc["error"]


def test_trainer_progress_with_steps_counts_every_batch_across_its_fits(tmp_path, monkeypatch):
    """--steps 5 over a 4-batch shard trains in two fits (4 batches, then 1): the progress counts on across
    them, 1..5 of 5 in one "epoch", instead of starting again at 1 in the second fit."""
    written = []
    monkeypatch.setattr(trainer, "PROGRESS_INTERVAL", 0)
    monkeypatch.setattr(trainer, "write_progress", lambda path, doc: written.append(dict(doc)))
    shard = make_shard(tmp_path / "0.npz")
    assert trainer.main(["--data", str(shard), "--epoch", "2", "--batch", "50", "--steps", "5",
                         "--savemodel", str(tmp_path / "0-model.h5")]) == 0
    steps = [d["step"] for d in written if d["state"] == "training"]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert written[-1]["state"] == "done" and (written[-1]["step"], written[-1]["steps"], written[-1]["epochs"]) == (5, 5, 1)
