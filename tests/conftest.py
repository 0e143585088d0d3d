"""Fixtures for the server tests: one small model trained on real MNIST by the project's trainer, and the
app serving it with Flask's test client."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import MnistUnavailable, mnist_path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SAMPLES = 12000  # ~0.98 on the MNIST test set after 2 epochs; about 30 s on 2 cores


@pytest.fixture(scope="session")
def mnist_npz():
    """Path of real MNIST (Keras layout), found as the programs find it: helpers.mnist_path()."""
    try:
        path = mnist_path()
    except MnistUnavailable as e:
        pytest.fail(f"real MNIST unavailable: {e}")
    if not path.is_file():
        pytest.fail(f"MNIST_NPZ={path}: no such file")
    return path


@pytest.fixture(scope="session")
def mnist_model(tmp_path_factory, mnist_npz):
    """Path of an .h5 trained by trainer/trainer.py on the first 12000 MNIST training digits,
    with an aggregator-style set of root attributes added (as the server reads them)."""
    import h5py

    work = tmp_path_factory.mktemp("mnist-model")
    with np.load(mnist_npz) as npz:
        np.savez(work / "0.npz", x=npz["x_train"][:TRAIN_SAMPLES], y=npz["y_train"][:TRAIN_SAMPLES])
    model = work / "aggregated-model.h5"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, str(ROOT / "trainer/trainer.py"), "--data", str(work / "0.npz"), "--epoch", "2",
                    "--batch", "64", "--savemodel", str(model)], check=True, env=env, capture_output=True, timeout=600)
    with h5py.File(model, "a") as f:  # what the aggregator writes over a worker's attributes
        f.attrs.update({"mlk_kind": "aggregated", "mlk_workers": 1,
                        "mlk_inputs": '[{"file": "0-model.h5", "sha256": "x", "samples": 12000}]'})
    return model


@pytest.fixture(scope="session")
def mnist_test(mnist_npz):
    """(x_test, y_test) of real MNIST."""
    with np.load(mnist_npz) as npz:
        return npz["x_test"], npz["y_test"]


@pytest.fixture(scope="module")
def app(mnist_model):
    """The server's Flask app (create_app) serving mnist_model, once per test module."""
    import app as server_app  # server/ is on pytest.ini's pythonpath

    application = server_app.create_app(str(mnist_model))
    application.testing = True
    return application


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def subset(tmp_path_factory, mnist_npz):
    """6000 training and 1000 test digits of real MNIST (a fixed random sample) as a Keras-layout npz: the local
    pipeline's runs in tests/test_local_quickstart.py and tests/test_live_browser.py."""
    rng = np.random.default_rng(0)
    with np.load(mnist_npz) as d:
        train = rng.choice(len(d["y_train"]), 6000, replace=False)
        test = rng.choice(len(d["y_test"]), 1000, replace=False)
        arrays = {"x_train": d["x_train"][train], "y_train": d["y_train"][train],
                  "x_test": d["x_test"][test], "y_test": d["y_test"][test]}
    path = tmp_path_factory.mktemp("mnist") / "mnist-subset.npz"
    np.savez(path, **arrays)
    return path
