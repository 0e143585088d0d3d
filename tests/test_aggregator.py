"""aggregator/aggregator.py: weighted average, output loads in Keras, every refusal."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
import aggregator  # noqa: E402

import keras  # noqa: E402
from helpers import tiny_model  # noqa: E402


def save_worker(model, path, samples, fingerprint="fp0", rnd=1, epochs=1):
    model.save(str(path))
    with h5py.File(path, "r+") as f:
        f.attrs["mlk_kind"] = "worker"
        f.attrs["mlk_samples"] = samples
        f.attrs["mlk_init_fingerprint"] = fingerprint
        f.attrs["mlk_round"] = rnd
        f.attrs["mlk_epochs"] = epochs
    return path


@pytest.fixture(scope="module")
def models():
    """Three tiny conv nets with different weights (same architecture)."""
    return [tiny_model(s) for s in (1, 2, 3)]


@pytest.fixture
def workdir(tmp_path, models):
    d = tmp_path / "model"
    d.mkdir()
    for i, (m, n) in enumerate(zip(models, (100, 200, 700))):
        save_worker(m, d / f"{i}-model.h5", n)
    return d


def run(argv, capsys):
    rc = aggregator.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_weighted_average_is_numerically_right_and_loads(workdir, tmp_path, models, capsys):
    out = tmp_path / "agg.h5"
    rc, stdout, _ = run(["--dir", workdir, "--savefile", out], capsys)
    assert rc == 0, stdout
    agg = keras.models.load_model(out, compile=False)
    w = np.array([100, 200, 700], dtype=np.float64) / 1000
    for got, *ins in zip(agg.get_weights(), *(m.get_weights() for m in models)):
        want = sum(wi * x.astype(np.float64) for wi, x in zip(w, ins))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the plain mean differs, so a weighting bug would fail above
    assert not np.allclose(agg.get_weights()[0], np.mean([m.get_weights()[0] for m in models], 0))
    pred = agg.predict(np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32), verbose=0)
    assert pred.shape == (4, 10)
    np.testing.assert_allclose(pred.sum(axis=1), 1.0, rtol=1e-5)


def test_attributes(workdir, tmp_path, capsys):
    out = tmp_path / "agg.h5"
    assert run(["--dir", workdir, "--savefile", out], capsys)[0] == 0
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert a["mlk_kind"] == "aggregated"
        assert a["mlk_samples"] == 1000
        assert a["mlk_workers"] == 3
        assert a["mlk_round"] == 1
        assert a["mlk_epochs"] == 1
        assert a["mlk_init_fingerprint"] == "fp0"
        inputs = json.loads(a["mlk_inputs"])
    assert [i["file"] for i in inputs] == ["0-model.h5", "1-model.h5", "2-model.h5"]
    assert [i["samples"] for i in inputs] == [100, 200, 700]
    assert inputs[0]["sha256"] == aggregator.sha256_file(workdir / "0-model.h5")
    assert not list(tmp_path.glob(".*tmp"))


def test_skips_temp_files_and_own_output(workdir, capsys):
    (workdir / ".3-model.h5").write_bytes(b"half written")
    (workdir / "4-model.h5.tmp").write_bytes(b"half written")
    out = workdir / "agg.h5"
    assert run(["--dir", workdir, "--savefile", out], capsys)[0] == 0
    # a second run in the same dir must not average the previous output in
    assert run(["--dir", workdir, "--savefile", out], capsys)[0] == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["mlk_workers"] == 3


def test_expect_waits_for_late_model(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(aggregator, "POLL_SECONDS", 0.1)
    d = tmp_path / "model"
    d.mkdir()
    save_worker(models[0], d / "0-model.h5", 10)
    late = tmp_path / "late.h5"
    save_worker(models[1], late, 30)
    timer = threading.Timer(0.5, lambda: os.replace(late, d / "1-model.h5"))
    timer.start()
    try:
        rc, stdout, _ = run(["--dir", d, "--savefile", tmp_path / "agg.h5", "--expect", 2,
                             "--timeout", 20], capsys)
    finally:
        timer.join()
    assert rc == 0
    assert "waiting for models: 1/2" in stdout
    with h5py.File(tmp_path / "agg.h5", "r") as f:
        assert f.attrs["mlk_samples"] == 40


def test_expect_timeout_names_missing(workdir, tmp_path, capsys):
    out = tmp_path / "agg.h5"
    rc, _, err = run(["--dir", workdir, "--savefile", out, "--expect", 5, "--timeout", 0.2],
                     capsys)
    assert rc == 2
    assert "timed out" in err and "2 missing" in err and "0-model.h5" in err
    assert not out.exists()


def test_round_derives_dropped_and_missing_once():
    """aggregator.Round: what the aggregate's mlk_ attributes and the ledger entry both say about the inputs."""
    models = [{"samples": s} for s in (10, 20, 30)]

    def rnd(names, used=(True, True, True), expect=None):
        return aggregator.Round(1, [Path(n) for n in names], models, ["d"] * 3, [{}] * 3, list(used), expect,
                                min_workers=None, start_digest=None)

    r = rnd(["0-model.h5", "2-model.h5", "3-model.h5"], used=(True, False, True), expect=5)
    assert r.dropped == ["2-model.h5"] and r.missing == ["1-model.h5", "4-model.h5"] and r.shortfall == 2
    assert r.kept == ([models[0], models[2]], [Path("0-model.h5"), Path("3-model.h5")])
    assert r.mlk_attrs() == {"mlk_expected_workers": 5, "mlk_missing": "1-model.h5,4-model.h5",
                             "mlk_dropped": "2-model.h5"}
    r = rnd(["0-model.h5", "a.h5", "b.h5"], expect=4)  # not the {i}-model.h5 naming: only a count
    assert r.missing == [] and r.mlk_attrs()["mlk_missing"] == "1 unnamed"
    assert rnd(["a.h5", "b.h5", "c.h5"]).mlk_attrs() == {"mlk_expected_workers": 3, "mlk_missing": "",
                                                         "mlk_dropped": ""}


