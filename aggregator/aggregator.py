"""Average the workers' Keras .h5 models into one (FedAvg, weighted by training samples).

    python aggregator.py --dir /mnt/model --savefile /mnt/aggregated-model.h5 [--expect N]

Reads and writes the weights with h5py + numpy only (no TensorFlow), so it starts fast.
The output is a copy of the first input with every weight replaced by the weighted average
and mlk_ attributes describing the inputs (see docs/CONTRACTS.md).
"""

import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from mlkcommon import (Parser, atomic_path, attr_value, error, parse_args, read_mlk_attrs, sha256_file,
                       write_mlk_attrs)

PROG = "aggregator"
POLL_SECONDS = 2.0
DEFAULT_TIMEOUT = 3600.0


class AggregateError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def build_parser():
    p = Parser(prog="aggregator.py", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="directory holding the workers' *.h5 models")
    p.add_argument("--savefile", required=True, help="where to write the averaged model (.h5)")
    p.add_argument("--expect", type=int, default=None,
                   help="wait until this many models are present before averaging")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for --expect models (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--allow-mixed-init", action="store_true",
                   help="average models even if they started from different initial weights")
    return p


# --- finding and reading models -------------------------------------------------------------

def model_files(directory, exclude=None):
    """Complete *.h5 files in directory: temp files (.name, *.tmp) and exclude are skipped."""
    found = []
    for p in sorted(Path(directory).glob("*.h5")):
        if p.name.startswith(".") or p.name.endswith(".tmp") or not p.is_file():
            continue
        if exclude is not None and p.resolve() == exclude:
            continue
        found.append(p)
    return found


def wait_for_models(directory, expect, timeout, exclude=None):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        files = model_files(directory, exclude)
        if len(files) >= expect:
            print(f"{PROG}: {len(files)}/{expect} models present", flush=True)
            return files
        if len(files) != last:
            print(f"{PROG}: waiting for models: {len(files)}/{expect} present in {directory}",
                  flush=True)
            last = len(files)
        if time.monotonic() >= deadline:
            have = ", ".join(p.name for p in files) or "none"
            raise AggregateError(f"timed out after {timeout:g}s waiting for {expect} models in "
                                 f"{directory}: {expect - len(files)} missing (present: {have})")
        time.sleep(min(POLL_SECONDS, max(0.05, deadline - time.monotonic())))


