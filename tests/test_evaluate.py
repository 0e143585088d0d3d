"""trainer/evaluate.py: JSON result matches a direct computation; bad input exits 2."""

import json

import numpy as np
import pytest

import evaluate  # noqa: E402
import trainer  # noqa: E402


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    import keras

    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (150, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 150).astype(np.uint8)
    np.savez(tmp / "test.npz", x=x, y=y)
    keras.utils.set_random_seed(11)
    model = trainer.build_model(keras)
    model.save(tmp / "m.h5")
    return tmp / "m.h5", tmp / "test.npz", model, x, y


def test_prints_json_matching_direct_accuracy(model_and_data, capsys):
    path, data, model, x, y = model_and_data
    assert evaluate.main(["--modelpath", str(path), "--data", str(data), "--batch", "40"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert set(result) == {"loss", "accuracy"}
    probs = model.predict((x.astype(np.float32) / 255)[..., None], verbose=0)
    assert result["accuracy"] == pytest.approx(float(np.mean(probs.argmax(axis=1) == y)), abs=1e-6)
    expected_loss = float(np.mean(-np.log(probs[np.arange(len(y)), y])))
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert any(line.startswith("Test accuracy:") for line in out)


def test_bad_inputs_exit_2(model_and_data, tmp_path, capsys):
    path, data, _, _, _ = model_and_data
    (tmp_path / "junk.h5").write_bytes(b"junk")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.array([0, 1, 12], np.uint8))
    cases = [
        (["--modelpath", str(tmp_path / "absent.h5"), "--data", str(data)], "no such file"),
        (["--modelpath", str(tmp_path / "junk.h5"), "--data", str(data)], "not an HDF5"),
        (["--modelpath", str(path), "--data", str(tmp_path / "absent.npz")], "no such file"),
        (["--modelpath", str(path), "--data", str(tmp_path / "bad.npz")], "labels must be 0-9"),
        (["--modelpath", str(path), "--data", str(data), "--batch", "0"], "--batch must be >= 1"),
        (["--data", str(data)], "required"),
    ]
    for argv, message in cases:
        assert evaluate.main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("evaluate.py: error:") and message in err and "\n" not in err, err
        assert "{" not in captured.out
