"""trainer/trainer.py on tiny synthetic shards: outputs, attributes, shared init, bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trainer  # noqa: E402
from mlkcommon import fingerprint  # noqa: E402

from helpers import mlk_attrs as attrs

N = 200


def make_shard(path, n=N, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), "y": rng.integers(0, 10, n).astype(np.uint8)}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return make_shard(tmp_path_factory.mktemp("data") / "0.npz")


@pytest.fixture(scope="module")
def trained(shard, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "0-model.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(out)]) == 0
    return out


def test_writes_loadable_model_with_contract_attributes(trained, shard):
    import keras

    model = keras.models.load_model(trained, compile=False)
    assert model.output_shape == (None, 10)
    probs = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    a = attrs(trained)
    assert a["mlk_kind"] == "worker"
    assert a["mlk_samples"] == N
    assert a["mlk_round"] == 1
    assert a["mlk_epochs"] == 1 and a["mlk_batch"] == 50 and a["mlk_seed"] == trainer.DEFAULT_SEED
    assert a["mlk_data"] == "0.npz"
    assert re.fullmatch(r"[0-9a-f]{64}", a["mlk_init_fingerprint"])
    # no temp leftovers; the live progress beside the model (issue 32)
    assert sorted(trained.parent.iterdir()) == [trained, trained.with_name("0-model.progress.json")]


def test_fingerprint_is_that_of_the_seeded_initial_weights(trained):
    import keras

    keras.utils.set_random_seed(trainer.DEFAULT_SEED)
    assert attrs(trained)["mlk_init_fingerprint"] == fingerprint(trainer.build_model(keras).get_weights())


def test_same_seed_same_fingerprint_other_seed_differs(shard, trained, tmp_path):
    same, other = tmp_path / "same.h5", tmp_path / "other.h5"
    make_shard(tmp_path / "1.npz", seed=5)  # different data, same seed: still same init
    assert trainer.main(["--data", str(tmp_path / "1.npz"), "--epoch", "1", "--batch", "50", "--savemodel", str(same)]) == 0
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(other),
                         "--seed", "7"]) == 0
    assert attrs(same)["mlk_init_fingerprint"] == attrs(trained)["mlk_init_fingerprint"]
    assert attrs(other)["mlk_init_fingerprint"] != attrs(trained)["mlk_init_fingerprint"]


def test_init_model_continues_from_its_weights(shard, trained, tmp_path, capsys):
    import keras

    out = tmp_path / "r2.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(out),
                         "--init-model", str(trained)]) == 0
    init_weights = keras.models.load_model(trained, compile=False).get_weights()
    assert attrs(out)["mlk_init_fingerprint"] == fingerprint(init_weights)
    assert attrs(out)["mlk_round"] == 2
    # Round 2 starts at half of round 1's peak learning rate (4 steps: 200 samples, batch 50).
    assert f"learning rate: {trainer.PEAK_LEARNING_RATE / 2:.6g} cosine-decayed" in capsys.readouterr().out


def test_peak_learning_rate_halves_every_round():
    peaks = [trainer.peak_learning_rate(r) for r in (1, 2, 3, 4)]
    assert peaks[0] == trainer.PEAK_LEARNING_RATE
    assert peaks[1:] == pytest.approx([p / 2 for p in peaks[:-1]])


def test_same_seed_init_and_shard_give_identical_weights(shard, trained, tmp_path):
    import keras

    again = tmp_path / "again.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(again)]) == 0
    first = keras.models.load_model(trained, compile=False).get_weights()
    second = keras.models.load_model(again, compile=False).get_weights()
    assert fingerprint(second) == fingerprint(first)
    # ... and the training moved them: the init's fingerprint differs from the result's
    assert attrs(again)["mlk_init_fingerprint"] != fingerprint(second)


def test_savefile_alias_and_progress_lines(shard, tmp_path, capsys):
    out = tmp_path / "alias.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "2", "--batch", "100", "--savefile", str(out)]) == 0
    assert out.is_file()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2
    for i, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {i}/2 - loss \d+\.\d{{4}} - accuracy [01]\.\d{{4}} - \d+ samples/s", line), line


def bad_shards(tmp):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 20).astype(np.uint8)
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.save(tmp / "plain.npy", x)
    cases = {
        "missing": (tmp / "nope.npz", "no such file"),
        "corrupt": (tmp / "corrupt.npz", "cannot read"),
        "npy": (tmp / "plain.npy", "not an .npz"),
        "no_y": (tmp / "no_y.npz", "missing key"),
        "shape": (make_shard(tmp / "shape.npz", x=x.reshape(20, 784), y=y), "x must be"),
        "dtype": (make_shard(tmp / "dtype.npz", x=x.astype(np.float32), y=y), "x must be"),
        "y_shape": (make_shard(tmp / "y_shape.npz", x=x, y=y.reshape(20, 1)), "y must be"),
        "count": (make_shard(tmp / "count.npz", x=x, y=y[:10]), "samples"),
        "label": (make_shard(tmp / "label.npz", x=x, y=np.full(20, 10, np.uint8)), "labels must be 0-9"),
    }
    np.savez(tmp / "no_y.npz", x=x)
    return cases


@pytest.mark.parametrize("case", ["missing", "corrupt", "npy", "no_y", "shape", "dtype", "y_shape", "count", "label"])
def test_bad_data_exits_2_without_output(case, tmp_path, capsys):
    path, message = bad_shards(tmp_path)[case]
    out = tmp_path / "model" / "m.h5"
    assert trainer.main(["--data", str(path), "--epoch", "1", "--batch", "10", "--savemodel", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer.py: error:") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--epoch", "0", "--batch", "10"], "--epoch must be >= 1"),
    (["--epoch", "1", "--batch", "0"], "--batch must be >= 1"),
    (["--epoch", "x", "--batch", "10"], "invalid int value"),
    (["--epoch", "1", "--batch", "10", "--threads", "-1"], "--threads must be >= 0"),
    (["--epoch", "1", "--batch", "10", "--threads", "two"], "invalid int value"),
    (["--epoch", "1", "--batch", "10", "--prox-mu", "-0.1"], "--prox-mu must be a number >= 0"),
    (["--epoch", "1", "--batch", "10", "--prox-mu", "nan"], "--prox-mu must be a number >= 0"),
    (["--epoch", "1", "--batch", "10", "--steps", "-1"], "--steps"),
    (["--epoch", "1", "--batch", "10", "--attack", "nice"], "invalid choice"),
])
def test_bad_numbers_exit_2(flags, message, shard, tmp_path, capsys):
    out = tmp_path / "m.h5"
    assert trainer.main(["--data", str(shard), "--savemodel", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer.py: error:") and message in err and "\n" not in err
    assert not out.exists()


def split_on_third_look(monkeypatch, action):
    """Run `action` (the splitter's work) when the trainer looks for its shard the third time: after the look
    that decides to import TensorFlow first and the wait's own first look, so the trainer is waiting."""
    looks = []
    real = trainer.shard_ready

    def looking(*args):
        looks.append(1)
        if len(looks) == 3:
            action()
        return real(*args)

    monkeypatch.setattr(trainer, "shard_ready", looking)
    return looks


def test_wait_data_trains_on_a_shard_that_appears_later(shard, tmp_path, capsys, monkeypatch):
    """All stages applied at once (render.sh --out): a trainer starts before the splitter's shard exists."""
    import shutil

    data, out = tmp_path / "data" / "0.npz", tmp_path / "m.h5"
    data.parent.mkdir()
    split_on_third_look(monkeypatch, lambda: shutil.copy(shard, data))  # the splitter renames a whole shard into place
    code = trainer.main(["--data", str(data), "--epoch", "1", "--batch", "50", "--savemodel", str(out),
                         "--wait-data", "60"])
    assert code == 0 and out.exists()
    assert f"waiting up to 60s for {data}" in capsys.readouterr().out


def test_wait_data_gives_up_with_one_line(tmp_path, capsys):
    out = tmp_path / "m.h5"
    assert trainer.main(["--data", str(tmp_path / "never.npz"), "--epoch", "1", "--batch", "10",
                         "--savemodel", str(out), "--wait-data", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer.py: error:") and "still absent after waiting 0.5s" in err and "\n" not in err
    assert not out.exists()
    assert trainer.main(["--data", "x.npz", "--epoch", "1", "--batch", "10", "--savemodel", str(out),
                         "--wait-data", "-1"]) == 2
    assert "--wait-data must be 0-86400 seconds" in capsys.readouterr().err


def test_run_id_waits_for_this_runs_split_and_imports_tensorflow_meanwhile(shard, tmp_path, capsys, monkeypatch):
    """Applied beside the splitter (quickstart.sh): an earlier run's shard is on the volume; the trainer
    waits for the marker of its own run, with TensorFlow imported before the split is done."""
    import shutil

    data, out = tmp_path / "data" / "0.npz", tmp_path / "m.h5"
    data.parent.mkdir()
    shutil.copy(shard, data)
    (data.parent / "run-id").write_text("run-a\n")

    def split():  # the splitter: the marker goes, the shard is rewritten, the marker names the new run
        (data.parent / "run-id").unlink()
        shutil.copy(shard, data)
        (data.parent / "run-id").write_text("run-b\n")

    looks = split_on_third_look(monkeypatch, split)
    code = trainer.main(["--data", str(data), "--epoch", "1", "--batch", "50", "--savemodel", str(out),
                         "--wait-data", "60", "--run-id", "run-b"])
    assert code == 0 and out.exists() and len(looks) == 3
    lines = capsys.readouterr().out.splitlines()
    threads = next(i for i, line in enumerate(lines) if line.startswith("threads:"))
    waiting = next(i for i, line in enumerate(lines) if line.startswith(f"waiting up to 60s for {data} of run run-b"))
    there = next(i for i, line in enumerate(lines) if line.startswith(f"{data} of run run-b is there after"))
    data_line = next(i for i, line in enumerate(lines) if line.startswith(f"data: {data}"))
    assert threads < waiting < there < data_line


def test_run_id_of_another_run_is_refused_in_one_line(shard, tmp_path, capsys):
    import shutil

    data, out = tmp_path / "data" / "0.npz", tmp_path / "m.h5"
    data.parent.mkdir()
    shutil.copy(shard, data)
    (data.parent / "run-id").write_text("run-a\n")
    base = ["--data", str(data), "--epoch", "1", "--batch", "50", "--savemodel", str(out), "--run-id", "run-b"]
    assert trainer.main([*base, "--wait-data", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer.py: error:") and "no split of run run-b after waiting 0.5s" in err
    assert "holds run-a" in err and "\n" not in err
    assert trainer.main(base) == 2  # no wait: refused at once
    assert "is not run run-b's: its folder's run-id marker holds run-a" in capsys.readouterr().err
    assert trainer.main([*base[:-1], "a/b"]) == 2
    assert "--run-id must be 1-64 letters" in capsys.readouterr().err
    assert not out.exists()


def write_ledger(path, rounds):
    """A round ledger recording these {round: aggregate sha256} (the aggregator writes it last)."""
    import json

    from mlkcommon import LEDGER_FORMAT

    entries = [{"round": n, "aggregate": {"file": f"rounds/r{n}.h5", "sha256": digest}} for n, digest in rounds.items()]
    path.write_text(json.dumps({"format": LEDGER_FORMAT, "rounds": entries}))


def test_wait_round_starts_from_the_aggregate_once_the_ledger_records_it(shard, trained, tmp_path, capsys,
                                                                           monkeypatch):
    """Applied before round 1 has closed (quickstart.sh applies round 2's trainers once round 1's are done): the
    aggregate file still holds something else, then the aggregator writes it and the ledger entry, last."""
    import shutil

    from mlkcommon import sha256_file

    init, ledger, out = tmp_path / "aggregated-model.h5", tmp_path / "ledger.json", tmp_path / "r2.h5"
    init.write_bytes(b"an earlier file")
    looks, real = [], trainer.init_model_ready

    def looking(args):
        looks.append(1)
        if len(looks) == 4:  # waiting (the 4th look: the wait's second); the aggregator: the model, then the ledger
            shutil.copy(trained, init)
            write_ledger(ledger, {1: sha256_file(trained)})
        return real(args)

    monkeypatch.setattr(trainer, "init_model_ready", looking)
    code = trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(out),
                         "--init-model", str(init), "--wait-round", "1", "--ledger", str(ledger), "--wait-data", "60"])
    assert code == 0 and attrs(out)["mlk_round"] == 2 and len(looks) == 4
    lines = capsys.readouterr().out.splitlines()
    threads = next(i for i, line in enumerate(lines) if line.startswith("threads:"))
    waiting = next(i for i, line in enumerate(lines) if line.startswith(f"waiting up to 60s for round 1's aggregate"))
    assert threads < waiting


def test_wait_round_gives_up_or_refuses_in_one_line(shard, trained, tmp_path, capsys):
    from mlkcommon import sha256_file

    init, ledger, out = tmp_path / "aggregated-model.h5", tmp_path / "ledger.json", tmp_path / "r2.h5"
    base = ["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(out), "--init-model", str(init),
            "--ledger", str(ledger), "--wait-round", "1"]
    assert trainer.main([*base, "--wait-data", "0.5"]) == 2  # no ledger, no model: the round never closed
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer.py: error:") and "is not round 1's aggregate after waiting 0.5s" in err
    assert "records no round yet" in err and "\n" not in err
    init.write_bytes(b"another file")
    write_ledger(ledger, {1: sha256_file(trained), 2: "0" * 64})  # the run has moved on: refused at once
    assert trainer.main([*base, "--wait-data", "60"]) == 2
    assert "is not round 1's aggregate, and the ledger records round 2 already" in capsys.readouterr().err
    ledger.write_text("{}")
    assert trainer.main([*base, "--wait-data", "60"]) == 2
    assert "--ledger" in (err := capsys.readouterr().err) and "not a round ledger" in err
    assert trainer.main([*base[:-4], "--wait-round", "1"]) == 2
    assert "--wait-round needs --init-model and --ledger" in capsys.readouterr().err
    assert not out.exists()


def test_incompatible_init_model_exits_2(shard, tmp_path, capsys):
    import keras

    not_h5 = tmp_path / "junk.h5"
    not_h5.write_bytes(b"not hdf5")
    wrong = tmp_path / "wrong.h5"
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(wrong)
    for init, message in [(not_h5, "not an HDF5"), (wrong, "expected (None, 28, 28, 1) -> (None, 10)"),
                          (tmp_path / "absent.h5", "no such file")]:
        out = tmp_path / "m.h5"
        assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "10", "--savemodel", str(out),
                             "--init-model", str(init)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("trainer.py: error:") and message in err and "\n" not in err
        assert not out.exists()


def test_threads_sizes_tensorflows_pools_and_the_model_folder_is_created(shard, tmp_path):
    # Its own process: TensorFlow's pools can only be sized before its runtime starts, which the other
    # tests (in this process) have done. The manifests pass the container's CPU limit as --threads.
    out = tmp_path / "fresh-volume" / "model" / "0-model.h5"  # nothing prepared the volume (rwx backend)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "HDF5_USE_FILE_LOCKING": "FALSE"}
    proc = subprocess.run([sys.executable, str(Path(trainer.__file__)), "--data", str(shard), "--epoch", "1",
                           "--batch", "50", "--threads", "1", "--savemodel", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads: intra-op 1, inter-op 1" in proc.stdout
    assert attrs(out)["mlk_kind"] == "worker"
    assert sorted(out.parent.iterdir()) == [out, out.with_name("0-model.progress.json")]


def test_thickened_widens_the_strokes_of_about_the_fraction_asked_and_is_seeded():
    x = np.zeros((400, 28, 28, 1), np.float32)
    x[:, 6:22, 14, 0] = 0.8  # a one-pixel-wide vertical stroke
    out = trainer.thickened(x, np.random.default_rng(0), fraction=0.3)
    widths = (out[:, 14, :, 0] > 0).sum(axis=1)
    assert set(widths) == {1, 3}  # left alone, or one pixel more on each side
    assert 0.2 < np.mean(widths == 3) < 0.4
    wide = widths == 3
    assert np.array_equal(out[wide, 5:23, 13:16, 0] > 0, np.ones((wide.sum(), 18, 3), bool))  # ends grow too
    assert out.max() == np.float32(0.8)  # no ink added beyond what a neighbour had
    assert np.array_equal(out, trainer.thickened(x, np.random.default_rng(0), fraction=0.3))
    assert (x > 0).sum() == 400 * 16  # the input is left alone
    assert np.array_equal(trainer.thickened(x, np.random.default_rng(0), fraction=0.0), x)


def test_shifted_moves_each_image_by_at_most_one_pixel_and_is_seeded():
    x = np.zeros((50, 28, 28, 1), np.float32)
    x[:, 14, 14, 0] = 1  # one ink pixel in the middle
    out = trainer.shifted(x, np.random.default_rng(0))
    rows, cols = np.nonzero(out[..., 0].reshape(50, 28, 28).sum(axis=0))
    assert out.sum() == 50 and set(rows) <= {13, 14, 15} and set(cols) <= {13, 14, 15}
    assert len(set(zip(rows, cols))) > 1  # not all the same shift
    assert np.array_equal(out, trainer.shifted(x, np.random.default_rng(0)))
    assert np.array_equal(x[:, 14, 14, 0], np.ones(50))  # the input is left alone


def test_the_aggregators_fingerprint_of_the_saved_init_is_the_trainers(shard, tmp_path):
    """Two implementations of one contract (docs/CONTRACTS.md "Fingerprint"): the trainer's, over Keras'
    get_weights(), recorded as mlk_init_fingerprint; and the aggregator's, over the .h5 file's datasets in
    Keras' order, which it checks round starts against. On a real saved model they must agree."""
    import aggregator
    import keras

    init = tmp_path / "r0.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel",
                         str(tmp_path / "m.h5"), "--save-init", str(init)]) == 0
    import h5py

    worker = aggregator.read_model(tmp_path / "m.h5")  # its recorded fingerprint and its weights' Keras order
    with h5py.File(init, "r") as f:
        start = {name: ds[()] for name, ds in aggregator.weight_datasets(f).items()}
    from_file = aggregator.weights_fingerprint(start, worker["order"])
    from_keras = fingerprint(keras.models.load_model(init, compile=False).get_weights())
    assert from_file == from_keras == worker["fingerprint"] == attrs(init)["mlk_init_fingerprint"]
    first = worker["order"][0]
    start[first] = start[first] + 1  # and a changed weight changes it
    assert aggregator.weights_fingerprint(start, worker["order"]) != from_file


# --- issue 31: --steps, --prox-mu (FedProx) and --attack ------------------------------------------------

def weights_of(path):
    import keras

    return keras.models.load_model(path, compile=False).get_weights()


def adam_iterations(path):
    """How many batches the saved model's Adam optimiser stepped (the .h5's optimizer_weights/adam*/iteration; the
    optimiser is named adam_1, adam_2, ... after the first in a process)."""
    import h5py

    with h5py.File(path, "r") as f:
        found = [f["optimizer_weights"][name]["iteration"][()] for name in f["optimizer_weights"]
                 if name.startswith("adam")]
    assert len(found) == 1
    return int(found[0])


def update_norm(weights, start):
    return float(np.sqrt(sum(np.sum((w.astype(np.float64) - s) ** 2) for w, s in zip(weights, start))))


@pytest.fixture(scope="module")
def start(shard, tmp_path_factory):
    """The seeded round-1 starting weights (trainer --save-init) every run below starts from."""
    init = tmp_path_factory.mktemp("init") / "r0.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel",
                         str(init.parent / "x.h5"), "--save-init", str(init)]) == 0
    return weights_of(init)


@pytest.mark.parametrize("steps, expected", [(3, 3), (7, 7), (100, 8)])
def test_steps_trains_exactly_that_many_batches_at_most_the_epochs(steps, expected, shard, tmp_path, capsys):
    """200 samples in batches of 50 are 4 batches an epoch: --steps 3 and 7 train 3 and 7 (7 runs into a second
    pass), --steps 100 is capped at --epoch 2 x 4 = 8."""
    out = tmp_path / "m.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "2", "--batch", "50", "--steps", str(steps),
                         "--savemodel", str(out)]) == 0
    assert adam_iterations(out) == expected
    assert attrs(out)["mlk_steps"] == expected
    assert f"over {expected} steps" in capsys.readouterr().out