def weight_datasets(f):
    """{path: dataset} for every weight array under model_weights, in file order."""
    if "model_weights" not in f:
        raise KeyError("model_weights")
    found = {}
    f["model_weights"].visititems(
        lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def read_model(path):
    """Read one model: {'config', 'samples', 'fingerprint', 'round', 'epochs', 'weights'}."""
    try:
        with h5py.File(path, "r") as f:
            attrs = read_mlk_attrs(f)
            if "mlk_samples" not in attrs:
                raise AggregateError(f"{path}: no mlk_samples attribute (not written by the trainer?)")
            samples = int(attrs["mlk_samples"])
            if samples < 1:
                raise AggregateError(f"{path}: mlk_samples is {samples}, expected >= 1")
            if "model_config" not in f.attrs:
                raise AggregateError(f"{path}: no model_config attribute (not a Keras .h5 model)")
            weights = {name: ds[()] for name, ds in weight_datasets(f).items()}
            model = {
                "config": str(attr_value(f.attrs["model_config"])),
                "samples": samples,
                "fingerprint": str(attrs.get("mlk_init_fingerprint", "")),
                "round": int(attrs.get("mlk_round", 1)),
                "epochs": int(attrs.get("mlk_epochs", 0)),
                "weights": weights,
            }
    except AggregateError:
        raise
    except KeyError as e:
        raise AggregateError(f"{path}: missing {e} in the .h5 file (not a Keras model?)") from None
    except (OSError, ValueError, TypeError) as e:
        raise AggregateError(f"{path}: not a readable HDF5 model (truncated or not .h5?): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not weights:
        raise AggregateError(f"{path}: no weights under model_weights")
    for name, w in weights.items():
        if not np.issubdtype(w.dtype, np.floating) and not np.issubdtype(w.dtype, np.integer):
            raise AggregateError(f"{path}: weight {name} has unsupported dtype {w.dtype}")
        if np.issubdtype(w.dtype, np.floating) and not np.all(np.isfinite(w)):
            raise AggregateError(f"{path}: weight {name} contains NaN or infinite values")
    return model


def check_compatible(models, paths, allow_mixed_init):
    ref, ref_path = models[0], paths[0]
    ref_shapes = {k: v.shape for k, v in ref["weights"].items()}
    for m, p in zip(models[1:], paths[1:]):
        if m["config"] != ref["config"]:
            raise AggregateError(f"{p}: different architecture (model_config) from {ref_path}")
        shapes = {k: v.shape for k, v in m["weights"].items()}
        if shapes != ref_shapes:
            diff = sorted(set(shapes.items()) ^ set(ref_shapes.items()))[:1]
            raise AggregateError(f"{p}: different weight names/shapes from {ref_path} (e.g. {diff})")
        if not allow_mixed_init and m["fingerprint"] != ref["fingerprint"]:
            raise AggregateError(
                f"{p}: initial-weight fingerprint {m['fingerprint'][:12] or 'missing'} differs from "
                f"{ref_path}'s {ref['fingerprint'][:12] or 'missing'}; the workers did not start "
                "from the same weights (use --allow-mixed-init to average anyway)")


# --- averaging ---------------------------------------------------------------------------------

def fedavg(models):
    """Sample-weighted mean of every weight array (float64 accumulate, original dtype out)."""
    total = sum(m["samples"] for m in models)
    out = {}
    for name, ref in models[0]["weights"].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for m in models:
            acc += m["weights"][name].astype(np.float64) * (m["samples"] / total)
        out[name] = np.rint(acc).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) \
            else acc.astype(ref.dtype)
    return out


def write_aggregate(savefile, template, averaged, models, paths):
    with atomic_path(savefile) as tmp:
        shutil.copyfile(template, tmp)
        with h5py.File(tmp, "r+") as f:
            for name, ds in weight_datasets(f).items():
                ds[...] = averaged[name]
            if "optimizer_weights" in f:  # the first worker's optimizer state means nothing here
                del f["optimizer_weights"]
            write_mlk_attrs(f, {
                "mlk_kind": "aggregated",
                "mlk_samples": sum(m["samples"] for m in models),
                "mlk_init_fingerprint": models[0]["fingerprint"],
                "mlk_round": max(m["round"] for m in models),
                "mlk_epochs": max(m["epochs"] for m in models),
                "mlk_workers": len(models),
                "mlk_inputs": [{"file": p.name, "sha256": sha256_file(p), "samples": m["samples"]}
                               for m, p in zip(models, paths)],
            }, replace=True)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # usage error (exit 2, one line) or --help (exit 0)
        return args
    try:
        directory = Path(args.dir)
        if not directory.is_dir():
            raise AggregateError(f"--dir {directory} is not a directory")
        savefile = Path(args.savefile)
        if not savefile.parent.is_dir():
            raise AggregateError(f"--savefile directory {savefile.parent} does not exist")
        exclude = savefile.resolve()
        if args.expect is not None:
            if args.expect < 1:
                raise AggregateError(f"--expect must be >= 1, got {args.expect}")
            if args.timeout < 0:
                raise AggregateError(f"--timeout must be >= 0, got {args.timeout:g}")
            paths = wait_for_models(directory, args.expect, args.timeout, exclude)
        else:
            paths = model_files(directory, exclude)
        if not paths:
            raise AggregateError(f"no *.h5 models in {directory}")
        models = []
        for p in paths:
            models.append(read_model(p))
            print(f"{PROG}: read {p} ({models[-1]['samples']} samples, round {models[-1]['round']})",
                  flush=True)
        check_compatible(models, paths, args.allow_mixed_init)
        averaged = fedavg(models)
        write_aggregate(savefile, paths[0], averaged, models, paths)
    except AggregateError as e:
        return error(PROG, e)
    total = sum(m["samples"] for m in models)
    print(f"{PROG}: wrote {savefile}: average of {len(models)} models, {total} samples, "
          f"round {max(m['round'] for m in models)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
