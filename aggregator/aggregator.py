"""Average the workers' Keras .h5 models into one (FedAvg, weighted by training samples).

    python aggregator.py --dir /mnt/model --savefile /mnt/aggregated-model.h5 [--expect N]
        [--min-workers K --deadline S] [--drop-outliers]
        [--aggregation fedavg|median|trimmed-mean|krum] [--server-optimizer none|fedavgm|fedadam]

Reads and writes the weights with h5py + numpy only (no TensorFlow), so it starts fast.
The output is a copy of the first input with every weight replaced by the weighted average
and mlk_ attributes describing the inputs (see docs/CONTRACTS.md). Each round is also kept in the
round ledger next to --savefile: rounds/r{n}.h5, copies of its inputs in rounds/r{n}/, and an entry in
rounds/ledger.json with a per-worker report (update norm, cosine to the other workers, outlier flag).
Instead of the average, --aggregation can take a robust rule, and --server-optimizer can take a server-side
step over the round's pseudo-gradient (strategies.py; the optimiser's state is kept as rounds/r{n}-opt.npz).
"""

import argparse
import math
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

import ledger as ledger_mod
import strategies
from mlkcommon import (Parser, atomic_path, attr_value, error, fingerprint, parse_args, progress_path, read_mlk_attrs,
                       sha256_file, write_mlk_attrs, write_progress)

PROG = "aggregator"
POLL_SECONDS = 0.5
DEFAULT_TIMEOUT = 3600.0
WORKER_FILE = re.compile(r"^(\d+)-model\.h5$")  # the trainers' {i}-model.h5 (docs/CONTRACTS.md)

# The outlier rule (docs/CONTRACTS.md, "Round ledger"), chosen on real MNIST shards: 3 workers of 20000 digits, one
# trained on shuffled labels, rounds 1-3, iid and label-skew; then issue 31's hostile-worker matrix (5 workers, one
# attacker: shuffled labels, sign flip, x10, backdoor; 50 steps from a warm start; chosen on seeds 0-9, checked on
# 10-14). The cosine of the whole update to the others' mean does not separate an attacker under label skew (about 0
# for every worker: honest workers of different digits move apart too). One layer does, for a worker that trains
# against the others: in the first convolution honest workers' updates agree (cosine 0.22-0.98) while a shuffled-label
# or sign-flipped worker's points the other way (-0.07 to -0.58) or far less their way (+0.10 against +0.26). So the
# rule finds the layer where two workers agree best and asks each worker how well it agrees with anyone there, against
# the workers' median (against the best pair, 0.6 of it flagged honest label-skew workers at 0.46), and only while the
# workers agree at all: with 3 label-skew workers near convergence (PRESET=label-skew, rounds 5-16) that median is
# 0.03-0.16 or below 0, and the figure flagged an honest worker in 11 of those 12 rounds. A backdoor worker,
# and a shuffled-label one under label skew, agree as well as an honest one but move every layer further (they learn
# what the others do not): per layer, update norm over the workers' median, 1.20-1.62 in the median layer against
# 0.93-1.09 for honest workers. OUTLIER_RULE is the sentence.
OUTLIER_MIN_WORKERS = 3
OUTLIER_AGREEMENT_FRACTION = 0.45
OUTLIER_MIN_AGREEMENT = 0.2
OUTLIER_NORM_RATIO = 3.0
OUTLIER_LAYER_NORM_RATIO = 1.15
OUTLIER_RULE = (f"with at least {OUTLIER_MIN_WORKERS} workers, take the layer in which two workers' updates (weights "
                f"minus the round's starting weights) have the highest cosine similarity; a worker is an outlier when "
                f"its highest cosine with another worker in that layer is below {OUTLIER_AGREEMENT_FRACTION:g} times "
                f"the workers' median of that figure (when that median is at least {OUTLIER_MIN_AGREEMENT:g}: below it "
                f"the workers agree with nobody), when its update norm is more than {OUTLIER_NORM_RATIO:g} times "
                f"the median update norm, or when, per layer, its update norm over the median of the workers' is "
                f"above {OUTLIER_LAYER_NORM_RATIO:g} in the median layer")


DEFAULT_TRIM_BETA = 0.2
DEFAULT_KRUM_F = 1
DEFAULT_KRUM_M = 1
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01}  # per optimiser: FedAdam's lr is an absolute step per weight
DEFAULT_SERVER_MOMENTUM = 0.9
STATE_DATE = (1980, 1, 1, 0, 0, 0)  # the zip entries' time stamp in rounds/r{n}-opt.npz: equal states, equal bytes