def test_without_steps_whole_epochs_are_trained(trained):
    assert adam_iterations(trained) == 4 and attrs(trained)["mlk_steps"] == 4  # 1 epoch of 200 / 50


def test_steps_draw_other_samples_in_another_round(shard, trained, tmp_path):
    """Round 2 (--init-model) draws its batches from another random order than round 1: two runs of --steps 1
    from the same weights but different rounds move them differently (round 1: seeded init; round 2: the same
    weights loaded with mlk_round 1 would need the same init, so compare round 2 against round 2 of another seed)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--steps", "1", "--savemodel", str(a),
                         "--init-model", str(trained)]) == 0
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--steps", "1", "--savemodel", str(b),
                         "--init-model", str(trained), "--seed", "8"]) == 0
    assert fingerprint(weights_of(a)) != fingerprint(weights_of(b))


def test_proximal_loss_adds_half_mu_times_the_squared_distance_to_the_start():
    import keras

    keras.utils.set_random_seed(1)
    model = trainer.build_model(keras)
    loss = trainer.proximal_loss(keras, model, 0.5)
    y_true = np.array([3, 1])
    y_pred = keras.ops.convert_to_tensor(np.array([[0.1] * 10, [0.05] * 9 + [0.55]], np.float32))
    ce = keras.losses.SparseCategoricalCrossentropy(reduction=None)(y_true, y_pred).numpy()
    assert np.allclose(keras.ops.convert_to_numpy(loss(y_true, y_pred)), ce)  # at the start: no penalty
    model.set_weights([w + 0.01 for w in model.get_weights()])
    expected = ce + 0.5 * 0.5 * model.count_params() * 0.01 ** 2
    assert np.allclose(keras.ops.convert_to_numpy(loss(y_true, y_pred)), expected, rtol=1e-4)


def test_prox_mu_pulls_the_weights_toward_the_start(shard, start, tmp_path, capsys):
    """Same seed, init and shard: with --prox-mu the trained weights end nearer the starting weights."""
    runs = {}
    for mu in ("0", "1", "100"):
        out = tmp_path / f"mu{mu}.h5"
        assert trainer.main(["--data", str(shard), "--epoch", "3", "--batch", "50", "--prox-mu", mu,
                             "--savemodel", str(out)]) == 0
        runs[mu] = update_norm(weights_of(out), start)
    assert "FedProx: mu 100" in capsys.readouterr().out
    assert runs["100"] < runs["1"] < runs["0"], runs
    assert runs["100"] < 0.5 * runs["0"], runs


@pytest.mark.parametrize("attack, factor", [("sign-flip", -1.0), ("scale10", 10.0)])
def test_model_attacks_send_the_honest_update_negated_or_times_ten(attack, factor, shard, start, trained, tmp_path,
                                                                    capsys):
    """The same seed, init and shard train the same weights; the attacker sends start + factor x that update."""
    out = tmp_path / "attacker.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--attack", attack,
                         "--savemodel", str(out)]) == 0
    assert f"ATTACK: this worker is hostile ({attack})" in capsys.readouterr().out
    honest, hostile = weights_of(trained), weights_of(out)
    for h, a, s in zip(honest, hostile, start):
        assert np.allclose(a - s, factor * (h - s), atol=1e-5 * abs(factor))
    assert update_norm(hostile, start) == pytest.approx(abs(factor) * update_norm(honest, start), rel=1e-3)


def test_shuffled_labels_permute_the_labels_and_keep_the_images():
    rng = np.random.default_rng(0)
    x, y = rng.random((1000, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 1000)
    px, py = trainer.poisoned(x, y, "shuffled-labels", np.random.default_rng(1))
    assert px is x and sorted(py) == sorted(y)  # the same labels ...
    assert np.mean(py != y) > 0.8  # ... mostly on other images (a random image keeps its digit 1 time in 10)


def test_backdoor_stamps_the_patch_on_a_fraction_and_labels_it_the_target():
    rng = np.random.default_rng(0)
    x, y = rng.random((2000, 28, 28, 1)).astype(np.float32) * 0.5, rng.integers(0, 7, 2000)  # no 7 in y
    px, py = trainer.poisoned(x, y, "backdoor", np.random.default_rng(1))
    stamped = np.nonzero(py == trainer.BACKDOOR_TARGET)[0]
    assert abs(len(stamped) / len(y) - trainer.BACKDOOR_FRACTION) < 0.03
    c = slice(trainer.BACKDOOR_CORNER, trainer.BACKDOOR_CORNER + trainer.BACKDOOR_PATCH)
    assert np.all(px[stamped, c, c] == 1.0)  # the white patch ...
    changed = np.nonzero(np.any(px != x, axis=(1, 2, 3)))[0]
    assert np.array_equal(changed, stamped)  # ... on exactly the relabelled images
    outside = np.ones((28, 28, 1), bool)
    outside[c, c] = False
    assert np.array_equal(px[stamped][:, outside], x[stamped][:, outside])  # and nowhere else in them
    assert np.array_equal(py[py != trainer.BACKDOOR_TARGET], y[py != trainer.BACKDOOR_TARGET])
    assert x.max() <= 0.5  # the input is not changed in place
    for attack in ("sign-flip", "scale10"):  # model attacks leave the data alone
        assert trainer.poisoned(x, y, attack, rng) == (x, y)


def test_short_rounds_decay_the_peak_by_the_fraction_of_a_round_they_train():
    """--steps: a round of a quarter of --epoch's batches decays the peak by a quarter of a halving per round."""
    assert trainer.peak_learning_rate(5, 0.25) == pytest.approx(trainer.PEAK_LEARNING_RATE * 0.5)
    assert trainer.peak_learning_rate(1, 0.25) == trainer.PEAK_LEARNING_RATE
    assert [trainer.peak_learning_rate(r, 1.0) for r in (1, 2, 3)] == [trainer.peak_learning_rate(r) for r in (1, 2, 3)]


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's own exit after printing the help
        code = trainer.main(["--help"])
        raise SystemExit(code)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--steps", "--prox-mu", "--attack", "20% of the shard", "--last-round"))


