"""The round ledger (docs/CONTRACTS.md, "Round ledger"): what aggregator/aggregator.py records per round, the
per-worker report and its outlier rule, K-of-N aggregation at the round deadline, aggregator/ledger.py verify
and restore (a tampered ledger is refused), atomic ledger writes under a kill, and trainer/evaluate.py --ledger.
Small data the tests make themselves: tiny Keras models, and a few hundred real MNIST digits per worker for the
outlier rule."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
import aggregator  # noqa: E402
import ledger  # noqa: E402

import keras  # noqa: E402
from helpers import tiny_model  # noqa: E402


def h5_weights(path):
    """{dataset path: array} of a model file's weights (the aggregator's own reader)."""
    with h5py.File(path, "r") as f:
        return {k: ds[()] for k, ds in aggregator.weight_datasets(f).items()}


def h5_fingerprint(path):
    with h5py.File(path, "r") as f:
        weights = {k: ds[()] for k, ds in aggregator.weight_datasets(f).items()}
        return aggregator.weights_fingerprint(weights, aggregator.keras_order(f, weights))


def save_worker(model, path, samples, fingerprint, rnd=1, started=None):
    model.save(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs.update({"mlk_kind": "worker", "mlk_samples": samples, "mlk_init_fingerprint": fingerprint,
                        "mlk_round": rnd, "mlk_epochs": 1, "mlk_train_seconds": 1.5,
                        "mlk_train_started": started if started is not None else time.time() - 5})
    return path


def moved(start_model, seed, scale, shared=1.0):
    """A copy of start_model whose weights moved by scale * (shared * a direction every worker shares + a seeded
    random one of its own), as honest workers' updates share a direction."""
    common, own = np.random.default_rng(1000), np.random.default_rng(seed)
    model = tiny_model(0)
    model.set_weights([w + scale * (shared * common.standard_normal(w.shape) + own.standard_normal(w.shape)).astype(
        w.dtype) for w in start_model.get_weights()])
    return model


def first_round_at(root):
    """ROOT with rounds/r0.h5 (the start) and model/ holding 3 workers that moved from it: (root, start, fp)."""
    (root / "model").mkdir(parents=True)
    (root / "rounds").mkdir()
    start = tiny_model(7)
    start.save(str(root / "rounds/r0.h5"))
    fp = h5_fingerprint(root / "rounds/r0.h5")
    for i, n in enumerate((100, 200, 300)):
        save_worker(moved(start, i, 0.01), root / f"model/{i}-model.h5", n, fp)
    return root, start, fp


@pytest.fixture
def round_one(tmp_path):
    return first_round_at(tmp_path / "root")


def aggregate(root, *extra, capsys=None):
    argv = ["--dir", str(root / "model"), "--savefile", str(root / "aggregated-model.h5"), *map(str, extra)]
    rc = aggregator.main(argv)
    out = capsys.readouterr() if capsys else None
    return rc, out


def entries(root):
    return json.loads((root / "rounds/ledger.json").read_text())["rounds"]


# --- what a round records -----------------------------------------------------------------------------

def test_round_is_kept_with_hashes_timings_and_report(round_one, capsys):
    root, start, fp = round_one
    rc, out = aggregate(root, "--expect", 3, capsys=capsys)
    assert rc == 0, out.err
    book = json.loads((root / "rounds/ledger.json").read_text())
    assert book["format"] == "mlk-ledger/1" and len(book["rounds"]) == 1
    e = book["rounds"][0]
    assert e["round"] == 1 and e["expected_workers"] == 3 and e["min_workers"] == 3 and e["missing"] == 0
    # rounds/r1.h5 is the aggregate, byte for byte, and the ledger has its sha256 and the start's
    assert (root / "rounds/r1.h5").read_bytes() == (root / "aggregated-model.h5").read_bytes()
    assert e["aggregate"] == {"file": "rounds/r1.h5", "sha256": ledger.sha256_file(root / "rounds/r1.h5")}
    assert e["start"] == {"file": "rounds/r0.h5", "sha256": ledger.sha256_file(root / "rounds/r0.h5")}
    assert [w["file"] for w in e["workers"]] == ["0-model.h5", "1-model.h5", "2-model.h5"]
    for w in e["workers"]:
        kept = root / w["kept"]
        assert kept.read_bytes() == (root / "model" / w["file"]).read_bytes()
        assert w["sha256"] == ledger.sha256_file(kept) and w["train_seconds"] == 1.5
        assert w["accuracy"] is None and w["dropped"] is False
    assert e["samples"] == 600 and [w["samples"] for w in e["workers"]] == [100, 200, 300]
    assert e["test_accuracy"] is None and e["outlier_rule"] == aggregator.OUTLIER_RULE
    assert 4 < e["round_seconds"] < 600 and e["aggregate_seconds"] >= 0
    assert e["started_at"].endswith("Z") and e["aggregated_at"].endswith("Z")
    # the report's figures, recomputed here from the files
    s = h5_weights(root / "rounds/r0.h5")
    names = sorted(s)
    ups = [np.concatenate([(h5_weights(root / f"model/{i}-model.h5")[k].astype(np.float64) - s[k]).ravel()
                           for k in names]) for i in range(3)]
    n = np.array([100, 200, 300], float)
    layer_updates = [{layer: np.concatenate([(h5_weights(root / f"model/{j}-model.h5")[k].astype(np.float64)
                                              - s[k]).ravel() for k in names if k.split("/")[0] == layer])
                      for layer in ("conv", "dense")} for j in range(3)]
    pairs = {(layer, i, j): float(layer_updates[i][layer] @ layer_updates[j][layer]
                                  / np.linalg.norm(layer_updates[i][layer]) / np.linalg.norm(layer_updates[j][layer]))
             for layer in ("conv", "dense") for i in range(3) for j in range(3) if i != j}
    best_layer = max(pairs, key=pairs.get)[0]
    for i, w in enumerate(e["workers"]):
        others = [j for j in range(3) if j != i]
        mean = sum(ups[j] * n[j] for j in others) / n[others].sum()
        assert w["update_norm"] == pytest.approx(np.linalg.norm(ups[i]), rel=1e-5)
        assert w["cosine_to_others"] == pytest.approx(ups[i] @ mean / np.linalg.norm(ups[i]) / np.linalg.norm(mean),
                                                      abs=1e-5)
        assert w["norm_to_median"] == pytest.approx(np.linalg.norm(ups[i]) / np.median([np.linalg.norm(u) for u in ups]),
                                                    rel=1e-5)
        # agreement: the highest cosine with another worker in the layer where two workers agree best
        assert w["agreement"] == pytest.approx(max(pairs[(best_layer, i, j)] for j in others), abs=1e-5)
        assert w["agreement_with"] == f"{max(others, key=lambda j: pairs[(best_layer, i, j)])}-model.h5/{best_layer}"
        # layer_norm_ratio: per layer, its update norm over the median of the three; the median over the layers
        ratios = [np.linalg.norm(layer_updates[i][layer])
                  / np.median([np.linalg.norm(layer_updates[j][layer]) for j in range(3)]) for layer in ("conv", "dense")]
        assert w["layer_norm_ratio"] == pytest.approx(np.median(ratios), rel=1e-5)
        assert w["outlier"] is False
    # the table on stdout
    assert "update norm" in out.out and "0-model.h5" in out.out
    with h5py.File(root / "aggregated-model.h5", "r") as f:
        assert f.attrs["mlk_expected_workers"] == 3 and f.attrs["mlk_missing"] == "" and f.attrs["mlk_dropped"] == ""