class AggregateError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def min_workers_value(text):
    """--min-workers: an integer >= 1, or a fraction 0 < f < 1 of --expect (rounded up)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: an integer >= 1 or a fraction 0 < f < 1") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction 0 < f < 1, got {text}")


def build_parser():
    p = Parser(prog="aggregator.py", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="directory holding the workers' *.h5 models")
    p.add_argument("--savefile", required=True, help="where to write the averaged model (.h5)")
    p.add_argument("--expect", type=int, default=None,
                   help="wait until this many models are present before averaging")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for --expect models (default {DEFAULT_TIMEOUT:.0f}); "
                        "fewer than --min-workers by then is an error")
    p.add_argument("--min-workers", type=min_workers_value, default=None, metavar="K",
                   help="with --expect N: average as few as K models (an integer, or a fraction of N rounded up) "
                        "once --deadline has passed (default N: wait for all)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="the round deadline: after it, average the models present if there are at least "
                        "--min-workers (default: --timeout)")
    p.add_argument("--round", type=int, default=None, metavar="N",
                   help="with --expect: the round this run closes; models of another round in --dir (mlk_round "
                        "is not N: the round before's, still there while N's trainers run) are ignored, so the "
                        "aggregator can start beside the round's trainers (quickstart.sh does)")
    p.add_argument("--drop-outliers", action="store_true",
                   help="leave workers the per-worker report flags as outliers out of the average "
                        "(default: report only)")
    p.add_argument("--allow-mixed-init", action="store_true",
                   help="average models even if they started from different initial weights")
    p.add_argument("--aggregation", choices=strategies.RULES, default="fedavg",
                   help="how the models become one (strategies.py): fedavg, the sample-weighted mean (default); "
                        "median, coordinate-wise; trimmed-mean, coordinate-wise without the floor(beta*n) largest "
                        "and smallest values; krum, the mean of the m models closest to their n-f-2 nearest others")
    p.add_argument("--trim-beta", type=float, default=None, metavar="BETA",
                   help=f"with --aggregation trimmed-mean: the fraction 0 <= beta < 0.5 trimmed at each end "
                        f"(default {DEFAULT_TRIM_BETA:g})")
    p.add_argument("--krum-f", type=int, default=None, metavar="F",
                   help=f"with --aggregation krum: the Byzantine workers tolerated, needs n > 2F+2 models "
                        f"(default {DEFAULT_KRUM_F})")
    p.add_argument("--krum-m", type=int, default=None, metavar="M",
                   help=f"with --aggregation krum: how many of the best-scored models are averaged (multi-Krum; "
                        f"default {DEFAULT_KRUM_M})")
    p.add_argument("--server-optimizer", choices=strategies.OPTIMIZERS, default="none",
                   help="a server-side step over the pseudo-gradient (aggregate minus the round's start "
                        "rounds/r{n-1}.h5): none (default), fedavgm (momentum), fedadam (Adam, Reddi et al. 2021)")
    p.add_argument("--server-lr", type=float, default=None, metavar="LR",
                   help=f"with --server-optimizer: the server learning rate (default "
                        f"{DEFAULT_SERVER_LR['fedavgm']:g} for fedavgm, {DEFAULT_SERVER_LR['fedadam']:g} for fedadam, "
                        "which moves each weight by about LR a round)")
    p.add_argument("--server-momentum", type=float, default=None, metavar="MOMENTUM",
                   help=f"with --server-optimizer fedavgm: the momentum, 0 <= momentum < 1 "
                        f"(default {DEFAULT_SERVER_MOMENTUM:g})")
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


class StaleFilter:
    """With --min-workers < --expect, a lost worker's model of an older round can still lie in --dir: it is
    ignored, not averaged. Stale: a model whose mlk_round is below the newest one present, or whose bytes the
    ledger already records as an input of an earlier round. With --round N, stale is simply a model whose
    mlk_round is not N (a retried aggregator of round N still finds round N's models, recorded or not).
    Results are cached by (size, mtime)."""

    def __init__(self, recorded_inputs, round_number=None):
        self.recorded = set(recorded_inputs)
        self.round = round_number
        self.cache = {}
        self.reported = set()

    def info(self, path):
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self.cache:
            try:
                rnd = int(read_mlk_attrs(path).get("mlk_round", 1))
            except (OSError, ValueError, TypeError):
                rnd = None  # unreadable: counted as present, and read_model names the problem
            # the bytes matter only without --round (recorded inputs); with it the round alone decides
            self.cache[key] = (rnd, sha256_file(path) if self.round is None else None)
        return self.cache[key]

    def split(self, files):
        infos = {p: self.info(p) for p in files}
        rounds = [r for r, _ in infos.values() if r is not None]
        newest = max(rounds) if rounds else None
        fresh, stale = [], []
        for p, (rnd, digest) in infos.items():
            if self.round is not None:
                old = rnd is not None and rnd != self.round
            else:
                old = digest in self.recorded or (rnd is not None and newest is not None and rnd < newest)
            (stale if old else fresh).append(p)
        for p in stale:
            if p.name not in self.reported:
                self.reported.add(p.name)
                print(f"{PROG}: ignoring {p.name}: a model of an earlier round (stale)", flush=True)
        return fresh


def wait_for_models(directory, expect, timeout, exclude=None, min_workers=None, deadline=None, stale=None,
                    on_count=None):
    """Wait until `expect` models are present, or, once `deadline` seconds have passed, at least `min_workers`
    (default: expect). Fewer than min_workers when max(timeout, deadline) has passed: AggregateError.
    on_count(present): called at every poll (POLL_SECONDS) with the count of models present (the live progress file)."""
    min_workers = expect if min_workers is None else min_workers
    deadline = timeout if deadline is None else deadline
    started = time.monotonic()
    give_up = started + max(timeout, deadline)
    round_deadline = started + deadline
    last = None
    while True:
        files = model_files(directory, exclude)
        if stale is not None:
            files = stale.split(files)
        now = time.monotonic()
        if len(files) >= expect:
            print(f"{PROG}: {len(files)}/{expect} models present", flush=True)
            return files
        if len(files) >= min_workers and now >= round_deadline:
            print(f"{PROG}: round deadline ({deadline:g}s) passed with {len(files)}/{expect} models present "
                  f"(at least {min_workers} needed): averaging those", flush=True)
            return files
        if on_count is not None:
            on_count(len(files))
        if len(files) != last:
            print(f"{PROG}: waiting for models: {len(files)}/{expect} present in {directory}",
                  flush=True)
            last = len(files)
        if now >= give_up:
            have = ", ".join(p.name for p in files) or "none"
            waited = max(timeout, deadline)
            if min_workers < expect:
                raise AggregateError(f"timed out after {waited:g}s: {len(files)} of {expect} models in {directory}, "
                                     f"fewer than --min-workers {min_workers}: {expect - len(files)} missing "
                                     f"(present: {have})")
            raise AggregateError(f"timed out after {waited:g}s waiting for {expect} models in "
                                 f"{directory}: {expect - len(files)} missing (present: {have})")
        next_event = give_up if now >= round_deadline else min(round_deadline, give_up)
        time.sleep(min(POLL_SECONDS, max(0.05, next_event - now)))


def weight_datasets(f):
    """{path: dataset} for every weight array under model_weights, in file order."""
    if "model_weights" not in f:
        raise KeyError("model_weights")
    found = {}
    f["model_weights"].visititems(
        lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def keras_order(f, names):
    """The weight dataset paths (keys of weight_datasets) in Keras' get_weights() order: model_weights'
    layer_names, then each layer's weight_names. Falls back to file order when those attributes are absent."""
    try:
        ordered = []
        for layer in f["model_weights"].attrs["layer_names"]:
            layer = attr_value(layer)
            for weight in f["model_weights"][layer].attrs["weight_names"]:
                ordered.append(f"{layer}/{attr_value(weight)}")
    except (KeyError, TypeError, ValueError):
        return list(names)
    return ordered if sorted(ordered) == sorted(names) else list(names)


def weights_fingerprint(weights, order):
    """mlkcommon.fingerprint of a model's weights ({dataset path: array}) in Keras' get_weights() order."""
    return fingerprint(weights[name] for name in order)


def read_model(path):
    """Read one model: {'config', 'samples', 'fingerprint', 'round', 'epochs', 'weights', 'order', 'attrs'}."""
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
                "order": keras_order(f, weights),
                "attrs": attrs,
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


def read_start(path, models):
    """The round's starting weights (rounds/r{n-1}.h5) if that file exists, matches the models' shapes and
    its weights have the workers' init fingerprint; else None (the report then has no update figures)."""
    if not path.is_file():
        print(f"{PROG}: no starting weights {path}: the per-worker report has no update figures", flush=True)
        return None
    try:
        with h5py.File(path, "r") as f:
            weights = {name: ds[()] for name, ds in weight_datasets(f).items()}
    except (OSError, KeyError, ValueError, TypeError):
        print(f"{PROG}: {path} is not a readable model: the per-worker report has no update figures", flush=True)
        return None
    ref = models[0]
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in ref["weights"].items()}:
        print(f"{PROG}: {path} has other weight shapes: the per-worker report has no update figures", flush=True)
        return None
    if weights_fingerprint(weights, ref["order"]) != ref["fingerprint"]:
        print(f"{PROG}: {path} is not these workers' starting point (init fingerprint differs): the per-worker "
              "report has no update figures", flush=True)
        return None
    return weights