def refusal(tmp_path, capsys, argv=()):
    out = tmp_path / "agg.h5"
    rc, _, err = run(["--dir", tmp_path / "model", "--savefile", out, *argv], capsys)
    assert rc == 2
    assert err.startswith("aggregator: error:") and err.count("\n") == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    return err


def test_refuses_empty_dir(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert "no *.h5 models" in refusal(tmp_path, capsys)


def test_refuses_missing_dir(tmp_path, capsys):
    assert "not a directory" in refusal(tmp_path, capsys)


def test_refuses_different_architecture(workdir, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    save_worker(other, workdir / "9-model.h5", 50)
    err = refusal(tmp_path, capsys)
    assert "9-model.h5" in err and "architecture" in err


def test_refuses_different_weight_shapes(workdir, tmp_path, capsys):
    # same model_config text, but a weight dataset with another shape
    p = workdir / "2-model.h5"
    with h5py.File(p, "r+") as f:
        name = next(iter(aggregator.weight_datasets(f)))
        del f["model_weights"][name]
        f["model_weights"].create_dataset(name, data=np.zeros((1, 2, 3), np.float32))
    err = refusal(tmp_path, capsys)
    assert "2-model.h5" in err and "shapes" in err


def test_refuses_mixed_init_unless_allowed(workdir, tmp_path, models, capsys):
    save_worker(models[0], workdir / "1-model.h5", 200, fingerprint="other")
    err = refusal(tmp_path, capsys)
    assert "1-model.h5" in err and "fingerprint" in err and "--allow-mixed-init" in err
    out = tmp_path / "agg.h5"
    rc, _, _ = run(["--dir", workdir, "--savefile", out, "--allow-mixed-init"], capsys)
    assert rc == 0 and out.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refuses_non_finite(workdir, tmp_path, capsys, bad):
    with h5py.File(workdir / "1-model.h5", "r+") as f:
        ds = next(iter(aggregator.weight_datasets(f).values()))
        arr = ds[()]
        arr.flat[0] = bad
        ds[...] = arr
    err = refusal(tmp_path, capsys)
    assert "1-model.h5" in err and "NaN or infinite" in err


def test_refuses_truncated_file(workdir, tmp_path, capsys):
    p = workdir / "1-model.h5"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    err = refusal(tmp_path, capsys)
    assert "1-model.h5" in err and "HDF5" in err


def test_refuses_non_hdf5_file(workdir, tmp_path, capsys):
    (workdir / "5-model.h5").write_text("this is not hdf5\n")
    err = refusal(tmp_path, capsys)
    assert "5-model.h5" in err and "HDF5" in err


def test_refuses_missing_samples(workdir, tmp_path, capsys):
    with h5py.File(workdir / "0-model.h5", "r+") as f:
        del f.attrs["mlk_samples"]
    err = refusal(tmp_path, capsys)
    assert "0-model.h5" in err and "mlk_samples" in err


def test_refuses_bad_expect(workdir, tmp_path, capsys):
    assert "--expect" in refusal(tmp_path, capsys, ["--expect", "0"])


def test_module_does_not_import_tensorflow(workdir, tmp_path):
    code = ("import sys; import aggregator; "
            f"rc = aggregator.main(['--dir', {str(workdir)!r}, '--savefile', "
            f"{str(tmp_path / 'a.h5')!r}]); "
            "assert rc == 0; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras')]; assert not bad, bad")
    # python -c imports from its working directory: aggregator/, as the image runs it
    subprocess.run([sys.executable, "-c", code], cwd=REPO / "aggregator", check=True, capture_output=True, timeout=60)


def test_cli_exit_code_without_traceback(tmp_path):
    (tmp_path / "model").mkdir()
    r = subprocess.run([sys.executable, str(REPO / "aggregator" / "aggregator.py"),
                        "--dir", str(tmp_path / "model"), "--savefile", str(tmp_path / "a.h5")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "no *.h5 models" in r.stderr


# --- --aggregation (aggregator/strategies.py; the rules themselves: tests/test_strategies.py) ---------------

def weight_lists(paths):
    """Each file's weights as a list in Keras order (what strategies.py takes), and that order."""
    models = [aggregator.read_model(p) for p in paths]
    order = models[0]["order"]
    return [[m["weights"][k] for k in order] for m in models], order


def ledger_entry(root):
    return json.loads((root / "rounds/ledger.json").read_text())["rounds"][-1]


def test_default_records_no_rule_or_optimizer(workdir, tmp_path, capsys):
    assert run(["--dir", workdir, "--savefile", tmp_path / "agg.h5"], capsys)[0] == 0
    e = ledger_entry(tmp_path)
    assert "aggregation" not in e and "server_optimizer" not in e
    assert not list((tmp_path / "rounds").glob("*-opt.npz"))
    # fedavg named explicitly is the same computation, to the byte
    first = (tmp_path / "agg.h5").read_bytes()
    assert run(["--dir", workdir, "--savefile", tmp_path / "agg.h5", "--aggregation", "fedavg",
                "--server-optimizer", "none"], capsys)[0] == 0
    assert (tmp_path / "agg.h5").read_bytes() == first and "aggregation" not in ledger_entry(tmp_path)


@pytest.mark.parametrize("argv, rule, record", [
    (["--aggregation", "median"], lambda ws: aggregator.strategies.median(ws), {"rule": "median"}),
    (["--aggregation", "trimmed-mean", "--trim-beta", "0.34"], lambda ws: aggregator.strategies.median(ws),
     {"rule": "trimmed-mean", "beta": 0.34, "trimmed": 1}),  # 3 workers, k = floor(1.02) = 1: the median
    (["--aggregation", "trimmed-mean"], lambda ws: aggregator.strategies.mean(ws),
     {"rule": "trimmed-mean", "beta": 0.2, "trimmed": 0}),  # the default beta trims nothing of 3
    (["--aggregation", "krum", "--krum-f", "0"], None, {"rule": "krum", "f": 0, "m": 1}),
    (["--aggregation", "krum", "--krum-f", "0", "--krum-m", "3"], lambda ws: aggregator.strategies.mean(ws),
     {"rule": "krum", "f": 0, "m": 3, "selected": None}),
])
def test_a_rule_writes_its_result_and_records_it(workdir, tmp_path, capsys, argv, rule, record):
    out = tmp_path / "agg.h5"
    rc, stdout, err = run(["--dir", workdir, "--savefile", out, *argv], capsys)
    assert rc == 0, err
    inputs, order = weight_lists(sorted(workdir.glob("*-model.h5")))
    e = ledger_entry(tmp_path)
    got = e["aggregation"]
    if record["rule"] == "krum":  # the selection is checked against strategies.krum_select on the same weights
        chosen = aggregator.strategies.krum_select(inputs, record["f"], record["m"])
        assert got.pop("selected") == [f"{i}-model.h5" for i in chosen]
        record = {k: v for k, v in record.items() if k != "selected"}
        rule = rule or (lambda ws: ws[chosen[0]])
        assert "krum (f=" in stdout
    assert got == record
    written, _ = weight_lists([out])
    for a, b in zip(written[0], rule(inputs)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    with h5py.File(out, "r") as f:
        assert f.attrs["mlk_workers"] == 3 and f.attrs["mlk_samples"] == 1000
    assert "server_optimizer" not in e and e["samples"] == 1000


@pytest.mark.parametrize("argv, message", [
    (["--trim-beta", "0.1"], "--trim-beta needs --aggregation trimmed-mean"),
    (["--aggregation", "median", "--krum-f", "1"], "--krum-f needs --aggregation krum"),
    (["--krum-m", "2"], "--krum-m needs --aggregation krum"),
    (["--server-lr", "0.5"], "--server-lr needs --server-optimizer"),
    (["--server-optimizer", "fedadam", "--server-momentum", "0.5"], "--server-momentum needs --server-optimizer fedavgm"),
    (["--aggregation", "trimmed-mean", "--trim-beta", "0.5"], "[0, 0.5)"),
    (["--aggregation", "krum", "--krum-m", "0"], "--krum-m"),
    (["--aggregation", "krum"], "more than 2f+2 = 4 models, got 3"),  # the default f = 1 needs 5 workers
    (["--aggregation", "krum", "--expect", "4"], "needs more than 4 models, and --expect is 4"),
    (["--aggregation", "krum", "--krum-f", "0", "--krum-m", "4"], "between 1 and n - f = 3"),
    (["--server-optimizer", "fedavgm", "--server-momentum", "1"], "momentum"),
    (["--server-optimizer", "fedadam", "--server-lr", "0"], "server lr"),
    (["--server-optimizer", "fedavgm"], "needs the round's starting weights"),  # no rounds/r0.h5 here
])
def test_rule_and_optimizer_refusals(workdir, tmp_path, capsys, argv, message):
    err = refusal(tmp_path, capsys, argv)
    assert message in err, err
    assert not (tmp_path / "rounds").exists()


def test_unknown_rule_is_a_usage_error(workdir, tmp_path, capsys):
    rc, _, err = run(["--dir", workdir, "--savefile", tmp_path / "agg.h5", "--aggregation", "bogus"], capsys)
    assert rc == 2 and "invalid choice" in err and err.count("\n") == 1
