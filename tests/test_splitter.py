"""splitter/splitter.py on small synthetic mnist.npz files: partition, test set, determinism,
label skew, MNIST_NPZ, stale shards, every refusal, and the checked download via the patchable fetch."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import splitter  # noqa: E402
from mlkcommon import read_run_id  # noqa: E402  (the copy beside splitter.py: its conftest path)

N_TRAIN, N_TEST = 200, 30


def make_mnist(path, n_train=N_TRAIN, n_test=N_TEST, seed=0, **overrides):
    """A Keras-layout mnist.npz of random (hence distinct) images, labels cycling through 0-9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture
def mnist(tmp_path):
    return make_mnist(tmp_path / "mnist.npz")


@pytest.fixture(autouse=True)
def no_env_dataset(monkeypatch, tmp_path):
    """Tests start without MNIST_NPZ and with a private download cache; no test may hit the network."""
    monkeypatch.delenv("MNIST_NPZ", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url, dest):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(splitter, "fetch", no_network)


def split(savedir, n, *extra, dataset=None):
    argv = ["--n_container", str(n), "--savedir", str(savedir), *map(str, extra)]
    if dataset is not None:
        argv += ["--dataset", str(dataset)]
    return splitter.main(argv)


def load(path):
    with np.load(path, allow_pickle=False) as d:
        assert sorted(d.files) == ["x", "y"]
        return d["x"], d["y"]


def row_hashes(x, y):
    return sorted(hashlib.sha256(xi.tobytes() + bytes([int(yi)])).hexdigest() for xi, yi in zip(x, y))