def test_next_round_starts_from_the_previous_aggregate_and_a_rerun_replaces_it(round_one, capsys):
    root, start, fp = round_one
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    fp1 = h5_fingerprint(root / "rounds/r1.h5")
    r1 = keras.models.load_model(root / "rounds/r1.h5", compile=False)
    shutil.rmtree(root / "model")
    (root / "model").mkdir()
    for i in range(3):
        save_worker(moved(r1, 10 + i, 0.01), root / f"model/{i}-model.h5", 100, fp1, rnd=2)
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    e = entries(root)
    assert [x["round"] for x in e] == [1, 2]
    assert e[1]["start"]["file"] == "rounds/r1.h5" and e[1]["workers"][0]["update_norm"] > 0
    # the same round aggregated again (e.g. after a resume) replaces its entry, never duplicates it
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    assert [x["round"] for x in entries(root)] == [1, 2]


def test_without_starting_weights_the_report_is_empty_but_the_round_is_kept(round_one, capsys):
    root, _, _ = round_one
    (root / "rounds/r0.h5").unlink()
    rc, out = aggregate(root, capsys=capsys)
    assert rc == 0
    e = entries(root)[0]
    assert e["start"] is None and all(w["update_norm"] is None and not w["outlier"] for w in e["workers"])
    assert "no starting weights" in out.out


# --- K of N at the round deadline -------------------------------------------------------------------

def test_k_of_n_averages_what_arrived_by_the_deadline(round_one, capsys, monkeypatch):
    monkeypatch.setattr(aggregator, "POLL_SECONDS", 0.05)
    root, _, _ = round_one
    gone = root / "model/1-model.h5"
    kept = {k: v.copy() for k, v in h5_weights(root / "model/0-model.h5").items()}, h5_weights(
        root / "model/2-model.h5")
    gone.unlink()
    rc, out = aggregate(root, "--expect", 3, "--min-workers", "0.6", "--deadline", 0.3, capsys=capsys)
    assert rc == 0, out.err
    assert "round deadline" in out.out and "2/3" in out.out
    e = entries(root)[0]
    assert e["min_workers"] == 2 and e["missing"] == 1 and e["missing_workers"] == ["1-model.h5"]
    assert [w["file"] for w in e["workers"]] == ["0-model.h5", "2-model.h5"]
    got = h5_weights(root / "aggregated-model.h5")
    for k, v in got.items():  # the sample-weighted mean of the two that came (100 and 300 samples)
        np.testing.assert_allclose(v, 0.25 * kept[0][k] + 0.75 * kept[1][k], rtol=1e-5, atol=1e-7)
    with h5py.File(root / "aggregated-model.h5", "r") as f:
        assert f.attrs["mlk_missing"] == "1-model.h5" and f.attrs["mlk_workers"] == 2
        assert f.attrs["mlk_expected_workers"] == 3


def test_k_of_n_fails_below_k(round_one, capsys, monkeypatch):
    monkeypatch.setattr(aggregator, "POLL_SECONDS", 0.05)
    root, _, _ = round_one
    for i in (1, 2):
        (root / f"model/{i}-model.h5").unlink()
    rc, out = aggregate(root, "--expect", 3, "--min-workers", 2, "--deadline", 0.2, "--timeout", 0.4,
                        capsys=capsys)
    assert rc == 2
    assert out.err.startswith("aggregator: error:") and out.err.count("\n") == 1
    assert "fewer than --min-workers 2" in out.err and "0-model.h5" in out.err
    assert not (root / "aggregated-model.h5").exists() and not (root / "rounds/ledger.json").exists()


