"""Benchmark: PRESET=label-skew against the default IID pipeline, both scripts/local-quickstart.sh, in one run.

Runs the local pipeline twice on real MNIST (SERVE=0, 3 workers): first at its defaults (IID split, 2 rounds of
2 epochs, FedAvg), then with PRESET=label-skew (scripts/presets/label-skew.env: the label-skew split, many short
rounds, server momentum). Prints each run's wall time and test accuracy per round (from its round ledger, which
the pipeline's accuracy test fills; rounds/history.png plots the same), and the verdict: label-skew test accuracy
>= 0.98 with a wall time <= 3x the IID run's, both measured here.
Usage: nice -n 5 .venv/bin/python benchmarks/benchmark-label-skew.py [--keep DIR]
MNIST: $MNIST_NPZ, else ../shared/datasets/mnist.npz beside the repository (tests/helpers.py's mnist_path()).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401 - common/, the stage folders and tests/ on sys.path
from helpers import MnistUnavailable, clean_env, mnist_path
from mlkcommon import Parser, parse_args

PROG = "benchmark-label-skew.py"
REPO = Path(__file__).resolve().parent.parent
TARGET = 0.98
TIME_RATIO = 3.0


def build_parser():
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", metavar="DIR", help="copy the label-skew run's rounds/ (ledger, history.png) to DIR")
    return p


def pipeline(work, mnist, **knobs):
    """(wall seconds, the run's ledger rounds) of one local-quickstart.sh run with these settings."""
    env = clean_env(WORK_DIR=str(work), MNIST_NPZ=str(mnist), SERVE="0", TF_CPP_MIN_LOG_LEVEL="2",
                    VENV=str(Path(sys.prefix)), **knobs)
    print("+", " ".join(f"{k}={v}" for k, v in knobs.items()), "scripts/local-quickstart.sh", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts/local-quickstart.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        sys.exit(f"{PROG}: the pipeline failed ({proc.returncode})")
    summary = proc.stdout[proc.stdout.rindex("== summary"):]
    print(summary.split("\n   model:")[0], flush=True)
    return seconds, json.loads((work / "rounds/ledger.json").read_text())["rounds"]


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        mnist = mnist_path()
    except MnistUnavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="mlk-label-skew-") as tmp:
        iid_seconds, iid = pipeline(Path(tmp) / "iid", mnist)
        skew_seconds, skew = pipeline(Path(tmp) / "skew", mnist, PRESET="label-skew")
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(Path(tmp) / "skew/rounds", args.keep, ignore=shutil.ignore_patterns("r*[0-9]"))
            print(f"kept: {args.keep} (ledger.json, history.png, r{{n}}.h5)")
    preset = (REPO / "scripts/presets/label-skew.env").read_text()
    settings = " ".join(line for line in preset.splitlines() if line and not line.startswith("#"))
    print()
    print(f"load average (1, 5, 15 min): before {load_before}, after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"PRESET=label-skew: {settings}")
    print()
    print("| round | " + " | ".join(str(e["round"]) for e in skew) + " |")
    print("| --- | " + " | ".join("---:" for _ in skew) + " |")
    print("| label-skew test accuracy | " + " | ".join(f"{e['test_accuracy']:.4f}" for e in skew) + " |")
    print("| IID (default) test accuracy | " + " | ".join(f"{e['test_accuracy']:.4f}" for e in iid)
          + " |" * (len(skew) - len(iid)) + " |")
    print()
    print("| run | wall time (s) | rounds | final test accuracy |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| default IID pipeline | {iid_seconds:.1f} | {len(iid)} | {iid[-1]['test_accuracy']:.4f} |")
    print(f"| PRESET=label-skew | {skew_seconds:.1f} | {len(skew)} | {skew[-1]['test_accuracy']:.4f} |")
    for name, rounds in (("default IID pipeline", iid), ("PRESET=label-skew", skew)):  # every worker is honest here
        flags = [w["outlier"] for e in rounds for w in e["workers"]]
        print(f"outlier flags (honest workers, the ledger's rule): {name} {sum(flags)} of {len(flags)} worker-rounds")
    accuracy, ratio = skew[-1]["test_accuracy"], skew_seconds / iid_seconds
    ok = accuracy >= TARGET and ratio <= TIME_RATIO
    print(f"verdict: {'PASS' if ok else 'FAIL'} - label-skew accuracy {accuracy:.4f} (target >= {TARGET}), wall "
          f"{skew_seconds:.1f}s = {ratio:.2f}x the IID run's {iid_seconds:.1f}s (target <= {TIME_RATIO:g}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
