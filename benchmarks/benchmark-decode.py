#!/usr/bin/env python3
"""What decoding an upload costs: CPU time and peak memory of server/preprocess.py's preprocess_views() on
small and hostile images, each in a fresh process.

    .venv/bin/python benchmarks/benchmark-decode.py [--old REV] [--repeat 3] [--cases png-40mp,jpeg-12mp] [--no-budget]

Cases (generated in memory, digits drawn on them): a 28x28 PNG digit (MNIST-like), a 400x400 drawing, a 1 MP
and a 40 MP RGBA PNG (the page's canvas style: black strokes on transparency), a 12 MP JPEG photo (baseline and
progressive), and one request of 11 of the 40 MP PNGs (what fits in a 2 MB body), decoded in turn with one
PixelBudget (none with --no-budget, or for code without one), stopping at the first refused image as the
server does.
Per case, each in its own child process: bytes, CPU seconds (median of --repeat runs; one run when the first
took over 2 s), the Python/NumPy peak (tracemalloc: NumPy's arrays, not Pillow's image memory), the growth of
the process' peak RSS (VmHWM: everything, Pillow's image memory too) and the outcome (views, or status and reason).
--old REV also runs `git show REV:server/preprocess.py` and prints its figures beside the current file's.
Prints figures only (no targets: the machine is shared); exit 2 on bad input.
"""

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from mlkcommon import Parser, error, int_at_least, parse_args

ROOT = _repo.ROOT
PROG = "benchmark-decode.py"
MODULE = ROOT / "server" / "preprocess.py"
REQUEST_FILES = 11  # 40 MP PNGs of about 180 kB: as many as one 2 MB body holds


def draw_digit(draw, side, width, ink, left=0.25, top=0.15):
    """A '4' of strokes `width` px wide in a side x side square."""
    s = side
    points = [(left * s + 0.35 * s, top * s), (left * s, top * s + 0.45 * s), (left * s + 0.5 * s, top * s + 0.45 * s)]
    draw.line(points, fill=ink, width=width, joint="curve")
    draw.line([(left * s + 0.4 * s, top * s + 0.2 * s), (left * s + 0.4 * s, top * s + 0.7 * s)], fill=ink, width=width)


def png(image, **kwargs):
    out = io.BytesIO()
    image.save(out, "PNG", **kwargs)
    return out.getvalue()


def canvas_png(side):
    """The page's canvas style at any size: black strokes (1/12 of the side) on full transparency."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw_digit(ImageDraw.Draw(image), side, max(1, side // 12), (0, 0, 0, 255))
    return png(image, compress_level=9)


def mnist_like():
    image = Image.new("L", (28, 28), 0)
    draw_digit(ImageDraw.Draw(image), 28, 3, 255, left=0.2, top=0.15)
    return png(image)


def drawing_400():
    image = Image.new("L", (400, 400), 255)
    draw_digit(ImageDraw.Draw(image), 400, 24, 0)
    return png(image)


def photo_jpeg(progressive):
    """4000x3000 (12 MP): paper under uneven light with sensor noise, a dark pen digit, JPEG quality 85 (under 2 MB)."""
    width, height = 4000, 3000
    rng = np.random.default_rng(0)
    light = (np.linspace(215, 185, width, dtype=np.float32)[None, :]
             + np.linspace(-10, 10, height, dtype=np.float32)[:, None])
    ink = Image.new("L", (width, height), 0)
    draw_digit(ImageDraw.Draw(ink), height, 60, 150, left=0.4, top=0.15)
    grey = light - np.asarray(ink, np.float32) + rng.normal(0, 3, (height, width)).astype(np.float32)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.stack([grey, grey, (grey * 0.95).astype(np.uint8)], axis=-1), "RGB")
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85, progressive=progressive)
    return out.getvalue()


CASES = {  # name: (description, bytes of each file of the request)
    "png-28": ("28x28 PNG digit (MNIST-like)", lambda: [mnist_like()]),
    "png-400": ("400x400 PNG drawing", lambda: [drawing_400()]),
    "png-1mp": ("1 MP RGBA PNG (1000x1000 canvas style)", lambda: [canvas_png(1000)]),
    "png-40mp": ("40 MP RGBA PNG (6320x6320 canvas style)", lambda: [canvas_png(6320)]),
    "jpeg-12mp": ("12 MP JPEG photo (4000x3000, baseline)", lambda: [photo_jpeg(False)]),
    "jpeg-12mp-progressive": ("12 MP JPEG photo (4000x3000, progressive)", lambda: [photo_jpeg(True)]),
    "request-11x40mp": (f"one request: {REQUEST_FILES} x the 40 MP RGBA PNG", None),
}


def build_parser():
    parser = Parser(prog=PROG, description="CPU time and peak memory of preprocess_views() per kind of image.")
    parser.add_argument("--old", metavar="REV", help="also measure `git show REV:server/preprocess.py` (e.g. HEAD~3)")
    parser.add_argument("--repeat", type=int_at_least(1), default=3, help="runs per case for the CPU time (default 3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--no-budget", action="store_true",
                        help="call preprocess_views(blob) without a PixelBudget (each image held to 40 MP alone)")
    parser.add_argument("--child", nargs=2, metavar=("MODULE", "FOLDER"), help=argparse.SUPPRESS)
    return parser


# --- the child: one case, one module, one fresh process -------------------------------------------

def load_module(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("preprocess_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_request(module, blobs, budgeted=True):
    """preprocess_views() of each file in turn, one PixelBudget for all when the module has one (and budgeted);
    stops at the first refused file, as the server does. -> outcome text."""
    budget = module.PixelBudget() if budgeted and hasattr(module, "PixelBudget") else None
    views = 0
    for index, blob in enumerate(blobs):
        try:
            views += len(module.preprocess_views(blob, budget) if budget else module.preprocess_views(blob))
        except module.ImageError as err:
            status = getattr(err, "status", 400)
            prefix = f"file {index + 1}: " if len(blobs) > 1 else ""
            return f"{status} {prefix}{err}"
    return f"{views} view(s) from {len(blobs)} file(s)"


def peak_rss_kib():
    """This process' peak resident set: VmHWM (the peak of this program's memory: a child's ru_maxrss starts at
    its parent's, copied at fork), else getrusage's maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(module_path, blobs_dir, repeat, budgeted):
    blobs = [path.read_bytes() for path in sorted(Path(blobs_dir).iterdir())]
    module = load_module(module_path)
    before = peak_rss_kib()
    times = []
    for _ in range(repeat):
        started = time.process_time()
        outcome = run_request(module, blobs, budgeted)
        times.append(time.process_time() - started)
        if times[0] > 2.0:
            break
    grown = peak_rss_kib() - before
    tracemalloc.start()
    run_request(module, blobs, budgeted)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"cpu": statistics.median(times), "traced_mb": peak / 2**20, "rss_mb": grown / 1024,
                      "outcome": outcome}))
    return 0