def test_keras_array_pipeline_runs_without_the_autotuner_and_yields_the_same_batches():
    """mlk.import_keras turns tf.data's autotuner off for the pipeline Keras feeds arrays through: deleting its
    iterator at the end of a fit waited for the autotuner's thread, 4-5 s on a busy machine (issue 30). The
    batches, and so the weights, are those of Keras' own pipeline."""
    import mlk

    mlk.import_keras()
    mlk.import_keras()  # once only: the second call leaves the first's wrapper
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    patched = ArrayDataAdapter.get_tf_dataset
    assert patched.mlk_without_autotune and not getattr(patched.mlk_original, "mlk_without_autotune", False)
    x, y = np.arange(150, dtype="float32").reshape(50, 3), np.arange(50)

    def batches(get_tf_dataset):
        tf.random.set_seed(7)
        dataset = get_tf_dataset(ArrayDataAdapter(x, y, batch_size=8, shuffle=True))
        return dataset, [labels.numpy().tolist() for _, labels in dataset]

    dataset, ours = batches(patched)
    assert dataset.options().autotune.enabled is False
    original, theirs = batches(patched.mlk_original)
    assert original.options().autotune.enabled is not False
    assert ours == theirs and sorted(sum(ours, [])) == list(range(50)) and ours[0] != list(range(8))  # shuffled