# --- the per-worker report -----------------------------------------------------------------------

def cosine(a, b):
    denom = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0


def worker_report(models, start, names_of_files):
    """Per worker: update_norm (L2 norm of its weights minus the start), norm_to_median, cosine_to_others (cosine
    similarity of its whole update to the sample-weighted mean update of the OTHER workers), agreement (its highest
    cosine with another worker's update in the layer where two workers agree best) and agreement_with
    ("FILE/LAYER" of that), and outlier (OUTLIER_RULE). Without start weights the figures are None and nobody is flagged."""
    if start is None:
        return [{"update_norm": None, "norm_to_median": None, "cosine_to_others": None, "agreement": None,
                 "agreement_with": None, "layer_norm_ratio": None, "outlier": False} for _ in models]
    names = sorted(start)
    layers = {}  # Keras layer (the first part of the weight's path) -> its weight names
    for k in names:
        layers.setdefault(k.split("/")[0], []).append(k)
    whole = [np.concatenate([(m["weights"][k].astype(np.float64) - start[k].astype(np.float64)).ravel()
                             for k in names]) for m in models]
    per_layer = []
    for u in whole:  # the same update cut into its layers (names are sorted, so each layer is one slice)
        parts, at = {}, 0
        for layer, ks in layers.items():
            size = sum(start[k].size for k in ks)
            parts[layer] = u[at:at + size]
            at += size
        per_layer.append(parts)
    samples = np.array([m["samples"] for m in models], dtype=np.float64)
    norms = np.array([float(np.linalg.norm(u)) for u in whole])
    median = float(np.median(norms))
    n = len(models)
    layer_ratios = []  # per layer in which the workers moved: each worker's update norm over the median of theirs
    for layer in layers:
        layer_norms = np.array([float(np.linalg.norm(parts[layer])) for parts in per_layer])
        if np.median(layer_norms) > 0:
            layer_ratios.append(layer_norms / np.median(layer_norms))
    layer_ratio = np.median(layer_ratios, axis=0) if layer_ratios else [None] * n
    pair = {(layer, i, j): cosine(per_layer[i][layer], per_layer[j][layer])
            for layer in layers for i in range(n) for j in range(n) if i != j}
    best_layer = max(pair, key=pair.get)[0] if pair else None  # the layer where two workers agree best
    report = []
    for i, u in enumerate(whole):
        others = [j for j in range(n) if j != i]
        to_others, agreement, partner = None, None, None
        if others:
            mean = sum(whole[j] * (samples[j] / samples[others].sum()) for j in others)
            to_others = cosine(u, mean)
            agreement, j = max((pair[(best_layer, i, j)], j) for j in others)
            partner = f"{names_of_files[j]}/{best_layer}"
        report.append({"update_norm": round(float(norms[i]), 6),
                       "norm_to_median": round(norms[i] / median, 6) if median > 0 else None,
                       "cosine_to_others": None if to_others is None else round(to_others, 6),
                       "agreement": None if agreement is None else round(agreement, 6),
                       "agreement_with": partner,
                       "layer_norm_ratio": None if layer_ratio[i] is None else round(float(layer_ratio[i]), 6),
                       "outlier": False})
    if n >= OUTLIER_MIN_WORKERS:
        typical = float(np.median([r["agreement"] for r in report]))
        for r in report:
            r["outlier"] = bool((typical >= OUTLIER_MIN_AGREEMENT
                                 and r["agreement"] < OUTLIER_AGREEMENT_FRACTION * typical)
                                or (r["norm_to_median"] is not None and r["norm_to_median"] > OUTLIER_NORM_RATIO)
                                or (r["layer_norm_ratio"] is not None
                                    and r["layer_norm_ratio"] > OUTLIER_LAYER_NORM_RATIO))
    return report