# --- the parent ------------------------------------------------------------------------------------

def measure(module_path, blobs_path, repeat, budgeted):
    flags = [] if budgeted else ["--no-budget"]
    command = [sys.executable, __file__, "--repeat", str(repeat), *flags, "--child", str(module_path), str(blobs_path)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(name, label, figures):
    if "error" in figures:
        return f"  {label:<8} {name:<24} child failed: {figures['error']}"
    return (f"  {label:<8} {name:<24} {figures['cpu']:7.3f} s {figures['traced_mb']:8.1f} MB "
            f"{figures['rss_mb']:8.1f} MB   {figures['outcome'][:90]}")


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    if args.child:
        return child(*args.child, args.repeat, not args.no_budget)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        return error(PROG, f"unknown case(s) {', '.join(unknown) or '(none)'} (cases: {', '.join(CASES)})")
    with tempfile.TemporaryDirectory(prefix="benchmark-decode-") as tmp:
        modules = [("current", MODULE)]
        if args.old:
            proc = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old}:server/preprocess.py"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                return error(PROG, f"git show {args.old}:server/preprocess.py: {proc.stderr.strip()}")
            old = Path(tmp) / "old_preprocess.py"
            old.write_text(proc.stdout)
            modules.insert(0, (args.old, old))
        print(f"preprocess_views() per case, each in a fresh process ({os.cpu_count()} CPUs; CPU time: median of "
              f"{args.repeat}, one run when over 2 s)")
        print(f"  {'code':<8} {'case':<24} {'CPU':>9} {'traced':>11} {'RSS +':>11}   outcome")
        made = {}
        for name in names:
            description, make = CASES[name]
            if make is None:  # the request: the 40 MP PNG, REQUEST_FILES times
                if "png-40mp" not in made:
                    made["png-40mp"] = CASES["png-40mp"][1]()
                blobs = made["png-40mp"] * REQUEST_FILES
            else:
                blobs = made[name] = make()
            path = Path(tmp) / name
            path.mkdir()
            for index, blob in enumerate(blobs):
                (path / f"{index:03d}").write_bytes(blob)
            sizes = "+".join(f"{len(b) / 1000:.0f}" for b in blobs[:1]) + (f" x {len(blobs)}" if len(blobs) > 1 else "")
            print(f"{name}: {description}, {sizes} kB")
            for label, module in modules:
                print(row(name, label, measure(module, path, args.repeat, not args.no_budget)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