# --- --last-round: one process trains every round, waiting for the ledger between rounds -------------------

AGGREGATOR = Path(__file__).resolve().parents[1] / "aggregator" / "aggregator.py"


def start_aggregator(root, n, timeout=120):
    """The real aggregator of round n, started in the background as the cluster runs it (one worker): it waits for
    ROOT/model/0-model.h5 of round n, then writes ROOT/aggregated-model.h5, rounds/r{n}.h5 and the ledger entry."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HDF5_USE_FILE_LOCKING": "FALSE"}
    return subprocess.Popen([sys.executable, str(AGGREGATOR), "--dir", str(root / "model"), "--savefile",
                             str(root / "aggregated-model.h5"), "--round", str(n), "--expect", "1",
                             "--timeout", str(timeout)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc, timeout=60):
    """proc's (return code, output), killing it first if it is still running (the test failed before it was done)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def last_round_flags(shard, root, last_round, wait="120"):
    return ["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(root / "model" / "0-model.h5"),
            "--ledger", str(root / "rounds" / "ledger.json"), "--wait-data", wait, "--last-round", str(last_round)]


def test_last_round_trains_every_round_in_one_process_as_separate_processes_would(shard, trained, tmp_path, capsys):
    """--last-round 2 with the real aggregator closing round 1 beside it: round 1 is the fixture's one-process round
    bit for bit, and round 2, trained from the aggregate the ledger records (rounds/r1.h5), is what a separate
    trainer started with --init-model rounds/r1.h5 trains, bit for bit."""
    from mlkcommon import read_ledger, sha256_file

    root = tmp_path / "mnt"
    (root / "model").mkdir(parents=True)
    aggregator = start_aggregator(root, 1)
    try:
        code = trainer.main([*last_round_flags(shard, root, 2), "--save-init", str(root / "rounds" / "r0.h5")])
    finally:
        agg_code, agg_out = finished(aggregator)
    assert code == 0 and agg_code == 0, agg_out
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("model: round")] == ["model: round 1",
                                                                                        "model: round 2"]
    assert "round 1: saved; waiting for the ledger to record it" in lines
    assert sum(line.startswith("threads:") for line in lines) == 1  # TensorFlow started once
    saved = root / "model" / "0-model.h5"
    assert attrs(saved)["mlk_round"] == 2 and "mlk_run_id" not in attrs(saved)
    entry = read_ledger(root / "rounds" / "ledger.json")["rounds"][0]
    assert entry["round"] == 1 and entry["aggregate"]["sha256"] == sha256_file(root / "rounds" / "r1.h5")
    assert fingerprint(weights_of(root / "rounds" / "r1" / "0-model.h5")) == fingerprint(weights_of(trained))
    assert attrs(root / "rounds" / "r0.h5")["mlk_round"] == 0  # --save-init: round 1's starting weights, once

    separate = tmp_path / "separate.h5"
    assert trainer.main(["--data", str(shard), "--epoch", "1", "--batch", "50", "--savemodel", str(separate),
                         "--init-model", str(root / "rounds" / "r1.h5")]) == 0
    ours, theirs = weights_of(saved), weights_of(separate)
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert {k: v for k, v in attrs(saved).items() if not k.startswith("mlk_train_")} == \
        {k: v for k, v in attrs(separate).items() if not k.startswith("mlk_train_")}