def print_report(names, report, dropped):
    print(f"{PROG}: per-worker report; {OUTLIER_RULE}", flush=True)
    print(f"  {'worker':<16} {'samples':>8} {'update norm':>12} {'/median':>8} {'layers':>7} {'cosine':>7} "
          f"{'agreement':>10}  {'with':<26} flag", flush=True)
    for name, (samples, r) in zip(names, report):
        norm = "-" if r["update_norm"] is None else f"{r['update_norm']:.4f}"
        ratio = "-" if r["norm_to_median"] is None else f"{r['norm_to_median']:.2f}"
        layers = "-" if r["layer_norm_ratio"] is None else f"{r['layer_norm_ratio']:.2f}"
        cos = "-" if r["cosine_to_others"] is None else f"{r['cosine_to_others']:+.3f}"
        agree = "-" if r["agreement"] is None else f"{r['agreement']:+.3f}"
        flag = ("OUTLIER, dropped" if name in dropped else "OUTLIER") if r["outlier"] else ""
        print(f"  {name:<16} {samples:>8} {norm:>12} {ratio:>8} {layers:>7} {cos:>7} {agree:>10}  {r['agreement_with'] or '-':<26} "
              f"{flag}", flush=True)


# --- averaging ---------------------------------------------------------------------------------

def fedavg(models):
    """Sample-weighted mean of every weight array (strategies.fedavg: float64 accumulate, original dtype out)."""
    names = list(models[0]["weights"])
    averaged = strategies.fedavg([[m["weights"][k] for k in names] for m in models], [m["samples"] for m in models])
    return dict(zip(names, averaged))


