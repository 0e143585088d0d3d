"""Split MNIST into N training shards plus a test set (the pipeline's first stage).

    python splitter.py --n_container 3 --savedir /mnt/data [--dataset mnist.npz [--wait-data SECONDS]] [--run-id ID]

Writes DIR/0.npz ... DIR/{N-1}.npz (keys x uint8 (n, 28, 28), y uint8 (n,)) and DIR/test.npz.
Shard sizes differ by at most one; together they hold every training sample exactly once.
With --run-id, DIR/run-id holding ID is written last: trainers started before the split (trainer.py
--run-id) wait for it, so they never read an earlier run's shards. The marker goes first, whatever the flags.
Needs numpy only.
"""

import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from mlkcommon import (RUN_MARKER, Parser, atomic_path, error, int_at_least, parse_args, run_id_problem, sha256_file,
                       wait_until, write_bytes_atomic)

PROG = "splitter"
MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
MAX_SHARDS = 60000
LABEL_SKEW_DIGITS = 2  # label-skew: each shard is drawn mostly from this many digits
SHARD_NAME = re.compile(r"^\d+\.npz$")


class SplitError(Exception):
    """Bad input: reported as one line on stderr, exit code 2 (a retry would fail the same way)."""

    exit_code = 2


class DownloadError(SplitError):
    """The MNIST download failed or arrived damaged: one line on stderr, exit code 1, since a retry
    may succeed (a Job retries it; exit code 2 fails the Job at once, see manifests/4-splitter.yaml)."""

    exit_code = 1


