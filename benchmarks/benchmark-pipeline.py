"""Benchmark: the local pipeline vs the 2019 method on real MNIST, same shards, same parallelism.

Runs scripts/local-quickstart.sh (WORKER_NUMBER=3 EPOCH=2 BATCH=100 SERVE=0, ROUNDS from env or its
default) in a temp WORK_DIR, then benchmarks/original_method.py on that run's shards, then the same
pipeline's stages on a label-skew split (`splitter --strategy label-skew`, same settings; reported, not
judged), and prints a table (method, wall time, test accuracy), the load average before and after, and
a verdict: accuracy >= 0.990 and a wall time at most 0.8x the original's, both from this run.
If local-quickstart.sh does not exist, it runs the same stages itself (split, parallel trainers,
aggregate, evaluate), as it always does for the label-skew row (the IID settings on that split, as in
earlier runs; the label-skew target, PRESET=label-skew, is benchmarks/benchmark-label-skew.py's).
Usage: [MNIST_NPZ=mnist.npz] [ROUNDS=2] .venv/bin/python benchmarks/benchmark-pipeline.py
MNIST: $MNIST_NPZ, else ../shared/datasets/mnist.npz beside the repository, else the splitter's
checksum-verified download into the user cache (tests/helpers.py's mnist_path(), as for the tests).
"""

import argparse
import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401 - benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import MnistUnavailable, mnist_path as find_mnist
from mlkcommon import Parser, parse_args

HERE = Path(__file__).resolve().parent  # benchmarks/
REPO = HERE.parent
TARGET = 0.990
TIME_RATIO = 0.8  # the pipeline's wall time may be at most this fraction of the original's
WORKERS, EPOCH, BATCH = 3, 2, 100
PY = sys.executable
PROG = "benchmark-pipeline.py"


def build_parser():
    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", metavar="DIR", help="copy the pipeline run's aggregated model and rounds/ "
                        "(ledger, history.png) to DIR (default: nothing is kept)")
    return parser


def mnist_path():
    """tests/helpers.py's mnist_path(); exits 2 with one line when MNIST cannot be had."""
    try:
        return find_mnist()
    except MnistUnavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def run(cmd, env=None):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"benchmark-pipeline: command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return proc.stdout


def load_average():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def quickstart_rounds(quickstart):
    """ROUNDS from the environment, else the quickstart's own default (its ROUNDS="${ROUNDS:-N}" line), else 2 (that default)."""
    if "ROUNDS" in os.environ:
        return int(os.environ["ROUNDS"])
    if quickstart.exists():
        found = re.search(r'^ROUNDS="\$\{ROUNDS:-(\d+)\}"', quickstart.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1))
    return 2


def trainer_threads():
    """local-quickstart.sh's TensorFlow threads per trainer: up to twice a trainer's share of the cores, at most
    all of them (2 cores, 3 trainers: 2). The original's method gets the same, so neither is starved."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, -(-2 * cores // WORKERS)))


def own_pipeline(work, mnist, rounds, strategy="iid"):
    """Stand-in for local-quickstart.sh: the same stages, trainers in parallel with the quickstart's threads."""
    run([PY, REPO / "splitter/splitter.py", "--n_container", str(WORKERS), "--savedir", work / "data", "--dataset", mnist,
         "--strategy", strategy])
    threads = str(trainer_threads())
    (work / "model").mkdir(parents=True, exist_ok=True)
    init = []
    for _ in range(rounds):
        for old in (work / "model").glob("*.h5"):  # the aggregator averages every model in the folder
            old.unlink()
        procs = [subprocess.Popen([PY, REPO / "trainer/trainer.py", "--data", work / f"data/{i}.npz", "--epoch", str(EPOCH),
                                   "--batch", str(BATCH), "--savemodel", work / f"model/{i}-model.h5", "--threads", threads,
                                   *init], stdout=subprocess.DEVNULL)
                 for i in range(WORKERS)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("benchmark-pipeline: a trainer failed")
        run([PY, REPO / "aggregator/aggregator.py", "--dir", work / "model", "--savefile", work / "aggregated-model.h5",
             "--expect", str(WORKERS)])
        init = ["--init-model", work / "aggregated-model.h5"]
    return run([PY, REPO / "trainer/evaluate.py", "--modelpath", work / "aggregated-model.h5", "--data", work / "data/test.npz"])


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # --help (0) or a usage error (2, one line)
        return args
    mnist = mnist_path().resolve()
    if not mnist.is_file():
        print(f"{PROG}: error: MNIST not found at {mnist} (MNIST_NPZ)", file=sys.stderr)
        return 2
    quickstart = REPO / "scripts/local-quickstart.sh"
    rounds = quickstart_rounds(quickstart)
    load_before = load_average()
    print(f"load average before: {load_before}; {os.cpu_count()} cores, {trainer_threads()} TensorFlow threads per "
          f"worker process (both methods)", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlk-bench-") as tmp:
        work = Path(tmp) / "work"
        env = dict(os.environ, WORKER_NUMBER=str(WORKERS), EPOCH=str(EPOCH), BATCH=str(BATCH), SERVE="0",
                   WORK_DIR=str(work), MNIST_NPZ=str(mnist))
        started = time.perf_counter()
        if quickstart.exists():
            method = "pipeline (local-quickstart.sh, ROUNDS=" + os.environ.get("ROUNDS", f"{rounds}, its default") + ")"
            out = run(["bash", quickstart], env=env)
        else:
            method = f"pipeline (stand-in loop, ROUNDS={rounds})"
            out = own_pipeline(work, mnist, rounds)
        ours_seconds = time.perf_counter() - started
        if args.keep:
            keep = Path(args.keep)
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work, keep, ignore=shutil.ignore_patterns("data", "model"))
            print(f"kept: {keep} (aggregated-model.h5, rounds/, logs/)", flush=True)
        accuracy_lines = [line for line in out.splitlines() if line.startswith("{") and "accuracy" in line]
        ours = json.loads(accuracy_lines[-1]) if accuracy_lines else None

        started = time.perf_counter()
        original = last_json(run([PY, HERE / "original_method.py", "--data-dir", work / "data", "--workers", str(WORKERS),
                                  "--epoch", str(EPOCH), "--batch", str(BATCH), "--threads", str(trainer_threads())]))
        original_seconds = time.perf_counter() - started

        started = time.perf_counter()
        skew = last_json(own_pipeline(Path(tmp) / "label-skew", mnist, rounds, strategy="label-skew"))
        skew_seconds = time.perf_counter() - started
    load_after = load_average()

    ours_acc = ours["accuracy"] if ours else float("nan")
    print()
    print(f"| method | wall time (s) | test accuracy |")
    print(f"| --- | ---: | ---: |")
    print(f"| {method} | {ours_seconds:.1f} | {ours_acc:.4f} |")
    print(f"| original 2019 method (independent init, plain average) | {original_seconds:.1f} | {original['accuracy']:.4f} |")
    print(f"| same pipeline on a label-skew split (stand-in loop, ROUNDS={rounds}; reported, not judged) "
          f"| {skew_seconds:.1f} | {skew['accuracy']:.4f} |")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    ratio = ours_seconds / original_seconds
    ok = ours_acc >= TARGET and ratio <= TIME_RATIO
    print(f"verdict: {'PASS' if ok else 'FAIL'} — accuracy {ours_acc:.4f} (target >= {TARGET}), "
          f"wall {ours_seconds:.1f}s = {ratio:.2f}x the original's {original_seconds:.1f}s (target <= {TIME_RATIO}x)")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