def shards_of(savedir, n):
    return [load(Path(savedir) / f"{i}.npz") for i in range(n)]


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# --- the partition --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 7, N_TRAIN])
@pytest.mark.parametrize("strategy", ["iid", "label-skew"])
def test_exactly_n_balanced_shards_holding_every_sample_once(tmp_path, mnist, n, strategy):
    out = tmp_path / "data"
    assert split(out, n, "--strategy", strategy, dataset=mnist) == 0
    assert listing(out) == sorted([f"{i}.npz" for i in range(n)] + ["test.npz"])  # no temp leftovers
    shards = shards_of(out, n)
    sizes = [len(x) for x, _ in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == N_TRAIN
    for x, y in shards:
        assert x.dtype == np.uint8 and x.shape[1:] == (28, 28)
        assert y.dtype == np.uint8 and y.shape == (len(x),)
    with np.load(mnist) as d:
        expected = row_hashes(d["x_train"], d["y_train"])
    got = row_hashes(np.concatenate([x for x, _ in shards]), np.concatenate([y for _, y in shards]))
    assert got == expected  # same multiset of (image, label) pairs: each sample exactly once


def test_writes_the_test_set_unchanged(tmp_path, mnist):
    assert split(tmp_path / "data", 2, dataset=mnist) == 0
    x, y = load(tmp_path / "data" / "test.npz")
    with np.load(mnist) as d:
        assert np.array_equal(x, d["x_test"]) and np.array_equal(y, d["y_test"])
    assert x.dtype == np.uint8 and y.dtype == np.uint8


def test_iid_shards_are_shuffled_not_cut_in_file_order(tmp_path, mnist):
    assert split(tmp_path / "data", 2, dataset=mnist) == 0
    x0, _ = load(tmp_path / "data" / "0.npz")
    with np.load(mnist) as d:
        assert not np.array_equal(x0, d["x_train"][: len(x0)])


def test_accepts_other_integer_dtypes_and_writes_uint8(tmp_path):
    rng = np.random.default_rng(3)
    src = make_mnist(tmp_path / "m.npz", x_train=rng.integers(0, 256, (N_TRAIN, 28, 28)).astype(np.int64),
                     y_train=(np.arange(N_TRAIN) % 10).astype(np.int32))
    assert split(tmp_path / "data", 2, dataset=src) == 0
    x, y = load(tmp_path / "data" / "0.npz")
    assert x.dtype == np.uint8 and y.dtype == np.uint8


# --- determinism and strategies -------------------------------------------------------------

def test_same_seed_same_shards_other_seed_other_shards(tmp_path, mnist):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert split(tmp_path / name, 3, "--shuffle-seed", seed, dataset=mnist) == 0
    a, b, c = (shards_of(tmp_path / name, 3) for name in "abc")
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_default_seed_is_deterministic(tmp_path, mnist):
    assert split(tmp_path / "a", 3, dataset=mnist) == 0
    assert split(tmp_path / "b", 3, dataset=mnist) == 0
    for (xa, _), (xb, _) in zip(shards_of(tmp_path / "a", 3), shards_of(tmp_path / "b", 3)):
        assert np.array_equal(xa, xb)


def top_two_share(y):
    counts = np.sort(np.bincount(y, minlength=10))[::-1]
    return counts[:2].sum() / counts.sum()


def test_label_skew_shards_are_dominated_by_a_few_digits(tmp_path):
    src = make_mnist(tmp_path / "m.npz", n_train=1000)
    assert split(tmp_path / "iid", 5, dataset=src) == 0
    assert split(tmp_path / "skew", 5, "--strategy", "label-skew", dataset=src) == 0
    iid = [top_two_share(y) for _, y in shards_of(tmp_path / "iid", 5)]
    skew = [top_two_share(y) for _, y in shards_of(tmp_path / "skew", 5)]
    assert max(iid) < 0.4  # balanced labels: two digits hold about 20% of an iid shard
    assert min(skew) >= 0.9  # label-skew: two digits hold (nearly) all of each shard
    # ... and different shards are dominated by different digits.
    dominant = {tuple(sorted(np.argsort(np.bincount(y, minlength=10))[-2:])) for _, y in
                shards_of(tmp_path / "skew", 5)}
    assert len(dominant) >= 3


# --- where the dataset comes from -----------------------------------------------------------

def test_mnist_npz_env_var_is_the_dataset(tmp_path, mnist, monkeypatch):
    monkeypatch.setenv("MNIST_NPZ", str(mnist))
    assert split(tmp_path / "data", 2) == 0
    assert sum(len(x) for x, _ in shards_of(tmp_path / "data", 2)) == N_TRAIN


def test_dataset_flag_wins_over_env_var(tmp_path, mnist, monkeypatch):
    monkeypatch.setenv("MNIST_NPZ", str(tmp_path / "absent.npz"))
    assert split(tmp_path / "data", 2, dataset=mnist) == 0


# --- re-running -----------------------------------------------------------------------------

def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path, mnist, capsys):
    out = tmp_path / "data"
    assert split(out, 5, dataset=mnist) == 0
    (out / "notes.txt").write_text("not a shard")
    assert split(out, 2, dataset=mnist) == 0
    assert listing(out) == ["0.npz", "1.npz", "notes.txt", "test.npz"]
    assert sum(len(x) for x, _ in shards_of(out, 2)) == N_TRAIN
    assert "removed stale shard" in capsys.readouterr().out


def test_run_id_marker_is_written_after_every_shard(tmp_path, mnist, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "run-id").write_text("earlier-run\n")
    seen = []  # the marker as each shard is written: gone from the first shard on, the new id only at the end
    real_save = splitter.save_npz_atomic

    def save(path, **arrays):
        seen.append((Path(path).name, (out / "run-id").exists()))
        real_save(path, **arrays)

    monkeypatch.setattr(splitter, "save_npz_atomic", save)
    assert split(out, 3, "--run-id", "run-20261205.a_1", dataset=mnist) == 0
    assert seen == [("0.npz", False), ("1.npz", False), ("2.npz", False), ("test.npz", False)]
    assert (out / "run-id").read_text() == "run-20261205.a_1\n"
    assert read_run_id(out) == "run-20261205.a_1"


def test_split_without_run_id_removes_an_earlier_marker(tmp_path, mnist):
    out = tmp_path / "data"
    assert split(out, 2, "--run-id", "first", dataset=mnist) == 0
    assert split(out, 2, dataset=mnist) == 0  # these shards are not run "first"'s any more
    assert "run-id" not in listing(out)
    assert read_run_id(out) is None