def test_all_n_before_the_deadline_do_not_wait_for_it(round_one, capsys):
    root, _, _ = round_one
    rc, out = aggregate(root, "--expect", 3, "--min-workers", 2, "--deadline", 3000, capsys=capsys)
    assert rc == 0 and "3/3 models present" in out.out and "round deadline" not in out.out


def test_stale_model_of_an_earlier_round_is_ignored(round_one, capsys, monkeypatch):
    monkeypatch.setattr(aggregator, "POLL_SECONDS", 0.05)
    root, _, _ = round_one
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    fp1 = h5_fingerprint(root / "rounds/r1.h5")
    r1 = keras.models.load_model(root / "rounds/r1.h5", compile=False)
    # round 2: worker 2 is lost, its round-1 model stays in model/
    for i in (0, 1):
        save_worker(moved(r1, 20 + i, 0.01), root / f"model/{i}-model.h5", 100, fp1, rnd=2)
    rc, out = aggregate(root, "--expect", 3, "--min-workers", 2, "--deadline", 0.2, capsys=capsys)
    assert rc == 0, out.err
    assert "ignoring 2-model.h5" in out.out
    e = entries(root)[1]
    assert e["round"] == 2 and [w["file"] for w in e["workers"]] == ["0-model.h5", "1-model.h5"]
    assert e["missing_workers"] == ["2-model.h5"]


def test_round_n_ignores_the_round_befores_models_until_its_own_are_in(round_one, capsys, monkeypatch):
    """quickstart.sh applies the aggregator beside the round's trainers (issue 30): with --round 2 it waits
    while only round 1's models lie in model/, then averages round 2's; a retried aggregator of round 2 finds
    the same models (recorded by then) and writes the same round again."""
    monkeypatch.setattr(aggregator, "POLL_SECONDS", 0.05)
    root, _, _ = round_one
    assert aggregate(root, "--expect", 3, "--round", 1, capsys=capsys)[0] == 0
    fp1 = h5_fingerprint(root / "rounds/r1.h5")
    # round 1's three models are still there: round 2's aggregator must not average them again
    rc, out = aggregate(root, "--expect", 3, "--round", 2, "--timeout", 0.3, capsys=capsys)
    assert rc == 2 and "timed out" in out.err and "3 missing" in out.err
    assert len(entries(root)) == 1
    r1 = keras.models.load_model(root / "rounds/r1.h5", compile=False)
    for i in range(3):
        save_worker(moved(r1, 30 + i, 0.01), root / f"model/{i}-model.h5", 100, fp1, rnd=2)
    assert aggregate(root, "--expect", 3, "--round", 2, capsys=capsys)[0] == 0
    e = entries(root)[1]
    assert e["round"] == 2 and e["start"]["sha256"] == entries(root)[0]["aggregate"]["sha256"]
    first = h5_weights(root / "aggregated-model.h5")
    assert aggregate(root, "--expect", 3, "--round", 2, capsys=capsys)[0] == 0  # the Job's retry
    assert [x["round"] for x in entries(root)] == [1, 2]
    for k, v in h5_weights(root / "aggregated-model.h5").items():
        np.testing.assert_array_equal(v, first[k])
    rc, out = aggregate(root, "--round", 2, capsys=capsys)
    assert rc == 2 and "need --expect" in out.err
    rc, out = aggregate(root, "--expect", 3, "--round", 0, capsys=capsys)
    assert rc == 2 and "--round must be >= 1" in out.err


def test_defaults_keep_waiting_for_all_and_bad_k_is_a_usage_error(round_one, capsys):
    root, _, _ = round_one
    (root / "model/2-model.h5").unlink()
    rc, out = aggregate(root, "--expect", 3, "--timeout", 0.2, capsys=capsys)
    assert rc == 2 and "timed out" in out.err and "1 missing" in out.err
    for bad, message in (("0", "--min-workers"), ("1.5", "--min-workers"), ("4", "more than --expect")):
        rc, out = aggregate(root, "--expect", 3, "--min-workers", bad, capsys=capsys)
        assert rc == 2 and message in out.err and out.err.count("\n") == 1, out.err
    rc, out = aggregate(root, "--min-workers", 2, capsys=capsys)
    assert rc == 2 and "need --expect" in out.err


# --- the outlier flag, and --drop-outliers ------------------------------------------------------------

def test_drop_outliers_leaves_the_flagged_worker_out(round_one, capsys):
    root, start, fp = round_one
    save_worker(moved(start, 99, 0.5, shared=0), root / "model/3-model.h5", 100, fp)  # its own way, 35x as far
    rc, out = aggregate(root, "--expect", 4, capsys=capsys)
    assert rc == 0
    e = entries(root)[0]
    assert [w["outlier"] for w in e["workers"]] == [False, False, False, True]
    assert "OUTLIER" in out.out and e["workers"][3]["dropped"] is False  # reporting only
    with h5py.File(root / "aggregated-model.h5", "r") as f:
        assert f.attrs["mlk_workers"] == 4
    rc, out = aggregate(root, "--expect", 4, "--drop-outliers", capsys=capsys)
    assert rc == 0 and "dropped" in out.out
    e = entries(root)[0]
    assert e["dropped"] == ["3-model.h5"] and e["workers"][3]["dropped"] is True and e["samples"] == 600
    with h5py.File(root / "aggregated-model.h5", "r") as f:
        assert f.attrs["mlk_workers"] == 3 and f.attrs["mlk_dropped"] == "3-model.h5"
    ws = [h5_weights(root / f"model/{i}-model.h5") for i in range(3)]
    for k, v in h5_weights(root / "aggregated-model.h5").items():
        np.testing.assert_allclose(v, (100 * ws[0][k] + 200 * ws[1][k] + 300 * ws[2][k]) / 600, rtol=1e-5, atol=1e-7)