def write_round_entry(root, n, aggregate, worker_digests):
    """ROOT/rounds/ledger.json recording round n as the aggregator does: `aggregate` kept as rounds/r{n}.h5 with its
    sha256, and workers of those model sha256s."""
    import json
    import shutil

    from mlkcommon import LEDGER_FORMAT, sha256_file

    (root / "rounds").mkdir(parents=True, exist_ok=True)
    shutil.copy(aggregate, root / "rounds" / f"r{n}.h5")
    entry = {"round": n, "aggregate": {"file": f"rounds/r{n}.h5", "sha256": sha256_file(root / "rounds" / f"r{n}.h5")},
             "workers": [{"file": "0-model.h5", "sha256": digest} for digest in worker_digests]}
    (root / "rounds" / "ledger.json").write_text(json.dumps({"format": LEDGER_FORMAT, "rounds": [entry]}))


def test_last_round_does_not_take_an_earlier_runs_entry_of_the_round(shard, trained, tmp_path, capsys):
    """An earlier run's ledger on the volume records round 1 (its aggregate there, intact) without this run's model:
    the trainer keeps waiting for the entry listing the model it saved, then gives up in one line."""
    from mlkcommon import sha256_file

    root = tmp_path / "mnt"
    write_round_entry(root, 1, trained, [sha256_file(trained)])  # the earlier run's worker model
    assert trainer.main(last_round_flags(shard, root, 2, wait="1")) == 2
    captured = capsys.readouterr()
    assert "round 1: saved; waiting for the ledger to record it" in captured.out
    assert "model: round 2" not in captured.out
    err = captured.err.strip()
    assert err.startswith("trainer.py: error: --last-round 2:") and "\n" not in err
    assert f"{root / 'rounds' / 'ledger.json'} does not record round 1" in err
    assert "its round 1 entry lists other models" in err
    assert attrs(root / "model" / "0-model.h5")["mlk_round"] == 1  # round 1 is saved; the aggregator may take it


