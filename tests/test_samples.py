"""The page's sample digits are kept once: server/static/samples/ (inside the server image's build context,
server/), with the top-level samples/ a relative symlink to it; scripts/make-samples.py writes one folder."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "server" / "static" / "samples"
NAMES = ["4.png", "6.png", "photo-2.jpg", "photo-3.jpg", "photo-7.jpg"]


def test_samples_is_a_relative_link_to_the_one_folder_in_the_server_context():
    link = ROOT / "samples"
    assert link.is_symlink(), "samples/ should be a symlink to server/static/samples, not a second copy"
    assert os.readlink(link) == "server/static/samples"  # relative: valid in any checkout
    assert link.resolve() == STATIC.resolve()
    assert not STATIC.is_symlink() and sorted(p.name for p in STATIC.iterdir()) == NAMES
    assert all(not p.is_symlink() and p.stat().st_size > 0 for p in STATIC.iterdir())


def test_git_stores_the_link_and_the_files_once():
    listed = subprocess.run(["git", "ls-files", "-s", "samples", "server/static/samples"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    entries = {line.split("\t")[1]: line.split()[0] for line in listed}
    assert entries == {"samples": "120000", **{f"server/static/samples/{n}": "100644" for n in NAMES}}, entries


def test_make_samples_writes_one_folder(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 3)
    np.savez(tmp_path / "mnist.npz", x_test=rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8), y_test=y)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/make-samples.py"), "--out", str(out),
                           "--dataset", str(tmp_path / "mnist.npz")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz", "out"]  # nothing copied elsewhere
    assert "copied" not in done.stdout and "--static" not in subprocess.run(
        [sys.executable, str(ROOT / "scripts/make-samples.py"), "--help"], capture_output=True, text=True).stdout
