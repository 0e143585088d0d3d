"""server/model.py runs the model with LiteRT, converted in memory at load: the same probabilities as Keras,
reported in /api/model; a model LiteRT cannot take is served by TensorFlow instead."""

import numpy as np
import pytest

import model as model_module  # noqa: E402


@pytest.fixture(scope="module")
def digits(mnist_test):
    x, y = mnist_test
    return (x[:300].astype(np.float32) / 255.0), y[:300]


def test_litert_gives_keras_probabilities(mnist_model, digits):
    import keras

    x, y = digits
    loaded = model_module.LoadedModel(str(mnist_model), model_module.file_signature(str(mnist_model)))
    assert loaded.runtime == "litert"
    assert loaded.info()["runtime"] == "litert"
    reference = keras.models.load_model(str(mnist_model), compile=False).predict(x[..., None], verbose=0)
    for batch in (x[:1], x[:7], x):  # one image, a small batch, many
        got = loaded.predict(batch)
        assert got.shape == (len(batch), 10) and got.dtype == np.float64
        np.testing.assert_allclose(got, reference[:len(batch)], atol=1e-5)
    assert float(np.mean(loaded.predict(x).argmax(axis=1) == y)) > 0.9
    assert loaded.predict(np.zeros((0, 28, 28), np.float32)).shape == (0, 10)


def test_tensorflow_serves_when_litert_cannot(mnist_model, digits, monkeypatch, caplog):
    def refuse(tf, model):
        raise ValueError("an operation LiteRT lacks")

    monkeypatch.setattr(model_module, "_litert_interpreter", refuse)
    x, y = digits
    loaded = model_module.LoadedModel(str(mnist_model), model_module.file_signature(str(mnist_model)))
    assert loaded.runtime == "tensorflow"
    assert any("LiteRT unavailable" in r.getMessage() and "an operation LiteRT lacks" in r.getMessage()
               for r in caplog.records)
    assert float(np.mean(loaded.predict(x).argmax(axis=1) == y)) > 0.9
