#!/usr/bin/env python3
"""What writing live progress costs the trainer: trainer/trainer.py on the same MNIST shard with the same seed,
with its progress file (the default) and with --no-progress, alternately, each run a fresh process.

    .venv/bin/python benchmarks/benchmark-progress.py [--samples 12000] [--epoch 1] [--batch 100] [--repeat 3]
                                                      [--threads 1] [--dataset mnist.npz]

Per mode: the training seconds each run recorded (mlk_train_seconds, the fit loop only: no start-up), their
median, the difference of the medians, and whether both modes saved bit-identical weights (they must: the
progress callback only reads). On a loaded machine that difference is mostly noise, so the script also times
the progress code itself in this process, where load does not enter: trainer.Progress.write per batch (a
clock check; one write a second) and one write (JSON + temporary file + rename), and says what they add to
a run's measured steps. Prints figures only (no targets: the machine is shared); exit 2 on bad input.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import MnistUnavailable, mnist_path
from mlkcommon import Parser, error, fingerprint, int_at_least, parse_args, read_mlk_attrs

ROOT = _repo.ROOT
PROG = "benchmark-progress.py"


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int_at_least(100), default=12000, help="MNIST training digits in the shard")
    p.add_argument("--epoch", type=int_at_least(1), default=1)
    p.add_argument("--batch", type=int_at_least(1), default=100)
    p.add_argument("--repeat", type=int_at_least(1), default=3, help="runs per mode")
    p.add_argument("--threads", type=int_at_least(0), default=1, help="TensorFlow threads (0: its default)")
    p.add_argument("--dataset", help="MNIST .npz (default: MNIST_NPZ or the project's copy)")
    return p


def weights_fingerprint(path):
    import keras

    return fingerprint(keras.models.load_model(path, compile=False).get_weights())


def micro(tmp, calls=200000, writes=2000):
    """(microseconds per batch call that writes nothing, milliseconds per write): the progress code alone, on a
    fake clock (still: every call within the second, so skipped)."""
    import trainer

    now = [0.0]
    progress = trainer.Progress(tmp / "m.progress.json", "0-model.h5", 1, 1, calls, clock=lambda: now[0])
    progress.write("training", 1, 0, force=True)
    started = time.perf_counter()
    for i in range(calls):
        progress.write("training", 1, i + 1, 0.5)
    per_call = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for i in range(writes):
        progress.write("training", 1, i + 1, 0.5, force=True)
    per_write = (time.perf_counter() - started) / writes
    return per_call * 1e6, per_write * 1e3


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        dataset = Path(args.dataset) if args.dataset else mnist_path()
    except MnistUnavailable as err:
        return error(PROG, err)
    if not dataset.is_file():
        return error(PROG, f"--dataset {dataset}: no such file")
    with tempfile.TemporaryDirectory(prefix="mlk-bench-progress-") as tmp:
        tmp = Path(tmp)
        with np.load(dataset) as npz:
            np.savez(tmp / "0.npz", x=npz["x_train"][:args.samples], y=npz["y_train"][:args.samples])
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        seconds, prints = {"progress": [], "no-progress": []}, {}
        for run in range(args.repeat):
            for mode in ("progress", "no-progress"):  # alternating: a load change hits both alike
                out = tmp / mode / f"{run}-model.h5"
                cmd = [sys.executable, str(ROOT / "trainer/trainer.py"), "--data", str(tmp / "0.npz"),
                       "--epoch", str(args.epoch), "--batch", str(args.batch), "--savemodel", str(out),
                       "--threads", str(args.threads)] + (["--no-progress"] if mode == "no-progress" else [])
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    return error(PROG, f"trainer failed ({mode}): {done.stderr.strip().splitlines()[-1:]}", 1)
                seconds[mode].append(float(read_mlk_attrs(out)["mlk_train_seconds"]))
                prints.setdefault(mode, set()).add(weights_fingerprint(out))
                written = (out.parent / f"{run}-model.progress.json").is_file()
                if written != (mode == "progress"):
                    return error(PROG, f"{mode}: progress file {'missing' if not written else 'written'}", 1)
                print(f"run {run + 1}/{args.repeat} {mode:<12} {seconds[mode][-1]:7.2f} s", flush=True)
        medians = {mode: statistics.median(values) for mode, values in seconds.items()}
        cost = medians["progress"] - medians["no-progress"]
        steps = args.epoch * -(-args.samples // args.batch)
        result = {
            "samples": args.samples, "epochs": args.epoch, "batch": args.batch, "steps": steps,
            "threads": args.threads, "seconds": seconds,
            "median_progress": round(medians["progress"], 3), "median_no_progress": round(medians["no-progress"], 3),
            "cost_seconds": round(cost, 3), "cost_percent": round(100 * cost / medians["no-progress"], 2),
            "cost_ms_per_step": round(1000 * cost / steps, 3),
            "same_weights": len(prints["progress"] | prints["no-progress"]) == 1,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        per_call_us, per_write_ms = micro(tmp)
        step_ms = 1000 * medians["no-progress"] / steps
        # per step: the call, and a write every 1000/step_ms steps (once a second)
        added = per_call_us / 1000 + per_write_ms * min(1.0, step_ms / 1000)
        result.update(per_batch_call_us=round(per_call_us, 2), per_write_ms=round(per_write_ms, 3),
                      step_ms=round(step_ms, 2), added_percent_of_a_step=round(100 * added / step_ms, 4))
        print(f"median training time: with progress {medians['progress']:.2f} s, without {medians['no-progress']:.2f} s"
              f" -> {cost:+.2f} s ({result['cost_percent']:+.2f} %, {result['cost_ms_per_step']:+.3f} ms a step); "
              f"same weights: {result['same_weights']}; load average {result['load_average'][0]:.1f}")
        print(f"the progress code itself: {per_call_us:.2f} us a batch, "
              f"{per_write_ms:.3f} ms a write; at {step_ms:.1f} ms a step: {result['added_percent_of_a_step']:.4f} % "
              f"of the training time")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