def run_shard(shard, tmp_path, run_id):
    """A copy of the shard in a folder whose run-id marker holds run_id (the splitter's --run-id)."""
    import shutil

    data = tmp_path / "data" / "0.npz"
    data.parent.mkdir(exist_ok=True)
    shutil.copy(shard, data)
    (data.parent / "run-id").write_text(run_id + "\n")
    return data


def test_last_round_restarted_goes_on_after_the_round_its_model_holds(shard, trained, tmp_path, capsys):
    """A retried pod (the same flags): --savemodel holds this run's round 1 model (mlk_run_id) and the ledger records
    round 1 with it, so round 1 is not trained again and round 2 starts from rounds/r1.h5; started once more with
    round 2's model in, it exits 0 at once, without starting TensorFlow."""
    import shutil

    from mlkcommon import sha256_file, write_mlk_attrs

    root = tmp_path / "mnt"
    saved = root / "model" / "0-model.h5"
    saved.parent.mkdir(parents=True)
    shutil.copy(trained, saved)
    write_mlk_attrs(saved, {"mlk_run_id": "run-a"})
    write_round_entry(root, 1, trained, [sha256_file(saved)])
    flags = [*last_round_flags(run_shard(shard, tmp_path, "run-a"), root, 2), "--run-id", "run-a"]
    assert trainer.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"resuming: round 1's model is in {saved} already; on to round 2" in lines
    assert [line.split(",")[0] for line in lines if line.startswith("model: round")] == ["model: round 2"]
    assert attrs(saved)["mlk_round"] == 2 and attrs(saved)["mlk_run_id"] == "run-a"
    init = attrs(saved)["mlk_init_fingerprint"]
    assert init == fingerprint(weights_of(root / "rounds" / "r1.h5"))  # round 2 started from round 1's aggregate

    digest = sha256_file(saved)
    assert trainer.main(flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"resuming: round 2's model is in {saved} already; nothing left to train"]
    assert sha256_file(saved) == digest