@dataclass
class Method:
    """What --aggregation and --server-optimizer ask for, checked: the rule and its parameters, the server
    optimiser (a strategies.FedAvgM / FedAdam) or None. default: plain FedAvg without an optimiser, the
    aggregator's behaviour before issue 31 (its ledger entries carry neither "aggregation" nor "server_optimizer")."""
    rule: str = "fedavg"
    beta: float | None = None
    f: int | None = None
    m: int | None = None
    optimizer: object = None

    @property
    def default(self):
        return self.rule == "fedavg" and self.optimizer is None


def method_of(args):
    """The Method the flags ask for; a parameter flag without its rule or optimiser, or a bad value: AggregateError."""
    rule, name = args.aggregation, args.server_optimizer
    needs = {"--trim-beta": (args.trim_beta, rule == "trimmed-mean", "--aggregation trimmed-mean"),
             "--krum-f": (args.krum_f, rule == "krum", "--aggregation krum"),
             "--krum-m": (args.krum_m, rule == "krum", "--aggregation krum"),
             "--server-lr": (args.server_lr, name != "none", "--server-optimizer fedavgm or fedadam"),
             "--server-momentum": (args.server_momentum, name == "fedavgm", "--server-optimizer fedavgm")}
    for flag, (value, applies, what) in needs.items():
        if value is not None and not applies:
            raise AggregateError(f"{flag} needs {what}")
    method = Method(rule)
    try:
        if rule == "trimmed-mean":
            method.beta = DEFAULT_TRIM_BETA if args.trim_beta is None else args.trim_beta
            strategies.trim_count(1, method.beta)
        if rule == "krum":
            method.f = DEFAULT_KRUM_F if args.krum_f is None else args.krum_f
            method.m = DEFAULT_KRUM_M if args.krum_m is None else args.krum_m
            if method.f < 0 or method.m < 1:
                raise ValueError(f"--krum-f must be >= 0 and --krum-m >= 1, got {method.f} and {method.m}")
        lr = DEFAULT_SERVER_LR.get(name) if args.server_lr is None else args.server_lr
        if name == "fedavgm":
            method.optimizer = strategies.FedAvgM(
                lr, DEFAULT_SERVER_MOMENTUM if args.server_momentum is None else args.server_momentum)
        elif name == "fedadam":
            method.optimizer = strategies.FedAdam(lr)
    except ValueError as e:
        raise AggregateError(str(e)) from None
    if rule == "krum" and args.expect is not None and args.expect <= 2 * method.f + 2:
        raise AggregateError(f"--aggregation krum with --krum-f {method.f} needs more than {2 * method.f + 2} "
                             f"models, and --expect is {args.expect}")
    return method


def aggregate_models(method, models, names_of_files):
    """(averaged {name: array}, the ledger's "aggregation" record or None) of the kept models by method's rule."""
    if method.rule == "fedavg":
        return fedavg(models), None
    order = models[0]["order"]
    lists = [[m["weights"][k] for k in order] for m in models]
    try:
        if method.rule == "median":
            out, record = strategies.median(lists), {"rule": "median"}
        elif method.rule == "trimmed-mean":
            k = strategies.trim_count(len(lists), method.beta)
            out, record = strategies.trimmed_mean(lists, method.beta), {"rule": "trimmed-mean", "beta": method.beta,
                                                                        "trimmed": k}
            if k == 0:
                print(f"{PROG}: trimmed mean of {len(lists)} models with beta {method.beta:g} trims nothing "
                      f"(floor({method.beta:g} x {len(lists)}) = 0): a plain mean", flush=True)
        else:
            chosen = strategies.krum_select(lists, method.f, method.m)
            out = strategies.mean([lists[i] for i in chosen])
            record = {"rule": "krum", "f": method.f, "m": method.m, "selected": [names_of_files[i] for i in chosen]}
            print(f"{PROG}: krum (f={method.f}, m={method.m}) selected {', '.join(record['selected'])}", flush=True)
    except ValueError as e:
        raise AggregateError(f"--aggregation {method.rule}: {e}") from None
    return dict(zip(order, out)), record


# --- the server optimiser's state, rounds/r{n}-opt.npz ----------------------------------------------

def write_state(path, state):
    """Save an optimiser state ({slot: [arrays]}) as an .npz (a zip of .npy files "SLOT.INDEX.npy", read by
    np.load), atomically, with fixed zip time stamps: the same state always has the same bytes and sha256."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for slot in sorted(state):
                for i, array in enumerate(state[slot]):
                    with z.open(zipfile.ZipInfo(f"{slot}.{i:04d}.npy", date_time=STATE_DATE), "w") as f:
                        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def read_state(path, optimizer):
    """The {slot: [arrays]} write_state saved, with the optimiser's slots; ValueError when it is not one."""
    found = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            slot, _, index = key.partition(".")
            found.setdefault(slot, {})[int(index)] = z[key]
    if sorted(found) != sorted(optimizer.slots):
        raise ValueError(f"holds {sorted(found)}, not {optimizer.name}'s state {sorted(optimizer.slots)}")
    return {slot: [arrays[i] for i in range(len(arrays))] for slot, arrays in found.items()}


