#!/usr/bin/env python3
"""Write the sample images of the demo page from MNIST test digits (true digit in each file name).

    .venv/bin/python scripts/make-samples.py --out samples [--dataset mnist.npz] [--seed 7]

Without --dataset: $MNIST_NPZ, else ../shared/datasets/mnist.npz, else the splitter's cached download.

MNIST-style: 4.png, 6.png (white digit on black, 28x28, like the original's samples).
Photo-like: photo-<digit>.jpg (dark ink on uneven light paper, off-centre, scaled up, noisy JPEG).
The same files are copied to server/static/samples/ so the page (whose image holds server/ only)
can link them. `photo_like()` is also used by benchmarks/benchmark-server.py.

The command line (argparse through mlkcommon's Parser: a usage error is one line, exit 2) and the
atomic writes come from common/mlkcommon.py, imported from there (this script is in no image).
"""

import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "common"))
from mlkcommon import Parser, error, int_at_least, parse_args, write_bytes_atomic  # noqa: E402

PROG = "make-samples.py"
MNIST_STYLE = (4, 6)
PHOTO_DIGITS = (2, 3, 7)


def build_parser():
    parser = Parser(prog=PROG, description="Write MNIST-style and photo-like sample digits.")
    parser.add_argument("--out", required=True, help="output folder (the repository's: samples)")
    parser.add_argument("--dataset", help="mnist.npz with x_test, y_test (default: $MNIST_NPZ, else "
                        "../shared/datasets/mnist.npz, else the splitter's cached download)")
    parser.add_argument("--static", default=str(ROOT / "server/static/samples"),
                        help="copy the samples here too ('' to skip; default server/static/samples)")
    parser.add_argument("--seed", type=int_at_least(0), default=7, help="seed of the photo-like noise (default 7)")
    return parser


def mnist_path():
    """Where MNIST comes from when --dataset is not given, as for the tests (tests/helpers.py's
    mnist_path()): $MNIST_NPZ, else ../shared/datasets/mnist.npz beside the repository, else the
    splitter's checksum-verified download into the user cache. Exits 2 with one line if none works."""
    spec = importlib.util.spec_from_file_location("mlk_test_helpers", ROOT / "tests/helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    try:
        return str(helpers.mnist_path())
    except helpers.MnistUnavailable as e:
        sys.exit(error(PROG, e))


def photo_like(digit, rng):
    """uint8 (28, 28) MNIST digit -> JPEG bytes of it as dark ink on light paper, off-centre."""
    width, height = int(rng.integers(240, 400)), int(rng.integers(200, 320))
    side = int(rng.integers(110, min(width, height) - 10))
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    ink = np.clip(np.asarray(ink, np.float32) / 255.0, 0, 1)
    mask = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    mask[top:top + side, left:left + side] = ink
    paper = np.array([rng.uniform(195, 245), rng.uniform(190, 240), rng.uniform(175, 235)], np.float32)
    pen = np.array([rng.uniform(10, 70), rng.uniform(10, 70), rng.uniform(20, 110)], np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.04, 0.12) * ((np.cos(angle) * xx / width + np.sin(angle) * yy / height) - 0.5)
    rgb = (paper * light[..., None]) * (1 - mask[..., None]) + pen * mask[..., None]
    rgb += rng.normal(0, 5, rgb.shape)
    out = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(rgb, 0, 255))).save(out, "JPEG", quality=int(rng.integers(70, 90)))
    return out.getvalue()


class SampleError(Exception):
    """Bad input: one line on stderr, exit code 2."""


def load_test(dataset):
    try:
        with np.load(dataset, allow_pickle=False) as npz:
            return npz["x_test"], npz["y_test"]
    except (OSError, KeyError, ValueError) as err:
        raise SampleError(f"cannot read {dataset}: {err}") from None


def first_index(y, digit, skip=0):
    return int(np.flatnonzero(y == digit)[skip])


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # usage error (exit 2, one line) or --help (exit 0)
        return args
    dataset = args.dataset or mnist_path()
    try:
        x, y = load_test(dataset)
    except SampleError as err:
        return error(PROG, err)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    written = []
    for digit in MNIST_STYLE:
        buffer = io.BytesIO()
        Image.fromarray(x[first_index(y, digit)]).save(buffer, "PNG")
        written.append((out / f"{digit}.png", buffer.getvalue()))
    for digit in PHOTO_DIGITS:
        written.append((out / f"photo-{digit}.jpg", photo_like(x[first_index(y, digit, 1)], rng)))
    for path, data in written:
        write_bytes_atomic(path, data)
        print(f"wrote {path} ({len(data)} bytes)")
    if args.static:
        static = Path(args.static)
        static.mkdir(parents=True, exist_ok=True)
        for path, _ in written:
            shutil.copyfile(path, static / path.name)
        print(f"copied to {static}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