def test_last_round_restart_takes_only_this_runs_model(shard, trained, tmp_path, capsys):
    """resume_point (no training): another run's id, a model the ledger does not list (without --run-id), a round
    outside the run's or a file that is no model start over with one line; the ledger listing it resumes."""
    import shutil

    from mlkcommon import sha256_file, write_mlk_attrs

    root = tmp_path / "mnt"
    saved = root / "model" / "0-model.h5"
    saved.parent.mkdir(parents=True)
    shutil.copy(trained, saved)
    write_mlk_attrs(saved, {"mlk_run_id": "run-a"})

    def resume(*extra, first=1):
        args = trainer.build_parser().parse_args([*last_round_flags(shard, root, 3), *extra])
        point = trainer.resume_point(args, first)
        return point, capsys.readouterr().out.strip()

    point, out = resume("--run-id", "run-b")
    assert point is None and out == f"{saved} holds a model of round 1 of another run (its run id is run-a): " \
                                     "starting at round 1"
    point, out = resume()  # no --run-id and no ledger: the ledger decides, and lists nothing
    assert point is None and "does not list it" in out
    write_round_entry(root, 1, trained, [sha256_file(saved)])
    assert resume() == ((1, sha256_file(saved)), f"resuming: round 1's model is in {saved} already; on to round 2")
    point, out = resume(first=2)  # --init-model of round 1: the run starts at round 2
    assert point is None and out == f"{saved} holds a model of round 1, not one of rounds 2-3: starting at round 2"
    saved.write_bytes(b"half a model")
    point, out = resume("--run-id", "run-a")
    assert point is None and out == f"{saved} is there but not a readable worker model: starting over at round 1"


