#!/usr/bin/env python3
"""Write the sample images of the demo page from MNIST test digits (true digit in each file name).

    .venv/bin/python scripts/make-samples.py --out server/static/samples [--dataset mnist.npz] [--seed 7]

Without --dataset: $MNIST_NPZ, else ../shared/datasets/mnist.npz, else the splitter's cached download.

MNIST-style: 4.png, 6.png (white digit on black, 28x28, like the original's samples).
Photo-like: photo-<digit>.jpg (dark ink on uneven light paper, off-centre, scaled up, noisy JPEG).
They live in one folder, server/static/samples/, because the page links them and the server image's build
context is server/ only; the top-level samples/ is a relative symlink to it (`--out samples` writes there
too). `photo_like()` is also used by benchmarks/benchmark-server.py.

STYLES holds the upload styles the benchmarks and tests make from MNIST digits, each
`style(digit uint8 (28, 28), numpy Generator) -> encoded image bytes`:
  photo   photo_like: dark ink on uneven light paper, off-centre, noisy JPEG
  canvas  canvas_like: what the page's drawing pad posts: a 280x280 PNG, black strokes of the pen's width
          (22 px) on a fully transparent background (the ink is in the alpha channel only)
  thick   thick_like: a small canvas (48-112 px), strokes 20-30% of the digit's height, either polarity
  pencil  pencil_like: thin grainy grey pencil lines on light paper, low contrast, JPEG
The stroke styles redraw the digit's skeleton with a round pen, as a user drawing it would.

The command line (argparse through mlkcommon's Parser: a usage error is one line, exit 2) and the
atomic writes come from common/mlkcommon.py, imported from there (this script is in no image).
"""

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "common"))
from mlkcommon import Parser, error, int_at_least, parse_args, write_bytes_atomic  # noqa: E402

PROG = "make-samples.py"
MNIST_STYLE = (4, 6)
PHOTO_DIGITS = (2, 3, 7)


def build_parser():
    parser = Parser(prog=PROG, description="Write MNIST-style and photo-like sample digits.")
    parser.add_argument("--out", required=True,
                        help="output folder (the repository's: server/static/samples, which samples/ links to)")
    parser.add_argument("--dataset", help="mnist.npz with x_test, y_test (default: $MNIST_NPZ, else "
                        "../shared/datasets/mnist.npz, else the splitter's cached download)")
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


# --- strokes: the digit's skeleton, redrawn with a pen of a chosen width --------------------------

CANVAS_SIDE = 280  # server/templates/index.html: <canvas id="pad" width="280" height="280">
CANVAS_LINE_WIDTH = 22  # ... ctx.lineWidth = 22, round caps and joins, black strokes, transparent ground
SUPERSAMPLE = 4  # strokes are drawn at 4x and averaged down: anti-aliased edges, as a browser draws them