def previous_state(root, n, optimizer, start_digest):
    """(state, its ledger file name) that round n's optimiser step continues from: round n-1's, as its ledger
    entry records it (sha256 checked, as ledger.py verify does), when that round used the same optimiser and
    round n starts from that round's recorded aggregate; (None, None) to start afresh."""
    if n <= 1:
        return None, None
    prev = next((e for e in ledger_mod.load(root)["rounds"] if e.get("round") == n - 1), None)
    recorded = (prev or {}).get("server_optimizer") or {}
    if recorded.get("name") != optimizer.name:
        why = "no ledger entry" if prev is None else f"server optimizer {recorded.get('name') or 'none'}"
        print(f"{PROG}: round {n - 1} has {why}: {optimizer.name} starts from a fresh state", flush=True)
        return None, None
    name, digest = (recorded.get("state") or {}).get("file"), (recorded.get("state") or {}).get("sha256")
    path = Path(root) / str(name)
    if not name or not digest:
        raise ledger_mod.LedgerError(f"{ledger_mod.ledger_path(root)}: round {n - 1}'s server_optimizer records "
                                     "no state file and sha256")
    if not path.is_file():
        raise ledger_mod.LedgerError(f"{path}: recorded in the ledger (round {n - 1}) but missing; refusing to "
                                     f"continue {optimizer.name}")
    if sha256_file(path) != digest:
        raise ledger_mod.LedgerError(f"{path}: sha256 differs from the ledger's (round {n - 1}): the file was "
                                     f"changed or replaced; refusing to continue {optimizer.name}")
    if (prev.get("aggregate") or {}).get("sha256") != start_digest:
        raise AggregateError(f"{Path(root) / ledger_mod.round_file(n - 1)} is not the aggregate the ledger records "
                             f"for round {n - 1}: its {optimizer.name} state does not apply")
    try:
        return read_state(path, optimizer), name
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise AggregateError(f"{path}: not an optimizer state: {e}") from None


def server_step(method, root, n, start, start_digest, averaged, order):
    """Round n's optimiser step from start over the aggregate: (new weights {name: array}, the ledger's
    "server_optimizer" record without its "state", the new state)."""
    optimizer = method.optimizer
    if start is None:
        raise AggregateError(f"--server-optimizer {optimizer.name} needs the round's starting weights "
                             f"{Path(root) / ledger_mod.round_file(n - 1)} (the workers' init; see above)")
    state, state_from = previous_state(root, n, optimizer, start_digest)
    try:
        new, state = optimizer.step([start[k] for k in order], [averaged[k] for k in order], state)
    except ValueError as e:
        raise AggregateError(f"--server-optimizer {optimizer.name}: {e}") from None
    record = {"name": optimizer.name, **optimizer.params(), "state_from": state_from}
    print(f"{PROG}: {optimizer.name} step (" + ", ".join(f"{k} {v:g}" for k, v in optimizer.params().items())
          + f") from {'a fresh state' if state_from is None else state_from}", flush=True)
    return dict(zip(order, new)), record, state


def write_aggregate(savefile, template, averaged, models, paths, extra=None):
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
                **(extra or {}),
            }, replace=True)


def copy_atomic(source, target):
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def missing_names(paths, expect):
    """The {i}-model.h5 names of 0..expect-1 that did not arrive (when the inputs follow that naming)."""
    indexes = [WORKER_FILE.match(p.name) for p in paths]
    if expect is None or not all(indexes):
        return []
    present = {int(m.group(1)) for m in indexes}
    return [f"{i}-model.h5" for i in range(expect) if i not in present]


@dataclass
class Round:
    """One round: its inputs (the model files that came, what read_model made of them, their sha256 and the
    per-worker report), how many were expected, and the outcome derived from those once: which workers the
    average leaves out (dropped), which did not come (missing: their names when the {i}-model.h5 naming tells,
    shortfall: how many), and the averaged models (kept)."""
    n: int
    paths: list
    models: list
    digests: list
    report: list
    used: list  # per input: True when it is averaged (False: an outlier left out by --drop-outliers)
    expect: int | None  # --expect N, None without it
    min_workers: int | None
    start_digest: str | None  # sha256 of rounds/r{n-1}.h5 when the report was measured from it, else None
    dropped: list = field(init=False)
    missing: list = field(init=False)
    shortfall: int = field(init=False)

    def __post_init__(self):
        self.dropped = [p.name for p, u in zip(self.paths, self.used) if not u]
        self.missing = missing_names(self.paths, self.expect)
        self.shortfall = self.expect - len(self.paths) if self.expect is not None else 0

    @property
    def expected_workers(self):
        return self.expect if self.expect is not None else len(self.paths)

    @property
    def kept(self):
        """(models, paths) of the inputs the average uses."""
        return ([m for m, u in zip(self.models, self.used) if u],
                [p for p, u in zip(self.paths, self.used) if u])

    def mlk_attrs(self):
        """The aggregate's mlk_ attributes about the round's inputs (docs/CONTRACTS.md)."""
        unnamed = f"{self.shortfall} unnamed" if self.shortfall else ""
        return {"mlk_expected_workers": self.expected_workers,
                "mlk_missing": ",".join(self.missing) if self.missing else unnamed,
                "mlk_dropped": ",".join(self.dropped)}