def test_a_worker_that_moves_every_layer_further_is_flagged(tmp_path, capsys):
    """The third condition of OUTLIER_RULE: 5 workers share a direction (they agree as honest ones do); worker 4's
    update is an honest-looking one times 1.3 in every layer (a data attack's mark: it learns what the others
    do not), which the agreement and the 3x whole-norm conditions let pass; times 1.1 stays below 1.15."""
    for factor, flagged in ((1.3, True), (1.1, False)):
        root = tmp_path / f"x{factor}"
        (root / "model").mkdir(parents=True)
        (root / "rounds").mkdir()
        start = tiny_model(7)
        start.save(str(root / "rounds/r0.h5"))
        fp = h5_fingerprint(root / "rounds/r0.h5")
        for i in range(5):
            save_worker(moved(start, i, 0.001 * (factor if i == 4 else 1.0), shared=20.0), root / f"model/{i}-model.h5",
                        100, fp)
        rc, out = aggregate(root, "--expect", 5, capsys=capsys)
        assert rc == 0, out.err
        report = entries(root)[0]["workers"]
        assert report[4]["layer_norm_ratio"] == pytest.approx(factor, rel=0.05)
        assert report[4]["norm_to_median"] < aggregator.OUTLIER_NORM_RATIO
        assert report[4]["agreement"] > aggregator.OUTLIER_AGREEMENT_FRACTION * max(w["agreement"] for w in report)
        assert [w["outlier"] for w in report] == [False] * 4 + [flagged], factor
        assert all(0.9 < w["layer_norm_ratio"] < 1.1 for w in report[:4])


def test_agreement_says_nothing_when_the_workers_agree_with_nobody():
    """Near convergence under label skew the workers' updates are nearly unrelated (their median agreement 0.03-0.16
    in PRESET=label-skew's later rounds): then a worker whose agreement is far below that median is not flagged, as
    it was in 11 of 12 such rounds before the OUTLIER_MIN_AGREEMENT gate. worker_report on two made-up layers of 4000
    weights: 5 workers share a direction (cosine about shared^2 / (1 + shared^2)), worker 4 leans the other way."""
    rng = np.random.default_rng(3)
    start = {"a/kernel": np.zeros(4000), "b/kernel": np.zeros(4000)}
    common = {k: rng.standard_normal(4000) for k in start}

    def report(shared):
        models = [{"samples": 100, "weights": {k: (-shared if i == 4 else shared) * common[k] + rng.standard_normal(4000)
                                               for k in start}} for i in range(5)]
        return aggregator.worker_report(models, start, [f"{i}-model.h5" for i in range(5)])

    weak = report(0.3)  # cosine about 0.08
    typical = float(np.median([w["agreement"] for w in weak]))
    assert 0 < typical < aggregator.OUTLIER_MIN_AGREEMENT
    assert weak[4]["agreement"] < aggregator.OUTLIER_AGREEMENT_FRACTION * typical  # flagged without the gate
    assert all(abs(w["layer_norm_ratio"] - 1) < 0.05 for w in weak)
    assert [w["outlier"] for w in weak] == [False] * 5
    strong = report(1.0)  # cosine about 0.5: the same lean is flagged
    assert float(np.median([w["agreement"] for w in strong])) > aggregator.OUTLIER_MIN_AGREEMENT
    assert [w["outlier"] for w in strong] == [False] * 4 + [True]


@pytest.fixture(scope="module")
def mnist_digits(mnist_npz):
    """1800 real MNIST training digits (a fixed sample) and 1000 test digits."""
    rng = np.random.default_rng(5)
    with np.load(mnist_npz) as d:
        pick = rng.choice(len(d["y_train"]), 1800, replace=False)
        return d["x_train"][pick], d["y_train"][pick]


@pytest.mark.parametrize("strategy", ["iid", "label-skew"])
def test_shuffled_label_worker_is_flagged_and_honest_ones_are_not(strategy, mnist_digits, tmp_path, capsys):
    """3 workers train (trainer.py, in this process) from one start on 600 digits each; worker 1's labels are
    shuffled (trainer --attack shuffled-labels). Round 1 from the seeded init, then round 2 from round 1's honest
    average."""
    import trainer
    from helpers import splitter_module

    x, y = mnist_digits
    shards = splitter_module().shard_indices(y, 3, strategy, 0)
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    for i, idx in enumerate(shards):
        np.savez(tmp_path / f"{i}.npz", x=x[idx], y=y[idx])
    for rnd in (1, 2):
        for i in range(3):
            init = ["--init-model", str(root / "aggregated-model.h5")] if rnd == 2 else []
            keras.backend.clear_session()  # layer names as in a fresh trainer process, so the configs are equal
            # (no --threads: in this process TensorFlow may have started already, and its pools are fixed then)
            assert trainer.main(["--data", str(tmp_path / f"{i}.npz"), "--epoch", "2", "--batch", "32",
                                 "--savemodel", str(root / f"model/{i}-model.h5"),
                                 "--save-init", str(root / "rounds/r0.h5"), *init,
                                 *(["--attack", "shuffled-labels"] if i == 1 else [])]) == 0
        # --drop-outliers: round 2 starts from the honest workers' average, as it would in a run using it
        rc, out = aggregate(root, "--expect", 3, "--drop-outliers", capsys=capsys)
        assert rc == 0, out.err
        report = entries(root)[-1]["workers"]
        table = "\n".join(line for line in out.out.splitlines() if "-model.h5" in line)
        assert [w["outlier"] for w in report] == [False, True, False], f"{strategy} round {rnd}:\n{table}"
        print(f"{strategy} round {rnd}:\n{table}")