def skeleton(digit):
    """uint8 (28, 28) MNIST digit -> (rows, cols) float arrays of its one-pixel-wide centre line, in
    28x28 coordinates (Zhang-Suen thinning of the digit scaled up 4x and thresholded at half ink)."""
    scale = 4
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    img = np.pad((big >= 128).astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p2, p3, p4, p5 = img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:], img[2:, 2:]
            p6, p7, p8, p9 = img[2:, 1:-1], img[2:, :-2], img[1:-1, :-2], img[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            neighbours = sum(a.astype(np.int32) for a in ring[:8])
            transitions = sum(((a == 0) & (b == 1)).astype(np.int32) for a, b in zip(ring, ring[1:]))
            if step == 0:
                side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (img[1:-1, 1:-1] == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & side
            if remove.any():
                img[1:-1, 1:-1][remove] = 0
                changed = True
        if not changed:
            break
    rows, cols = np.nonzero(img[1:-1, 1:-1])
    return (rows + 0.5) / scale - 0.5, (cols + 0.5) / scale - 0.5


def draw_strokes(digit, size, height, top_left, width):
    """Coverage in [0, 1], float32 array of `size` (w, h): the digit's skeleton scaled so that its centre
    line is `height` px tall, its bounding box's top-left at `top_left` (x, y), drawn with a round pen
    `width` px wide (anti-aliased)."""
    rows, cols = skeleton(digit)
    if rows.size == 0:
        raise ValueError("digit has no strokes")
    scale = height / max(float(rows.max() - rows.min()), 1.0)
    xs = (cols - cols.min()) * scale + top_left[0]
    ys = (rows - rows.min()) * scale + top_left[1]
    s = SUPERSAMPLE
    canvas = Image.new("L", (size[0] * s, size[1] * s), 0)
    draw = ImageDraw.Draw(canvas)
    r = width * s / 2
    for x, y in zip(xs * s + s / 2, ys * s + s / 2):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    small = canvas.resize(size, Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def stroke_extent(digit, height):
    """(w, h) of the skeleton when scaled to `height` px tall (where to place it so that it fits)."""
    rows, cols = skeleton(digit)
    scale = height / max(float(rows.max() - rows.min()), 1.0)
    return float(cols.max() - cols.min()) * scale, float(rows.max() - rows.min()) * scale


def _place(rng, side, extent, pen):
    """A random top-left for a drawing of `extent` (w, h) and pen width `pen` inside a side x side canvas."""
    margin = pen / 2 + 2
    free_x, free_y = side - extent[0] - 2 * margin, side - extent[1] - 2 * margin
    return margin + rng.uniform(0, max(free_x, 0)), margin + rng.uniform(0, max(free_y, 0))


def encode_png(array, mode):
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue()


def canvas_like(digit, rng):
    """uint8 (28, 28) MNIST digit -> PNG bytes as the page's drawing pad posts it: 280x280 RGBA, black
    strokes 22 px wide at any size and place the user chose, the background fully transparent (0, 0, 0, 0)."""
    side, pen = CANVAS_SIDE, CANVAS_LINE_WIDTH
    height = rng.uniform(0.4, 0.8) * side
    extent = stroke_extent(digit, height)
    if extent[0] + pen + 4 > side:  # a wide digit: shrink it until it fits
        height *= (side - pen - 5) / (extent[0] + 1)
        extent = stroke_extent(digit, height)
    cover = draw_strokes(digit, (side, side), height, _place(rng, side, extent, pen), pen)
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 3] = np.uint8(np.round(cover * 255))
    return encode_png(rgba, "RGBA")


def thick_like(digit, rng):
    """uint8 (28, 28) MNIST digit -> PNG bytes of a small opaque canvas (48-112 px square) with the digit
    drawn in strokes 20-30% of its height wide (MNIST's are about 10-15%); black on white or white on black."""
    side = int(rng.integers(48, 113))
    height = rng.uniform(0.5, 0.65) * side
    pen = rng.uniform(0.2, 0.3) * height
    extent = stroke_extent(digit, height)
    if extent[0] + pen + 4 > side:
        height *= (side - pen - 5) / (extent[0] + 1)
        extent = stroke_extent(digit, height)
    cover = draw_strokes(digit, (side, side), height, _place(rng, side, extent, pen), pen)
    grey = cover if rng.random() < 0.5 else 1.0 - cover
    return encode_png(np.uint8(np.round(grey * 255)), "L")


def pencil_like(digit, rng):
    """uint8 (28, 28) MNIST digit -> JPEG bytes of a pencil drawing on paper: thin grey strokes (5-8% of the
    digit's height) whose grain leaves gaps, only 25-55 grey levels darker than the paper at their darkest
    (low contrast), uneven light, sensor noise."""
    width, height = int(rng.integers(200, 360)), int(rng.integers(200, 360))
    tall = rng.uniform(0.45, 0.75) * min(width, height)
    pen = max(2.0, rng.uniform(0.05, 0.08) * tall)
    extent = stroke_extent(digit, tall)
    if extent[0] + pen + 4 > width:
        tall *= (width - pen - 5) / (extent[0] + 1)
        extent = stroke_extent(digit, tall)
    cover = draw_strokes(digit, (width, height), tall, _place(rng, min(width, height), extent, pen), pen)
    grain = rng.uniform(0.0, 1.0, (height // 2 + 1, width // 2 + 1)).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain, "F").resize((width, height), Image.Resampling.BILINEAR))
    cover = cover * (0.45 + 0.55 * grain)
    paper = rng.uniform(200, 235)
    depth = rng.uniform(25, 55)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.03, 0.08) * ((np.cos(angle) * xx / width + np.sin(angle) * yy / height) - 0.5)
    grey = paper * light - depth * cover + rng.normal(0, 3, cover.shape)
    rgb = np.stack([grey, grey - rng.uniform(0, 4), grey - rng.uniform(2, 10)], axis=-1)  # warm paper
    out = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(rgb, 0, 255))).save(out, "JPEG", quality=int(rng.integers(75, 92)))
    return out.getvalue()


STYLES = {"photo": photo_like, "canvas": canvas_like, "thick": thick_like, "pencil": pencil_like}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