def test_wait_data_splits_a_dataset_that_appears_later(tmp_path, mnist, monkeypatch, capsys):
    """Applied beside the quickstart's upload: the splitter waits for the uploaded file, then splits it."""
    out, later = tmp_path / "data", tmp_path / "uploads" / "run-1.npz"
    later.parent.mkdir()
    looks = []
    real_exists = splitter.os.path.exists

    def exists(path):  # the upload renames the whole file into place on the splitter's third look
        if str(path) == str(later):
            looks.append(1)
            if len(looks) == 3:
                shutil.copy(mnist, later)
        return real_exists(path)

    monkeypatch.setattr(splitter.os.path, "exists", exists)
    assert split(out, 2, "--wait-data", "60", dataset=later) == 0
    assert len(looks) >= 3 and sum(len(x) for x, _ in shards_of(out, 2)) == N_TRAIN
    printed = capsys.readouterr().out
    assert f"splitter: waiting up to 60s for {later} (an upload)" in printed and f"{later} is there after" in printed


def test_wait_data_gives_up_in_one_line_and_needs_a_dataset(tmp_path, mnist, capsys):
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, "--dataset", tmp_path / "never.npz",
                  "--wait-data", "0.6")
    assert "still absent after waiting 0.6s (--wait-data)" in line
    assert "--wait-data waits for --dataset" in refuse(capsys, out, "--n_container", 2, "--savedir", out,
                                                       "--wait-data", "5")
    assert "--wait-data must be 0-86400 seconds" in refuse(capsys, out, "--n_container", 2, "--savedir", out,
                                                           "--dataset", mnist, "--wait-data", "-1")


# --- refusals: exit 2, one line naming the program, nothing written ----------------------------

def refuse(capsys, savedir, *argv, code=2):
    """Run main(argv); assert exit `code` (2: bad input; 1: a failed download, which a retry may fix),
    a single stderr line from the splitter, and no savedir."""
    capsys.readouterr()
    assert splitter.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splitter"), err
    assert not Path(savedir).exists()
    return lines[0]


@pytest.mark.parametrize("n, words", [(0, "--n_container"), (-1, "--n_container"),
                                      (N_TRAIN + 1, "exceeds"), (60001, "--n_container")])
def test_refuses_bad_shard_count(tmp_path, mnist, capsys, n, words):
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", n, "--savedir", out, "--dataset", mnist)
    assert words in line


def test_refuses_non_integer_shard_count_in_one_line(tmp_path, mnist, capsys):
    out = tmp_path / "data"
    assert "invalid int" in refuse(capsys, out, "--n_container", "three", "--savedir", out, "--dataset", mnist)


def bad_dataset(tmp_path, kind):
    path = tmp_path / "bad.npz"
    rng = np.random.default_rng(1)
    if kind == "missing file":
        return tmp_path / "absent.npz"
    if kind == "not an npz":
        path.write_text("x_train,y_train\n1,2\n")
    elif kind == "plain npy":
        np.save(tmp_path / "bad.npy", np.zeros((3, 28, 28), np.uint8))
        return tmp_path / "bad.npy"
    elif kind == "truncated npz":
        make_mnist(path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "missing key":
        make_mnist(path, y_test=None)
    elif kind == "wrong keys":
        np.savez(path, x=np.zeros((10, 28, 28), np.uint8), y=np.zeros(10, np.uint8))
    elif kind == "wrong image shape":
        make_mnist(path, x_train=rng.integers(0, 256, (N_TRAIN, 28, 27), dtype=np.uint8))
    elif kind == "flat images":
        make_mnist(path, x_test=rng.integers(0, 256, (N_TEST, 784), dtype=np.uint8))
    elif kind == "label count mismatch":
        make_mnist(path, y_train=np.zeros(N_TRAIN - 1, np.uint8))
    elif kind == "labels outside 0-9":
        make_mnist(path, y_train=np.full(N_TRAIN, 10, np.uint8))
    elif kind == "float images":
        make_mnist(path, x_train=rng.random((N_TRAIN, 28, 28)).astype(np.float32))
    elif kind == "pixel values outside 0-255":
        make_mnist(path, x_test=np.full((N_TEST, 28, 28), 256, np.int32))
    elif kind == "empty training set":
        make_mnist(path, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8))
    elif kind == "object arrays":
        np.savez(path, x_train=np.array([object()] * 3), y_train=np.zeros(3, np.uint8),
                 x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    return path


BAD = ["missing file", "not an npz", "plain npy", "truncated npz", "missing key", "wrong keys",
       "wrong image shape", "flat images", "label count mismatch", "labels outside 0-9", "float images",
       "pixel values outside 0-255", "empty training set", "object arrays"]


@pytest.mark.parametrize("kind", BAD)
def test_refuses_bad_dataset(tmp_path, capsys, kind):
    src = bad_dataset(tmp_path, kind)
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, "--dataset", src)
    assert str(src) in line