# --- ledger.py verify / restore ------------------------------------------------------------------------

def run_ledger(*argv):
    proc = subprocess.run([sys.executable, str(REPO / "aggregator/ledger.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def two_rounds(round_one, capsys):
    root, _, _ = round_one
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    fp1 = h5_fingerprint(root / "rounds/r1.h5")
    r1 = keras.models.load_model(root / "rounds/r1.h5", compile=False)
    for i in range(3):
        save_worker(moved(r1, 30 + i, 0.01), root / f"model/{i}-model.h5", 100, fp1, rnd=2)
    assert aggregate(root, "--expect", 3, capsys=capsys)[0] == 0
    return root


def test_verify_and_restore_a_good_ledger(two_rounds):
    root = two_rounds
    rc, out, err = run_ledger("verify", "--dir", root)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1]) == {"last_round": 2, "sha256": ledger.sha256_file(root / "rounds/r2.h5")}
    (root / "aggregated-model.h5").write_bytes(b"a later, interrupted round's file")
    rc, out, err = run_ledger("restore", "--dir", root)
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["last_round"] == 2
    assert (root / "aggregated-model.h5").read_bytes() == (root / "rounds/r2.h5").read_bytes()


def test_no_ledger_is_round_zero(tmp_path):
    rc, out, _ = run_ledger("verify", "--dir", tmp_path)
    assert rc == 0 and json.loads(out.splitlines()[-1]) == {"last_round": 0, "sha256": None}


@pytest.mark.parametrize("victim", ["rounds/r1.h5", "rounds/r2/1-model.h5", "rounds/r0.h5"])
def test_a_tampered_file_is_refused_naming_it(two_rounds, victim):
    root = two_rounds
    data = bytearray((root / victim).read_bytes())
    data[-100] ^= 1  # one bit
    (root / victim).write_bytes(bytes(data))
    before = (root / "aggregated-model.h5").read_bytes()
    for command in ("verify", "restore"):
        rc, out, err = run_ledger(command, "--dir", root)
        assert rc == 2 and out == "", (out, err)
        assert err.startswith("ledger.py: error:") and err.count("\n") == 1
        assert victim in err and "sha256 differs" in err
    assert (root / "aggregated-model.h5").read_bytes() == before  # restore changed nothing


def test_a_tampered_ledger_or_missing_file_is_refused(two_rounds):
    root = two_rounds
    book = json.loads((root / "rounds/ledger.json").read_text())
    book["rounds"][0]["workers"][0]["sha256"] = "0" * 64
    (root / "rounds/ledger.json").write_text(json.dumps(book))
    rc, _, err = run_ledger("verify", "--dir", root)
    assert rc == 2 and "rounds/r1/0-model.h5" in err and "sha256 differs" in err
    book["rounds"][0]["workers"][0]["sha256"] = ledger.sha256_file(root / "rounds/r1/0-model.h5")
    (root / "rounds/ledger.json").write_text(json.dumps(book))
    assert run_ledger("verify", "--dir", root)[0] == 0
    (root / "rounds/r2.h5").unlink()
    rc, _, err = run_ledger("verify", "--dir", root)
    assert rc == 2 and "rounds/r2.h5" in err and "missing" in err
    (root / "rounds/ledger.json").write_text("{not json")
    rc, _, err = run_ledger("restore", "--dir", root)
    assert rc == 2 and "ledger.json" in err and "JSON" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["verify"], ["bogus", "--dir", "."], ["verify", "--dir", "/nonexistent"]])
def test_usage_errors_are_one_line(argv):
    rc, out, err = run_ledger(*argv)
    assert rc == 2 and out == "" and err.startswith("ledger.py") and "error" in err and err.count("\n") == 1, err


# --- the ledger is atomic under a kill -----------------------------------------------------------------

WRITER = """
import sys, time
import ledger  # from the working directory, aggregator/ (python -c puts it first on sys.path)
root = sys.argv[1]
pad = "x" * 200000
k = 0
while True:
    k += 1
    ledger.save(root, {"format": ledger.FORMAT, "rounds": [{"round": i + 1, "pad": pad} for i in range(k % 7 + 1)],
                       "version": k})
    print(k, flush=True)
"""


def test_ledger_write_is_atomic_under_a_kill(tmp_path):
    """A process rewriting a 0.2-1.4 MB ledger in a loop is killed (SIGKILL) at ten moments: each time the ledger
    parses, is a whole version, and no temporary file is taken for it."""
    root = tmp_path / "root"
    (root / "rounds").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=REPO / "aggregator",
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one version written
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        book = json.loads((root / "rounds/ledger.json").read_text())
        assert len(book["rounds"]) == book["version"] % 7 + 1
        assert all(len(e["pad"]) == 200000 for e in book["rounds"])
        assert ledger.load(root)["format"] == "mlk-ledger/1"
    leftovers = [p.name for p in (root / "rounds").iterdir() if p.name != "ledger.json"]
    assert all(name.startswith(".ledger.json-") for name in leftovers)  # a killed write's temp: hidden, ignored


# --- evaluate.py --ledger ------------------------------------------------------------------------------