def record_round(root, rnd, savefile, agg_started, aggregation=None, optimizer=None, state=None):
    """Keep round rnd.n (rounds/r{n}.h5 = the aggregate in savefile, rounds/r{n}/ = its inputs; with a server
    optimizer its state, rounds/r{n}-opt.npz) and write its ledger entry, which replaces any entry of round n or
    later (a re-run). The ledger is written last: an entry means every file it names is complete. aggregation
    (the rule's record) and optimizer (the optimiser's record) are None for the defaults, and then the entry
    has no "aggregation" / "server_optimizer" at all."""
    n, paths, models = rnd.n, rnd.paths, rnd.models
    rounds_dir = root / ledger_mod.ROUNDS_DIR
    kept_dir = rounds_dir / f"r{n}"
    kept_dir.mkdir(parents=True, exist_ok=True)
    for old in kept_dir.glob("*.h5"):  # a previous attempt at this round
        if old.name not in {p.name for p in paths}:
            old.unlink()
    for p in paths:
        copy_atomic(p, kept_dir / p.name)
    round_path = root / ledger_mod.round_file(n)
    copy_atomic(savefile, round_path)
    method = {}
    if aggregation is not None:
        method["aggregation"] = aggregation
    if optimizer is not None:
        state_path = root / ledger_mod.state_file(n)
        write_state(state_path, state)
        record = {k: v for k, v in optimizer.items() if k != "state_from"}
        method["server_optimizer"] = {**record, "state": {"file": ledger_mod.state_file(n),
                                                          "sha256": sha256_file(state_path)},
                                      "state_from": optimizer.get("state_from")}
    aggregated_at = time.time()
    starts = [m["attrs"].get("mlk_train_started") for m in models]
    starts = [float(t) for t in starts if isinstance(t, (int, float))]
    started = min(starts) if starts else None
    book = ledger_mod.load(root)
    book["rounds"] = [e for e in book["rounds"] if isinstance(e, dict) and e.get("round", 0) < n]
    book["rounds"].append({
        "round": n,
        "aggregate": {"file": ledger_mod.round_file(n), "sha256": sha256_file(round_path)},
        "start": {"file": ledger_mod.round_file(n - 1), "sha256": rnd.start_digest} if rnd.start_digest else None,
        "expected_workers": rnd.expected_workers,
        "min_workers": rnd.min_workers,
        "missing": rnd.shortfall,
        "missing_workers": rnd.missing,
        "workers": [{
            "file": p.name,
            "kept": f"{ledger_mod.ROUNDS_DIR}/r{n}/{p.name}",
            "sha256": digest,
            "samples": m["samples"],
            "data": m["attrs"].get("mlk_data"),
            "train_seconds": m["attrs"].get("mlk_train_seconds"),
            **r,
            "dropped": not u,
            "accuracy": None,
        } for p, m, digest, r, u in zip(paths, models, rnd.digests, rnd.report, rnd.used)],
        "dropped": rnd.dropped,
        "outlier_rule": OUTLIER_RULE,
        **method,
        "samples": sum(m["samples"] for m in rnd.kept[0]),
        "started_at": ledger_mod.iso(started),
        "aggregated_at": ledger_mod.iso(aggregated_at),
        "round_seconds": None if started is None else round(aggregated_at - started, 3),
        "aggregate_seconds": round(time.monotonic() - agg_started, 3),
        "test_accuracy": None,
        "test_loss": None,
        "evaluated_at": None,
    })
    ledger_mod.save(root, book)
    return round_path