def build_parser():
    p = Parser(prog="splitter.py", description=__doc__.splitlines()[0])
    p.add_argument("--n_container", type=int, required=True, help="number of shards (workers)")
    p.add_argument("--savedir", required=True, help="directory for 0.npz ... and test.npz")
    p.add_argument("--dataset", default=None,
                   help="Keras-layout mnist.npz (default: env MNIST_NPZ, else download)")
    p.add_argument("--shuffle-seed", type=int_at_least(0), default=0, help="seed of the shuffle (default 0)")
    p.add_argument("--strategy", choices=("iid", "label-skew"), default="iid",
                   help="iid: random shards; label-skew: each shard dominated by a few digits")
    p.add_argument("--wait-data", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for --dataset to appear (an upload still under way; default 0: no wait)")
    p.add_argument("--run-id", default=None, metavar="ID",
                   help=f"name this split: write ID into SAVEDIR/{RUN_MARKER} once every shard is written, for "
                        "trainers that start before it (trainer.py --run-id); 1-64 letters, digits, . _ -")
    return p


# --- data ---------------------------------------------------------------------------------

def fetch(url, dest):
    """Copy url to dest (a file path). Separate so tests can monkeypatch it."""
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


sha256_of = sha256_file  # the name the tests and tests/helpers.py use


def download_mnist(cache_dir, url=None, sha256=None):
    """Download mnist.npz into cache_dir (reused when its checksum matches); return its path."""
    url = url or MNIST_URL  # looked up at call time, so tests can patch the module constants
    sha256 = sha256 or MNIST_SHA256
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "mnist.npz"
    if path.exists() and sha256_of(path) == sha256:
        return path
    print(f"{PROG}: downloading {url}", flush=True)
    with atomic_path(path) as tmp:  # renamed into place only once the checksum matches
        try:
            fetch(url, tmp)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DownloadError(f"could not download {url} ({e}); without network, pass "
                                "--dataset PATH or set MNIST_NPZ to a local Keras mnist.npz") from None
        got = sha256_file(tmp)
        if got != sha256:
            raise DownloadError(f"downloaded {url} has sha256 {got}, expected {sha256}; "
                                "pass --dataset PATH to use a local copy")
    return path


def wait_for_dataset(path, seconds):
    """Return once `path` exists (the quickstart's upload renames a whole file into place); SplitError after
    `seconds`."""
    if seconds > 0 and wait_until(lambda: os.path.exists(path), seconds, path, "(an upload)", f"{PROG}: ") is None:
        raise SplitError(f"--dataset {path}: still absent after waiting {seconds:g}s (--wait-data)")


def load_mnist(path):
    """Read and check a Keras-layout mnist.npz; return (x_train, y_train, x_test, y_test)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        raise SplitError(f"{path}: no such file") from None
    except KeyError as e:
        raise SplitError(f"{path}: missing array {e} (expected x_train, y_train, x_test, y_test)") from None
    except Exception as e:  # zipfile/pickle/OS errors all mean "not a readable npz"
        raise SplitError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.shape[0] == 0:
            raise SplitError(f"{path}: x_{part} has shape {x.shape}, expected (n, 28, 28)")
        if y.shape != (x.shape[0],):
            raise SplitError(f"{path}: y_{part} has shape {y.shape}, expected ({x.shape[0]},)")
        if not (np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
            raise SplitError(f"{path}: x_{part}/y_{part} must be integer arrays")
        if x.min() < 0 or x.max() > 255:
            raise SplitError(f"{path}: x_{part} values outside 0-255")
        if y.min() < 0 or y.max() > 9:
            raise SplitError(f"{path}: y_{part} labels outside 0-9")
    return tuple(arrays[k].astype(np.uint8) for k in ("x_train", "y_train", "x_test", "y_test"))


# --- split ---------------------------------------------------------------------------------

def shard_indices(labels, n, strategy="iid", seed=0):
    """Return n index arrays partitioning range(len(labels)); sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if strategy == "label-skew":
        # Sort the shuffled indices by label, cut into n * LABEL_SKEW_DIGITS equal runs,
        # then deal the runs out at random: each shard gets a few mostly single-digit runs.
        order = order[np.argsort(labels[order], kind="stable")]
        runs = np.array_split(order, n * LABEL_SKEW_DIGITS)
        pick = rng.permutation(len(runs))
        order = np.concatenate([runs[i] for i in pick])
        # array_split of equal runs keeps sizes balanced; consecutive runs form one shard.
    return np.array_split(order, n)


def save_npz_atomic(path, **arrays):
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        np.savez(f, **arrays)


def remove_stale_shards(savedir, n):
    for p in Path(savedir).iterdir():
        if SHARD_NAME.match(p.name) and int(p.stem) >= n and p.is_file():
            p.unlink()
            print(f"{PROG}: removed stale shard {p}", flush=True)


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # usage error (exit 2, one line) or --help (exit 0)
        return args
    try:
        n = args.n_container
        if n < 1 or n > MAX_SHARDS:
            raise SplitError(f"--n_container must be between 1 and {MAX_SHARDS}, got {n}")
        if args.run_id is not None and (problem := run_id_problem(args.run_id)):
            raise SplitError(problem)
        savedir = Path(args.savedir)
        if savedir.exists() and not savedir.is_dir():
            raise SplitError(f"--savedir {savedir} exists and is not a directory")
        if not 0 <= args.wait_data <= 86400:
            raise SplitError(f"--wait-data must be 0-86400 seconds, got {args.wait_data:g}")
        if args.wait_data and not args.dataset:
            raise SplitError("--wait-data waits for --dataset: give it")
        dataset = args.dataset or os.environ.get("MNIST_NPZ")
        wait_for_dataset(dataset, args.wait_data)
        if not dataset:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlk-mnist"
            dataset = download_mnist(cache)
        x_train, y_train, x_test, y_test = load_mnist(dataset)
        if n > len(x_train):
            raise SplitError(f"--n_container {n} exceeds the {len(x_train)} training samples")
        try:  # the volume may come unprepared (the rwx backend): make the folder, parents too
            savedir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent is a file, permissions, read-only volume
            raise SplitError(f"cannot create --savedir {savedir}: {e}") from None
    except SplitError as e:
        return error(PROG, e, e.exit_code)

    shards = shard_indices(y_train, n, args.strategy, args.shuffle_seed)
    marker = savedir / RUN_MARKER
    try:
        marker.unlink(missing_ok=True)  # the shards about to change are no earlier run's any more
        for i, idx in enumerate(shards):
            save_npz_atomic(savedir / f"{i}.npz", x=x_train[idx], y=y_train[idx])
            counts = np.bincount(y_train[idx], minlength=10)
            print(f"{PROG}: shard {i + 1}/{n} {savedir / f'{i}.npz'}: {len(idx)} samples, "
                  f"digits {' '.join(map(str, counts))}", flush=True)
        save_npz_atomic(savedir / "test.npz", x=x_test, y=y_test)
        print(f"{PROG}: test set {savedir / 'test.npz'}: {len(x_test)} samples", flush=True)
        remove_stale_shards(savedir, n)
        if args.run_id is not None:
            write_bytes_atomic(marker, f"{args.run_id}\n".encode())
            print(f"{PROG}: run {args.run_id}: {marker}", flush=True)
    except OSError as e:  # disk full, read-only volume, permissions
        return error(PROG, f"cannot write to {savedir}: {e}")
    print(f"{PROG}: done: {len(x_train)} training samples in {n} shards ({args.strategy}, "
          f"seed {args.shuffle_seed})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