def test_evaluate_fills_the_ledger_and_draws_the_history(two_rounds, tmp_path, capsys):
    import evaluate

    root = two_rounds
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (120, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 120).astype(np.uint8)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    rc = evaluate.main(["--modelpath", str(root / "aggregated-model.h5"), "--data", str(tmp_path / "test.npz"),
                        "--ledger", str(root / "rounds/ledger.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out.splitlines()[-1])
    e = entries(root)
    assert e[-1]["test_accuracy"] == pytest.approx(result["accuracy"]) and e[-1]["test_loss"] == pytest.approx(
        result["loss"])
    for entry in e:
        model = keras.models.load_model(root / entry["aggregate"]["file"], compile=False)
        probs = model.predict((x / 255.0).astype(np.float32)[..., None], verbose=0)
        assert entry["test_accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)), abs=1e-6)
        assert entry["evaluated_at"].endswith("Z")
        assert all(0 <= w["accuracy"] <= 1 for w in entry["workers"])
    png = (root / "rounds/history.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    # what is filled in is not measured again; a replaced round file is refused
    stamp = e[0]["evaluated_at"]
    (root / "rounds/r1.h5").write_bytes((root / "rounds/r1.h5").read_bytes() + b"\0")
    assert evaluate.main(["--data", str(tmp_path / "test.npz"), "--ledger", str(root / "rounds/ledger.json")]) == 0
    assert entries(root)[0]["evaluated_at"] == stamp
    book = json.loads((root / "rounds/ledger.json").read_text())
    book["rounds"][0]["test_accuracy"] = None
    (root / "rounds/ledger.json").write_text(json.dumps(book))
    capsys.readouterr()
    assert evaluate.main(["--data", str(tmp_path / "test.npz"), "--ledger", str(root / "rounds/ledger.json")]) == 2
    err = capsys.readouterr().err
    assert "rounds/r1.h5" in err and "sha256 differs" in err


def test_evaluate_waits_for_its_round_scoring_the_rounds_before_and_writing_nothing(two_rounds, tmp_path, capsys,
                                                                                    monkeypatch):
    """--wait-round 2 started while the ledger records round 1 only (the quickstart applies it beside the last
    round's trainers): it scores round 1 meanwhile without writing the ledger (the aggregator writes it), then
    only round 2's files once round 2 is recorded, and answers round 2's accuracy. Too long a wait exits 2."""
    import threading

    import evaluate

    root = two_rounds
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 100).astype(np.uint8))
    full = json.loads((root / "rounds/ledger.json").read_text())
    one = json.dumps({**full, "rounds": full["rounds"][:1]})
    (root / "rounds/ledger.json").write_text(one)
    final = (root / "aggregated-model.h5").read_bytes()
    shutil.copyfile(root / "rounds/r1.h5", root / "aggregated-model.h5")
    scored, score = [], evaluate.Scorer.score
    monkeypatch.setattr(evaluate.Scorer, "score", lambda self, path: (scored.append(str(path)), score(self, path))[1])
    monkeypatch.setattr(evaluate, "POLL_SECONDS", 0.05)
    # round 2's workers have landed in ROOT/model (the aggregator is averaging them); a hidden temporary file
    # of a trainer still writing is not looked at
    assert sorted(p.name for p in (root / "model").iterdir()) == ["0-model.h5", "1-model.h5", "2-model.h5"]
    (root / "model/.3-model.h5-0123.h5").write_bytes(b"half a file")
    argv = ["--modelpath", str(root / "aggregated-model.h5"), "--data", str(tmp_path / "test.npz"),
            "--ledger", str(root / "rounds/ledger.json"), "--wait-round", "2"]
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("rc", evaluate.main(argv)))
    thread.start()
    deadline = time.monotonic() + 120
    while len(scored) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert thread.is_alive() and len(scored) == 7, scored
    # round 1's aggregate and its 3 workers from the ledger, then round 2's 3 workers from private copies
    assert [Path(p).name for p in scored[:4]] == ["r1.h5", "0-model.h5", "1-model.h5", "2-model.h5"]
    assert all("/r1/" in p for p in scored[1:4]) and not any(str(root) in p for p in scored[4:])
    assert (root / "rounds/ledger.json").read_text() == one  # nothing written while the aggregator may write
    (root / "aggregated-model.h5").write_bytes(final)  # as the aggregator does: the aggregate, then the ledger
    (root / "rounds/ledger.json").write_text(json.dumps(full))
    thread.join(120)
    out = capsys.readouterr()
    assert done.get("rc") == 0, out.err
    assert [Path(p).name for p in scored[7:]] == ["r2.h5"]  # round 2's workers: the same bytes, scored already
    assert out.out.index("waiting for round 2") < out.out.index("round 2 recorded")
    assert out.out.count("round 1: test accuracy") == 1  # printed once, as written into the ledger
    result, e = json.loads(out.out.splitlines()[-1]), entries(root)
    assert [x["round"] for x in e] == [1, 2] and all(x["test_accuracy"] is not None for x in e)
    assert all(w["accuracy"] is not None for x in e for w in x["workers"])
    assert result["accuracy"] == pytest.approx(e[-1]["test_accuracy"])
    # the copies' figures are the files' own: the same as scoring round 2's kept workers directly
    x, y = evaluate.load_shard(tmp_path / "test.npz")
    direct = evaluate.Scorer(evaluate.to_model_input(x), y, 1000)
    for w in e[1]["workers"]:
        assert w["accuracy"] == pytest.approx(direct.score(root / w["kept"])[1], abs=1e-9)
    # waited for in vain: one line, exit 2, the ledger as it was
    before = (root / "rounds/ledger.json").read_bytes()
    assert evaluate.main(argv[:-1] + ["3", "--wait", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "round 3 not recorded within 0.2s" in err and "\n" not in err, err
    assert (root / "rounds/ledger.json").read_bytes() == before


def test_evaluate_waiting_looks_again_when_the_volume_is_away(monkeypatch, tmp_path, capsys):
    """An NFS server restarting while the accuracy test waits: the ledger cannot be read for a moment; it says so
    and looks again (no traceback), and goes on once the round is recorded."""
    import evaluate

    looks = iter([OSError(5, "Input/output error"), 1, OSError(116, "Stale file handle"), 2])

    def recorded(path):
        answer = next(looks)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(evaluate, "recorded_round", recorded)
    monkeypatch.setattr(evaluate, "fill_ledger", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate, "POLL_SECONDS", 0.01)
    args = evaluate.build_parser().parse_args(["--ledger", str(tmp_path / "rounds/ledger.json"), "--wait-round", "2"])
    evaluate.wait_round(args, evaluate.Scorer(None, None, 1))
    out = capsys.readouterr().out
    assert out.count("cannot read") == 2 and "Input/output error" in out and "Stale file handle" in out
    assert out.rstrip().endswith("round 2 recorded")


def test_evaluate_start_looks_again_when_the_volume_is_away(monkeypatch, tmp_path, capsys):
    """The accuracy test started while the NFS server restarts (the real node's pvc run deletes it in round 2):
    its first look at the ledger fails with "No route to host". It says so and goes on to wait (which looks
    again), rather than exit 1 with that error as its last line."""
    import evaluate

    ledger = tmp_path / "rounds" / "ledger.json"
    ledger.parent.mkdir()
    ledger.write_text("{}")
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.array([0, 1], np.uint8))

    def away(path):
        raise OSError(113, "No route to host")

    waited = []

    def wait(args, score):
        waited.append(args.wait_round)
        raise evaluate.InputError("stopped here by the test")

    monkeypatch.setattr(evaluate, "load_ledger", away)
    monkeypatch.setattr(evaluate, "wait_round", wait)
    assert evaluate.main(["--ledger", str(ledger), "--wait-round", "2", "--data", str(tmp_path / "test.npz")]) == 2
    out = capsys.readouterr()
    assert waited == [2] and "No route to host" in out.out and "looking again" in out.out
    assert "stopped here by the test" in out.err


def test_evaluate_refuses_a_bad_ledger_before_tensorflow(tmp_path):
    (tmp_path / "ledger.json").write_text("[]")
    proc = subprocess.run([sys.executable, str(REPO / "trainer/evaluate.py"), "--ledger", str(tmp_path / "ledger.json"),
                           "--data", str(tmp_path / "none.npz")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a round ledger" in proc.stderr


# --- the server optimiser's state (--server-optimizer; aggregator/strategies.py) ------------------------------

def start_root(root):
    """ROOT as round_one makes it: rounds/r0.h5 and model/ with round 1's 3 workers."""
    return first_round_at(root)[0]


def next_workers(root, rnd):
    """Round rnd's 3 workers, moved (seeded by the round) from ROOT/aggregated-model.h5, as trainers would."""
    fp = h5_fingerprint(root / "aggregated-model.h5")
    prev = keras.models.load_model(root / "aggregated-model.h5", compile=False)
    for i, n in enumerate((100, 200, 300)):
        save_worker(moved(prev, 10 * rnd + i, 0.01), root / f"model/{i}-model.h5", n, fp, rnd=rnd)


def run_round(root, rnd, *flags, capsys=None):
    if rnd > 1:
        next_workers(root, rnd)
    rc, out = aggregate(root, "--expect", 3, *flags, capsys=capsys)
    assert rc == 0, out.err if out else rc
    return out


def test_fedavgm_round_records_its_state_and_steps_from_the_start(tmp_path, capsys):
    root = start_root(tmp_path / "root")
    start = h5_weights(root / "rounds/r0.h5")
    inputs = [aggregator.read_model(root / f"model/{i}-model.h5") for i in range(3)]
    out = run_round(root, 1, "--server-optimizer", "fedavgm", "--server-lr", "2", "--server-momentum", "0.5",
                    capsys=capsys)
    assert "fedavgm step" in out.out and "a fresh state" in out.out
    e = entries(root)[0]
    assert "aggregation" not in e
    assert e["server_optimizer"] == {"name": "fedavgm", "server_lr": 2.0, "momentum": 0.5,
                                     "state": {"file": "rounds/r1-opt.npz",
                                               "sha256": ledger.sha256_file(root / "rounds/r1-opt.npz")},
                                     "state_from": None}
    # round 1: v = delta = fedavg - start; new = start + 2 * v
    avg = aggregator.fedavg(inputs)
    got = h5_weights(root / "rounds/r1.h5")
    with np.load(root / "rounds/r1-opt.npz") as z:
        assert sorted(z.files) == [f"v.{i:04d}" for i in range(len(start))]
    for k in start:
        delta = avg[k].astype(np.float64) - start[k]
        np.testing.assert_allclose(got[k], start[k] + 2 * delta, rtol=1e-6, atol=1e-7)
    assert got[k].dtype == np.float32
    # round 2 continues from round 1's state
    out = run_round(root, 2, "--server-optimizer", "fedavgm", "--server-lr", "2", "--server-momentum", "0.5",
                    capsys=capsys)
    assert entries(root)[1]["server_optimizer"]["state_from"] == "rounds/r1-opt.npz"
    assert "from rounds/r1-opt.npz" in out.out


@pytest.mark.parametrize("flags, fresh_optimizer", [
    (("--server-optimizer", "fedadam", "--server-lr", "0.01"), lambda: aggregator.strategies.FedAdam(0.01)),
    (("--server-optimizer", "fedavgm", "--server-momentum", "0.5"), lambda: aggregator.strategies.FedAvgM(1.0, 0.5)),
], ids=["fedadam", "fedavgm"])
def test_server_optimizer_resumed_after_restore_equals_an_uninterrupted_run_bit_for_bit(flags, fresh_optimizer,
                                                                                       tmp_path, capsys):
    """3 rounds of the optimiser in one go, and 2 rounds + a round 3 killed after writing its state and the aggregate
    (not the ledger) + ledger.py restore + round 3 again: the same round-3 weights, bit for bit."""
    one_go = start_root(tmp_path / "one-go")
    for rnd in (1, 2, 3):
        run_round(one_go, rnd, *flags, capsys=capsys)
    resumed = start_root(tmp_path / "resumed")
    for rnd in (1, 2):
        run_round(resumed, rnd, *flags, capsys=capsys)
    (resumed / "aggregated-model.h5").write_bytes(b"round 3's aggregate, half written when the pod was killed")
    (resumed / "rounds/r3-opt.npz").write_bytes(b"round 3's state, never recorded")
    rc, stdout, err = run_ledger("restore", "--dir", resumed)
    assert rc == 0 and json.loads(stdout.splitlines()[-1])["last_round"] == 2, err
    run_round(resumed, 3, *flags, capsys=capsys)
    a, b = h5_weights(one_go / "rounds/r3.h5"), h5_weights(resumed / "rounds/r3.h5")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # the state files are the same bytes too (fixed zip time stamps), so their sha256 in the ledgers agree
    for rnd in (1, 2, 3):
        assert (one_go / f"rounds/r{rnd}-opt.npz").read_bytes() == (resumed / f"rounds/r{rnd}-opt.npz").read_bytes()
    e3 = entries(resumed)[2]["server_optimizer"]
    assert e3 == entries(one_go)[2]["server_optimizer"] and e3["state_from"] == "rounds/r2-opt.npz"
    # and the state mattered: a fresh FedAdam step over round 3's inputs gives other weights
    models = [aggregator.read_model(resumed / f"rounds/r3/{i}-model.h5") for i in range(3)]
    order = models[0]["order"]
    start = h5_weights(resumed / "rounds/r2.h5")
    fresh, _ = fresh_optimizer().step([start[k] for k in order], [aggregator.fedavg(models)[k] for k in order], None)
    assert any(f.tobytes() != b[k].tobytes() for f, k in zip(fresh, order))


def test_a_tampered_state_is_refused_by_verify_restore_and_the_next_round(tmp_path, capsys):
    root = start_root(tmp_path / "root")
    run_round(root, 1, "--server-optimizer", "fedadam", "--server-lr", "0.01", capsys=capsys)
    assert run_ledger("verify", "--dir", root)[0] == 0
    data = bytearray((root / "rounds/r1-opt.npz").read_bytes())
    data[-200] ^= 1
    (root / "rounds/r1-opt.npz").write_bytes(bytes(data))
    for command in ("verify", "restore"):
        rc, out, err = run_ledger(command, "--dir", root)
        assert rc == 2 and "rounds/r1-opt.npz" in err and "sha256 differs" in err and err.count("\n") == 1
    next_workers(root, 2)
    rc, out = aggregate(root, "--expect", 3, "--server-optimizer", "fedadam", "--server-lr", "0.01", capsys=capsys)
    assert rc == 2 and "rounds/r1-opt.npz" in out.err and "sha256 differs" in out.err and out.err.count("\n") == 1
    assert len(entries(root)) == 1 and not (root / "rounds/r2.h5").exists()
    (root / "rounds/r1-opt.npz").unlink()
    rc, out = aggregate(root, "--expect", 3, "--server-optimizer", "fedadam", "--server-lr", "0.01", capsys=capsys)
    assert rc == 2 and "rounds/r1-opt.npz" in out.err and "missing" in out.err


def test_another_optimizer_or_none_before_starts_afresh(tmp_path, capsys):
    root = start_root(tmp_path / "root")
    run_round(root, 1, capsys=capsys)  # plain FedAvg
    out = run_round(root, 2, "--server-optimizer", "fedavgm", capsys=capsys)
    assert "round 1 has server optimizer none" in out.out
    assert entries(root)[1]["server_optimizer"]["state_from"] is None
    assert entries(root)[1]["server_optimizer"]["momentum"] == 0.9 and entries(root)[1]["server_optimizer"][
        "server_lr"] == 1.0
    out = run_round(root, 3, "--server-optimizer", "fedadam", "--server-lr", "0.01", "--aggregation", "median",
                    capsys=capsys)
    assert "round 2 has server optimizer fedavgm" in out.out
    e = entries(root)[2]
    assert e["server_optimizer"]["state_from"] is None and e["aggregation"] == {"rule": "median"}
    assert run_ledger("verify", "--dir", root)[0] == 0


def test_fedavgm_with_lr_1_and_momentum_0_writes_the_plain_average(tmp_path, capsys):
    plain, stepped = start_root(tmp_path / "plain"), start_root(tmp_path / "stepped")
    run_round(plain, 1, capsys=capsys)
    run_round(stepped, 1, "--server-optimizer", "fedavgm", "--server-lr", "1", "--server-momentum", "0", capsys=capsys)
    a, b = h5_weights(plain / "rounds/r1.h5"), h5_weights(stepped / "rounds/r1.h5")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_each_server_optimizer_has_its_own_default_learning_rate(tmp_path, capsys):
    """Without --server-lr: fedavgm steps with 1 (momentum 0.9), fedadam with 0.01 (its lr is an absolute step)."""
    for name, lr in (("fedavgm", 1.0), ("fedadam", 0.01)):
        root = start_root(tmp_path / name)
        run_round(root, 1, "--server-optimizer", name, capsys=capsys)
        assert entries(root)[0]["server_optimizer"]["server_lr"] == lr