@pytest.mark.parametrize("kind", ["not an npz", "wrong image shape"])
def test_refusal_leaves_an_existing_savedir_untouched(tmp_path, mnist, capsys, kind):
    out = tmp_path / "data"
    assert split(out, 3, dataset=mnist) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert split(out, 2, dataset=bad_dataset(tmp_path, kind)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("run_id", ["", ".x", "a/b", "a b", "x" * 65, "ü"])
def test_refuses_bad_run_id(tmp_path, mnist, capsys, run_id):
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, "--dataset", mnist, "--run-id", run_id)
    assert "--run-id must be 1-64 letters" in line


def test_refuses_savedir_that_is_a_file(tmp_path, mnist, capsys):
    out = tmp_path / "data"
    out.write_text("occupied")
    assert split(out, 2, dataset=mnist) == 2
    assert "not a directory" in capsys.readouterr().err
    assert out.read_text() == "occupied"


def test_creates_missing_parents_of_savedir(tmp_path, mnist):
    # On the rwx storage backend nothing prepares the volume: /mnt/data does not exist yet.
    out = tmp_path / "fresh-volume" / "data"
    assert split(out, 2, dataset=mnist) == 0
    assert listing(out) == ["0.npz", "1.npz", "test.npz"]


def test_refuses_savedir_it_cannot_create_in_one_line(tmp_path, mnist, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, "--dataset", mnist)
    assert "cannot create --savedir" in line and str(out) in line


# --- the download path (no --dataset, no MNIST_NPZ) ------------------------------------------

def fake_fetch_copying(source, calls):
    def fetch(url, dest):
        calls.append(url)
        shutil.copyfile(source, dest)

    return fetch


def test_downloads_checks_sha256_and_reuses_the_cache(tmp_path, mnist, monkeypatch):
    calls = []
    monkeypatch.setattr(splitter, "fetch", fake_fetch_copying(mnist, calls))
    monkeypatch.setattr(splitter, "MNIST_SHA256", splitter.sha256_of(mnist))
    assert split(tmp_path / "data", 2) == 0
    assert calls == [splitter.MNIST_URL]
    cached = tmp_path / "cache" / "mlk-mnist" / "mnist.npz"
    assert cached.read_bytes() == mnist.read_bytes()
    assert sum(len(x) for x, _ in shards_of(tmp_path / "data", 2)) == N_TRAIN
    assert split(tmp_path / "again", 2) == 0
    assert calls == [splitter.MNIST_URL]  # second run used the verified cached copy


def test_refuses_download_with_wrong_sha256(tmp_path, mnist, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(splitter, "fetch", fake_fetch_copying(mnist, calls))
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, code=1)  # a damaged download: retryable
    assert calls and "sha256" in line and splitter.MNIST_SHA256 in line
    assert listing(tmp_path / "cache" / "mlk-mnist") == []  # the bad download is not kept


def test_download_failure_points_at_mnist_npz(tmp_path, monkeypatch, capsys):
    import urllib.error

    def offline(url, dest):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(splitter, "fetch", offline)
    out = tmp_path / "data"
    line = refuse(capsys, out, "--n_container", 2, "--savedir", out, code=1)  # the network may come back
    assert "MNIST_NPZ" in line and "no route to host" in line
    assert listing(tmp_path / "cache" / "mlk-mnist") == []


def test_stale_cached_download_is_replaced(tmp_path, mnist, monkeypatch):
    cache = tmp_path / "cache" / "mlk-mnist"
    cache.mkdir(parents=True)
    (cache / "mnist.npz").write_bytes(b"half a download")
    calls = []
    monkeypatch.setattr(splitter, "fetch", fake_fetch_copying(mnist, calls))
    monkeypatch.setattr(splitter, "MNIST_SHA256", splitter.sha256_of(mnist))
    assert split(tmp_path / "data", 2) == 0
    assert len(calls) == 1 and (cache / "mnist.npz").read_bytes() == mnist.read_bytes()