def next_round(book):
    """The round the ledger expects next (its last round + 1; 1 for a new ledger), the live state's round until
    the models tell."""
    done = [e.get("round") for e in book["rounds"] if isinstance(e, dict) and isinstance(e.get("round"), int)]
    return max(done, default=0) + 1


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):  # usage error (exit 2, one line) or --help (exit 0)
        return args
    live = {}  # the round's live state beside the aggregate (docs/CONTRACTS.md "Live progress"), once known

    def progress(state, **fields):
        live.update(fields, state=state)
        write_progress(progress_path(args.savefile), live)

    try:
        directory = Path(args.dir)
        if not directory.is_dir():
            raise AggregateError(f"--dir {directory} is not a directory")
        savefile = Path(args.savefile)
        if not savefile.parent.is_dir():
            raise AggregateError(f"--savefile directory {savefile.parent} does not exist")
        root = savefile.parent
        exclude = savefile.resolve()
        min_workers = None
        if args.expect is None and (args.min_workers is not None or args.deadline is not None or args.round is not None):
            raise AggregateError("--min-workers, --deadline and --round need --expect N (how many workers the round has)")
        if args.round is not None and args.round < 1:
            raise AggregateError(f"--round must be >= 1, got {args.round}")
        method = method_of(args)
        book = ledger_mod.load(root)  # a damaged ledger is refused before anything is written
        live.update(kind="round", round=next_round(book), expected=args.expect, min_workers=args.expect)
        if args.expect is not None:
            if args.expect < 1:
                raise AggregateError(f"--expect must be >= 1, got {args.expect}")
            if args.timeout < 0:
                raise AggregateError(f"--timeout must be >= 0, got {args.timeout:g}")
            if args.deadline is not None and args.deadline < 0:
                raise AggregateError(f"--deadline must be >= 0, got {args.deadline:g}")
            min_workers = args.expect if args.min_workers is None else args.min_workers
            if isinstance(min_workers, float):
                min_workers = max(1, math.ceil(min_workers * args.expect))
            live["min_workers"] = min_workers
            if min_workers > args.expect:
                raise AggregateError(f"--min-workers {min_workers} is more than --expect {args.expect}")
            stale = None
            if min_workers < args.expect or args.round is not None:
                recorded = {w.get("sha256") for e in book["rounds"] if isinstance(e, dict)
                            for w in e.get("workers") or []}
                stale = StaleFilter(recorded, args.round)
            paths = wait_for_models(directory, args.expect, args.timeout, exclude, min_workers, args.deadline, stale,
                                    on_count=lambda present: progress("waiting", present=present))
        else:
            paths = model_files(directory, exclude)
        if not paths:
            raise AggregateError(f"no *.h5 models in {directory}")
        agg_started = time.monotonic()
        progress("averaging", present=len(paths))
        models, digests = [], []
        for p in paths:
            models.append(read_model(p))
            digests.append(sha256_file(p))
            print(f"{PROG}: read {p} ({models[-1]['samples']} samples, round {models[-1]['round']})",
                  flush=True)
        check_compatible(models, paths, args.allow_mixed_init)
        n = max(m["round"] for m in models)
        live["round"] = n
        start_path = root / ledger_mod.round_file(n - 1)
        start = read_start(start_path, models)
        report = worker_report(models, start, [p.name for p in paths])
        rnd = Round(n, paths, models, digests, report, used=[not (args.drop_outliers and r["outlier"]) for r in report],
                    expect=args.expect, min_workers=min_workers,
                    start_digest=sha256_file(start_path) if start is not None else None)
        dropped, missing = rnd.dropped, rnd.missing
        print_report([p.name for p in paths], [(m["samples"], r) for m, r in zip(models, report)], dropped)
        floor = min_workers if args.min_workers is not None else 1  # K given: the average needs K models
        if sum(rnd.used) < floor:
            raise AggregateError(f"--drop-outliers would leave {sum(rnd.used)} of {len(paths)} models, fewer than "
                                 f"{floor} (outliers: {', '.join(dropped)})")
        kept_models, kept_paths = rnd.kept
        averaged, aggregation = aggregate_models(method, kept_models, [p.name for p in kept_paths])
        optimizer = state = None
        if method.optimizer is not None:
            averaged, optimizer, state = server_step(method, root, n, start, rnd.start_digest, averaged,
                                                     kept_models[0]["order"])
        write_aggregate(savefile, kept_paths[0], averaged, kept_models, kept_paths, rnd.mlk_attrs())
        record_round(root, rnd, savefile, agg_started, aggregation, optimizer, state)
        progress("aggregated", missing=missing, flagged=[p.name for p, r in zip(paths, report) if r["outlier"]],
                 dropped=dropped)
    except (AggregateError, ledger_mod.LedgerError) as e:
        if live.get("state"):  # a round under way failed (a bad flag or --dir writes nothing)
            progress("failed", error=str(e))
        return error(PROG, e)
    total = sum(m["samples"] for m in kept_models)
    how = "average" if method.default else " + ".join(
        ([] if method.rule == "fedavg" else [method.rule]) + ([method.optimizer.name] if method.optimizer else []))
    print(f"{PROG}: wrote {savefile}: {how} of {len(kept_models)} models, {total} samples, "
          f"round {n}" + (f", {len(paths) - len(kept_models)} outlier(s) dropped" if dropped else "")
          + (f", missing: {', '.join(missing)}" if missing else ""), flush=True)
    print(f"{PROG}: kept as {root / ledger_mod.round_file(n)}; ledger {ledger_mod.ledger_path(root)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