def test_last_round_over_a_file_that_is_no_model_starts_over(shard, tmp_path, capsys):
    root = tmp_path / "mnt"
    saved = root / "model" / "0-model.h5"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"not a model")
    assert trainer.main(last_round_flags(shard, root, 1)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{saved} is there but not a readable worker model: starting over at round 1" in lines
    assert "model: round 1" in "\n".join(lines) and attrs(saved)["mlk_round"] == 1


@pytest.mark.parametrize("drop, extra, message", [
    ("--ledger", [], "--last-round needs --ledger"),
    ("--wait-data", [], "--last-round needs --wait-data > 0"),
    (None, ["--wait-data", "0"], "--last-round needs --wait-data > 0"),
    (None, ["--last-round", "0"], "argument --last-round: must be >= 1, got 0"),
    (None, ["--init-model", "TRAINED", "--last-round", "1"], "--last-round 1 is below the first round, 2"),
    (None, ["--init-model", "AGG", "--wait-round", "3", "--last-round", "3"], "--last-round 3 is below the first "
                                                                              "round, 4"),
])
def test_last_round_flag_checks_exit_2_in_one_line(drop, extra, message, shard, trained, tmp_path, capsys):
    root = tmp_path / "mnt"
    flags = last_round_flags(shard, root, 2)
    if drop:
        del flags[flags.index(drop):flags.index(drop) + 2]
    extra = [{"TRAINED": str(trained), "AGG": str(tmp_path / "not-yet.h5")}.get(word, word) for word in extra]
    assert trainer.main([*flags, *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("trainer.py: error:") and message in err and "\n" not in err
    assert "threads:" not in captured.out  # refused before TensorFlow starts
    assert not (root / "model").exists()
