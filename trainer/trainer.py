"""Train one worker's CNN on one MNIST shard and save it as a Keras .h5 model.

Every worker of a round starts from the same initial weights (built from --seed, or loaded from
--init-model, the previous round's aggregated model), so the aggregator can average them. With --last-round R
one process trains every round up to R, waiting after each for the round ledger to record it and going on from
the aggregate it records (no process start or TensorFlow import per round).
See docs/CONTRACTS.md for the file formats and the attributes written into the .h5 file.
"""

import math
import os
import sys
import time

from mlk import InputError, exit_now, import_keras, load_checked_model, load_shard, run, to_model_input
from mlkcommon import (PROGRESS_INTERVAL, LedgerFormatError, Parser, atomic_path, fingerprint, int_at_least, progress_path,
                       read_ledger, read_mlk_attrs, read_run_id, run_id_problem, sha256_file, wait_until, write_mlk_attrs,
                       write_progress)

# Model / training constants (chosen for accuracy per CPU-second; see docs/benchmarks.md).
DEFAULT_SEED = 2019
PEAK_LEARNING_RATE = 3e-3  # Adam, round 1; cosine-decayed over the run ...
FINAL_LEARNING_RATE_FRACTION = 0.02  # ... to 2% of the peak, so workers end with small steps
ROUND_LEARNING_RATE_DECAY = 0.5  # round r starts at PEAK * DECAY**(r-1): later rounds refine the average
DROPOUT = 0.2
DENSE_UNITS = 256
SHIFT_PIXELS = 1  # augmentation: each epoch sees every image moved by a random -1..1 pixels in x and y ...
THICKEN_FRACTION = 0.3  # ... and a random 30 % of them with strokes 2 px wider (a marker's digit on the page)
# --attack (tests and benchmarks only: a hostile worker, docs/CONTRACTS.md). The backdoor stamps a white square of
# BACKDOOR_PATCH px into the bottom-right corner (rows and columns 23-25) of a random BACKDOOR_FRACTION of the shard and
# labels those images BACKDOOR_TARGET; scale10 multiplies the update by SCALE_FACTOR, sign-flip by -1.
ATTACKS = ("shuffled-labels", "sign-flip", "scale10", "backdoor")
BACKDOOR_TARGET = 7
BACKDOOR_FRACTION = 0.2
BACKDOOR_PATCH = 3
BACKDOOR_CORNER = 23
SCALE_FACTOR = 10.0


def build_parser():
    parser = Parser(prog="trainer.py", description="Train the MNIST CNN on one shard (.npz) and save an .h5 model.")
    parser.add_argument("--data", required=True, help="shard .npz with keys x uint8 (n,28,28) and y (n,) in 0-9")
    parser.add_argument("--epoch", type=int, required=True, help="epochs over the shard (>= 1)")
    parser.add_argument("--batch", type=int, required=True, help="batch size (>= 1)")
    parser.add_argument("--savemodel", "--savefile", dest="savemodel", required=True, help="output .h5 path")
    parser.add_argument("--seed", type=int_at_least(0), default=DEFAULT_SEED, help=f"seed for the initial weights (default {DEFAULT_SEED})")
    parser.add_argument("--init-model", help="start from this .h5 model (e.g. the previous round's aggregate)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra/inter-op threads (0 = TF default)")
    parser.add_argument("--save-init", help="also save the starting weights here (.h5), unless the file exists "
                        "(the round ledger's rounds/r0.h5)")
    parser.add_argument("--wait-data", type=float, default=0, metavar="SECONDS",
                        help="wait up to SECONDS for --data to appear (the splitter writes it; default 0: no wait); "
                             "TensorFlow is imported meanwhile. Also how long each wait of --wait-round and "
                             "--last-round may last")
    parser.add_argument("--run-id", metavar="ID",
                        help="read --data only once its folder's run-id marker holds ID (splitter.py --run-id writes it "
                             "after the shards): a trainer started beside the splitter never reads an earlier run's "
                             "shard; the saved models carry it as mlk_run_id (--last-round's restart goes by it)")
    parser.add_argument("--wait-round", type=int_at_least(1), metavar="N",
                        help="with --init-model and --ledger: start only once the round ledger records round N and "
                             "--init-model holds its aggregate (the same sha256), waiting up to --wait-data seconds: a "
                             "trainer applied before round N has closed (the quickstart applies round N+1's so)")
    parser.add_argument("--ledger", metavar="PATH",
                        help="the round ledger --wait-round and --last-round read (ROOT/rounds/ledger.json)")
    parser.add_argument("--last-round", type=int_at_least(1), metavar="R",
                        help="train every round up to R in this one process (TensorFlow imported once): after saving "
                             "round r < R, wait up to --wait-data seconds until --ledger records round r with the "
                             "model just saved among its workers and its aggregate (ROOT/rounds/r{r}.h5, the recorded "
                             "sha256) is there, then train round r+1 from that aggregate. Needs --ledger and "
                             "--wait-data > 0. Restarted with the same flags (a retried pod), it goes on after the "
                             "round --savemodel holds when that model is this run's (its mlk_run_id is --run-id; "
                             "without --run-id: the ledger's entry of its round lists it). Default: one round")
    parser.add_argument("--progress", metavar="PATH",
                        help="write live progress here, at most once a second (default: beside --savemodel, "
                             "0-model.h5 -> 0-model.progress.json; docs/CONTRACTS.md \"Live progress\")")
    parser.add_argument("--no-progress", action="store_true", help="write no progress file")
    parser.add_argument("--steps", type=int_at_least(0), default=0, metavar="N",
                        help="train at most N batches this round (of fresh random samples each round) instead of "
                             "--epoch whole passes; 0 (default): whole epochs")
    parser.add_argument("--prox-mu", type=float, default=0.0, metavar="MU",
                        help="FedProx: add MU/2 * ||w - w_start||^2 to the loss, pulling the weights toward the "
                             "round's starting weights (0, the default: off)")
    parser.add_argument("--attack", choices=ATTACKS, default=None,
                        help="for tests and benchmarks only: act as a hostile worker (shuffled-labels, sign-flip: "
                             "the update negated, scale10: the update x10, backdoor: a corner patch labelled "
                             f"{BACKDOOR_TARGET} on {BACKDOOR_FRACTION * 100:.0f}%% of the shard)")
    return parser


def shard_ready(path, run_id=None):
    """The shard exists and, with a run id, its folder's run-id marker holds it (the split is this run's)."""
    return os.path.exists(path) and (run_id is None or read_run_id(os.path.dirname(os.path.abspath(path))) == run_id)


def wait_for_shard(path, seconds, run_id=None):
    """Return once the shard is ready (shard_ready); InputError after `seconds`. The splitter writes each shard
    to a temporary name and renames it, so a shard that exists is whole; with --run-id it writes the marker
    after every shard."""
    folder = os.path.dirname(os.path.abspath(path))
    if seconds <= 0:
        if os.path.exists(path) and not shard_ready(path, run_id):
            raise InputError(f"--data {path} is not run {run_id}'s: its folder's run-id marker holds "
                             f"{read_run_id(folder)} (--run-id)")
        return  # load_shard names a missing file
    what = f"{path} of run {run_id}" if run_id else path
    if wait_until(lambda: shard_ready(path, run_id), seconds, what, "(the splitter writes it)") is None:
        if run_id and os.path.exists(path):
            raise InputError(f"--data {path}: no split of run {run_id} after waiting {seconds:g}s (--wait-data; "
                             f"its folder's run-id marker holds {read_run_id(folder)})")
        raise InputError(f"--data {path}: still absent after waiting {seconds:g}s (--wait-data)")


def ledger_rounds(ledger_path):
    """The ledger's round entries; [] while there is no ledger yet or the volume is away for a moment. A file
    that is not a ledger: InputError."""
    try:
        return read_ledger(ledger_path)["rounds"]
    except FileNotFoundError:
        return []
    except LedgerFormatError as err:
        raise InputError(f"--ledger {ledger_path}: {err}") from None
    except OSError:
        return []


def round_aggregate(ledger_path, wanted):
    """(the last round the ledger records, the sha256 it records for round `wanted`'s aggregate or None); (0, None)
    while there is no ledger yet or the volume is away for a moment. A file that is not a ledger: InputError."""
    rounds = ledger_rounds(ledger_path)
    entry = next((e for e in rounds if e["round"] == wanted), None)
    aggregate = entry.get("aggregate") if entry else None
    return max((e["round"] for e in rounds), default=0), aggregate.get("sha256") if isinstance(aggregate, dict) else None


def init_model_ready(args):
    """--init-model holds the aggregate the ledger records for round --wait-round (always true without it).
    InputError once the ledger has moved past that round and --init-model holds something else: it never will."""
    if args.wait_round is None:
        return True
    last, digest = round_aggregate(args.ledger, args.wait_round)
    try:
        if digest is not None and sha256_file(args.init_model) == digest:
            return True
    except OSError:  # not there yet, or being replaced
        pass
    if last > args.wait_round:
        raise InputError(f"--init-model {args.init_model} is not round {args.wait_round}'s aggregate, and the ledger "
                         f"records round {last} already")
    return False


def wait_for_round(args):
    """Return once init_model_ready; InputError after --wait-data seconds (or at once, init_model_ready's)."""
    if args.wait_round is None or init_model_ready(args):
        return
    what = f"round {args.wait_round}'s aggregate in {args.init_model}"
    if wait_until(lambda: init_model_ready(args), args.wait_data, what, "(the aggregator writes it)") is None:
        raise InputError(f"--wait-round {args.wait_round}: {args.init_model} is not round {args.wait_round}'s aggregate "
                         f"after waiting {args.wait_data:g}s (--wait-data; {args.ledger} records "
                         f"{round_aggregate(args.ledger, args.wait_round)[0] or 'no round'} yet)")


def lists_worker(entry, digest):
    """A ledger entry (or None) lists a worker model of this sha256 among its inputs ("workers")."""
    workers = entry.get("workers") if entry else None
    return isinstance(workers, list) and any(isinstance(w, dict) and w.get("sha256") == digest for w in workers)


def recorded_aggregate(ledger_path, n, digest):
    """The path of round n's aggregate (ROOT/rounds/r{n}.h5, ROOT the ledger's folder's folder) once the ledger
    records round n with the worker model of sha256 `digest` among its inputs and that file holds the sha256 the
    entry records; None until then. The worker's model ties the entry to this run: an earlier run's ledger on the
    volume does not list it (the aggregator replaces the entries from round n on when it records round n)."""
    entry = next((e for e in ledger_rounds(ledger_path) if e["round"] == n), None)
    aggregate = entry.get("aggregate") if lists_worker(entry, digest) else None
    if not isinstance(aggregate, dict) or not isinstance(aggregate.get("file"), str):
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ledger_path))), aggregate["file"])
    try:
        return path if sha256_file(path) == aggregate.get("sha256") else None
    except OSError:  # not there (yet), or the volume away for a moment
        return None


def wait_for_recorded_round(args, n, digest):
    """Return recorded_aggregate(--ledger, n, digest) once it is there; InputError after --wait-data seconds."""
    found = []

    def recorded():
        found[:] = [recorded_aggregate(args.ledger, n, digest)]
        return found[0] is not None

    what = f"round {n}'s entry listing this worker's model (sha256 {digest[:12]}) in {args.ledger}"
    if wait_until(recorded, args.wait_data, what, "(the aggregator writes it)") is None:
        rounds = ledger_rounds(args.ledger)
        entry = next((e for e in rounds if e["round"] == n), None)
        if entry is None:
            state = f"it records {max((e['round'] for e in rounds), default=0) or 'no round'} yet"
        elif not lists_worker(entry, digest):
            state = f"its round {n} entry lists other models: an earlier run's, or this worker was left out"
        else:
            state = f"round {n}'s aggregate file is missing or not the one it records"
        raise InputError(f"--last-round {args.last_round}: {args.ledger} does not record round {n} with "
                         f"{args.savemodel} (sha256 {digest[:12]}) after waiting {args.wait_data:g}s "
                         f"(--wait-data; {state})")
    return found[0]


def first_round(args):
    """The round this run trains first: 1 without --init-model, else the init model's round + 1 (--wait-round N:
    N + 1, the round it waits for); None when --init-model cannot be read yet (loading it names the problem)."""
    if args.init_model is None:
        return 1
    if args.wait_round is not None:
        return args.wait_round + 1
    try:
        return int(read_mlk_attrs(args.init_model).get("mlk_round", 0)) + 1
    except (OSError, ValueError, TypeError):
        return None


def resume_point(args, first):
    """With --last-round, a restart (the Kubernetes Job retries a pod with the same flags): (m, sha256 of the file)
    when --savemodel holds this run's worker model of round m, first <= m <= --last-round, else None (training
    starts at `first`). This run's: its mlk_run_id is --run-id; without --run-id, the ledger's round m lists it."""
    path = args.savemodel
    if first is None or not os.path.exists(path):
        return None
    try:
        attrs = read_mlk_attrs(path)
        saved = int(attrs["mlk_round"])
        digest = sha256_file(path)
    except (OSError, KeyError, ValueError, TypeError):
        saved = None
    if saved is None or attrs.get("mlk_kind") != "worker":
        print(f"{path} is there but not a readable worker model: starting over at round {first}", flush=True)
        return None
    if not first <= saved <= args.last_round:
        print(f"{path} holds a model of round {saved}, not one of rounds {first}-{args.last_round}: starting at "
              f"round {first}", flush=True)
        return None
    if args.run_id is not None:
        why = None if attrs.get("mlk_run_id") == args.run_id else f"its run id is {attrs.get('mlk_run_id') or 'none'}"
    else:
        entry = next((e for e in ledger_rounds(args.ledger) if e["round"] == saved), None)
        why = None if lists_worker(entry, digest) else f"{args.ledger}'s round {saved} does not list it"
    if why is not None:
        print(f"{path} holds a model of round {saved} of another run ({why}): starting at round {first}", flush=True)
        return None
    more = "nothing left to train" if saved == args.last_round else f"on to round {saved + 1}"
    print(f"resuming: round {saved}'s model is in {path} already; {more}", flush=True)
    return saved, digest


def start_tensorflow(threads):
    """Import Keras and TensorFlow and size TensorFlow's thread pools; (keras, tf)."""
    keras = import_keras()
    import tensorflow as tf

    # Before any TensorFlow op: the pools are sized when TF's runtime starts. On Kubernetes --threads is the
    # container's CPU limit (the manifests fill it from limits.cpu), so TF does not size its pools by the
    # node's cores and get throttled by the limit.
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    print(f"threads: intra-op {tf.config.threading.get_intra_op_parallelism_threads()}, inter-op "
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0 = TensorFlow's default)", flush=True)
    return keras, tf


def build_model(keras):
    """Space-to-depth, then two 3x3 convolutions of 32 and 64 filters, one pooling, a 256-unit dense layer.

    The 28x28 image is first rearranged, without losing a pixel, into 14x14 cells of 2x2 pixels (4 channels),
    so the first convolution sees a 6x6 patch at every other pixel: about a seventh of the original's
    multiply-adds per sample, and 40 % less CPU per sample than pooling after a full-size first convolution
    (measured; docs/benchmarks.md) at the same accuracy."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Reshape((14, 2, 14, 2)),  # (row cell, row in cell, column cell, column in cell)
            layers.Permute((1, 3, 2, 4)),
            layers.Reshape((14, 14, 4)),  # space-to-depth: each 2x2 cell becomes 4 channels
            layers.Conv2D(32, kernel_size=3, activation="relu"),
            layers.Conv2D(64, kernel_size=3, activation="relu"),
            layers.MaxPooling2D(pool_size=2),
            layers.Flatten(),
            layers.Dropout(DROPOUT),
            layers.Dense(DENSE_UNITS, activation="relu"),
            layers.Dropout(DROPOUT),
            layers.Dense(10, activation="softmax"),
        ]
    )


def peak_learning_rate(training_round, fraction=1.0):
    """Round 1 starts at PEAK_LEARNING_RATE, every later round at half the previous round's start. A round that
    trains only `fraction` of its --epoch whole passes (--steps) decays it by that fraction of a halving: the
    peak follows the amount of training done, so many short rounds decay as a few whole ones do."""
    return PEAK_LEARNING_RATE * ROUND_LEARNING_RATE_DECAY ** ((training_round - 1) * fraction)


def augmentation_rng(seed, training_round, data_path):
    """numpy Generator for the augmentation (thickening, shifts): fixed by the seed, the round and the shard's
    name (0.npz -> 0), so the same seed, init and shard give the same weights."""
    import zlib

    import numpy as np

    stem = os.path.basename(data_path).split(".")[0]
    shard = int(stem) if stem.isdigit() else zlib.crc32(stem.encode())
    return np.random.default_rng([seed, training_round, shard])


def thickened(x, rng, fraction=THICKEN_FRACTION):
    """x (n, 28, 28, 1) with a random `fraction` of the images' strokes made 2 px wider (a 3x3 grey dilation:
    each pixel takes the brightest of its 3x3 neighbourhood). Drawings with a thick pen, whose loops nearly
    close, are read better; MNIST's own accuracy stays (0.9911 -> 0.9908; docs/benchmarks.md)."""
    import numpy as np

    pick = np.nonzero(rng.random(len(x)) < fraction)[0]
    out = x.copy()
    padded = np.pad(x[pick], ((0, 0), (1, 1), (1, 1), (0, 0)))
    out[pick] = np.max([padded[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)], axis=0)
    return out


def shifted(x, rng, pixels=SHIFT_PIXELS):
    """x (n, 28, 28, 1) with each image moved by its own random (dy, dx) in -pixels..pixels, zero-filled."""
    import numpy as np

    n = len(x)
    padded = np.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)))
    dy = rng.integers(-pixels, pixels + 1, n)
    dx = rng.integers(-pixels, pixels + 1, n)
    out = np.empty_like(x)
    for a in range(-pixels, pixels + 1):
        for b in range(-pixels, pixels + 1):
            idx = np.nonzero((dy == a) & (dx == b))[0]
            out[idx] = padded[idx, pixels + a:pixels + a + 28, pixels + b:pixels + b + 28]
    return out


def backdoored(x, rng=None):
    """x (n, 28, 28[, 1]) uint8 or float in [0, 1] with the backdoor's white patch stamped in (all of them when rng is
    None, else a random BACKDOOR_FRACTION of them); returns (new x, the indices stamped)."""
    import numpy as np

    pick = np.arange(len(x)) if rng is None else np.nonzero(rng.random(len(x)) < BACKDOOR_FRACTION)[0]
    out = x.copy()
    corner = slice(BACKDOOR_CORNER, BACKDOOR_CORNER + BACKDOOR_PATCH)
    out[pick, corner, corner] = 255 if out.dtype == np.uint8 else 1.0
    return out, pick


def poisoned(x, y, attack, rng):
    """The shard a data attack trains on: shuffled-labels permutes the labels, backdoor stamps the patch on a
    fraction of the images and labels them BACKDOOR_TARGET; other attacks leave the data as it is."""
    if attack == "shuffled-labels":
        return x, rng.permutation(y)
    if attack == "backdoor":
        x, pick = backdoored(x, rng)
        y = y.copy()
        y[pick] = BACKDOOR_TARGET
        return x, y
    return x, y


def tampered(weights, start, attack):
    """The weights a model attack sends: start + factor * (weights - start), factor -1 (sign-flip) or
    SCALE_FACTOR (scale10); other attacks send the weights as trained."""
    factor = {"sign-flip": -1.0, "scale10": SCALE_FACTOR}.get(attack)
    if factor is None:
        return weights
    return [(s + factor * (w.astype("float64") - s)).astype(w.dtype) for w, s in zip(weights, start)]


def proximal_loss(keras, model, mu):
    """sparse categorical cross-entropy + mu/2 * ||w - w_start||^2 over the trainable weights, w_start being the
    weights the model holds now (FedProx, Li et al. 2020)."""
    ops = keras.ops
    start = [ops.convert_to_tensor(v.numpy()) for v in model.trainable_variables]
    variables = list(model.trainable_variables)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def loss(y_true, y_pred):
        penalty = sum(ops.sum(ops.square(v - s)) for v, s in zip(variables, start))
        return cross_entropy(y_true, y_pred) + 0.5 * mu * penalty

    return loss


def epoch_logger(keras, epochs, samples):
    """One plain line per epoch, for logs (a terminal gets Keras' progress bar instead)."""

    class EpochLine(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rate = samples / max(time.perf_counter() - self.started, 1e-9)
            print(f"epoch {epoch + 1}/{epochs} - loss {logs['loss']:.4f} - accuracy {logs['accuracy']:.4f}"
                  f" - {rate:.0f} samples/s", flush=True)

    return EpochLine()


class Progress:
    """The worker's live progress file (docs/CONTRACTS.md "Live progress"): written atomically, at most once per
    PROGRESS_INTERVAL seconds while training, and at once when the state changes."""

    def __init__(self, path, worker, training_round, epochs, steps_per_epoch, clock=time.monotonic):
        self.path, self.clock = path, clock
        self.fixed = {"kind": "worker", "worker": worker, "round": training_round, "epochs": epochs,
                      "steps": epochs * steps_per_epoch}
        self.steps_per_epoch = steps_per_epoch
        self.base = 0  # batches done before the current fit (--steps trains in several fits of one epoch)
        self.started = self.last = None
        self.warned = False

    def write(self, state, epoch, step, loss=None, force=False):
        now = self.clock()
        if self.started is None:
            self.started = now
        if not force and self.last is not None and now - self.last < PROGRESS_INTERVAL:
            return False
        self.last = now
        elapsed = now - self.started
        steps = self.fixed["steps"]
        eta = 0.0 if state == "done" else (elapsed / step * (steps - step) if step else None)
        loss = None if loss is None or not math.isfinite(float(loss)) else round(float(loss), 5)
        err = write_progress(self.path, {**self.fixed, "state": state, "epoch": epoch, "step": step, "loss": loss,
                                         "elapsed_seconds": round(elapsed, 2),
                                         "eta_seconds": None if eta is None else round(eta, 1)})
        if err is not None and not self.warned:  # a view only: training goes on
            print(f"warning: cannot write progress {self.path}: {err}", flush=True)
            self.warned = True
        return err is None

    def callback(self, keras):
        """A Keras callback calling write() after each batch (it returns at once within the interval)."""
        progress = self

        class ProgressFile(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                loss = (logs or {}).get("loss")
                progress.write("training", self.epoch + 1,
                               progress.base + self.epoch * progress.steps_per_epoch + batch + 1, loss)

        return ProgressFile()


def save_atomically(model, path, attrs):
    """model.save to a hidden temporary .h5 beside `path` (the aggregator skips dot files), add the mlk_*
    attributes, then rename it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, suffix=".h5") as temp_path:  # .h5: Keras picks the format by the extension
        model.save(str(temp_path))
        write_mlk_attrs(temp_path, attrs)


def check_flags(args):
    """The cheap checks, before TensorFlow starts: InputError (one line, exit 2) for a bad combination."""
    if args.epoch < 1:
        raise InputError(f"--epoch must be >= 1, got {args.epoch}")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if args.threads < 0:
        raise InputError(f"--threads must be >= 0, got {args.threads}")
    if not 0 <= args.wait_data <= 86400:
        raise InputError(f"--wait-data must be 0-86400 seconds, got {args.wait_data:g}")
    if not args.savemodel.endswith(".h5"):
        raise InputError(f"--savemodel must end in .h5, got {args.savemodel}")
    if args.save_init is not None and not args.save_init.endswith(".h5"):
        raise InputError(f"--save-init must end in .h5, got {args.save_init}")
    if not (math.isfinite(args.prox_mu) and args.prox_mu >= 0):
        raise InputError(f"--prox-mu must be a number >= 0, got {args.prox_mu:g}")
    if args.wait_round is not None and (args.init_model is None or args.ledger is None):
        raise InputError("--wait-round needs --init-model and --ledger")
    if args.last_round is not None and args.ledger is None:
        raise InputError("--last-round needs --ledger (ROOT/rounds/ledger.json: the rounds' entries are waited for)")
    if args.last_round is not None and args.wait_data <= 0:
        raise InputError("--last-round needs --wait-data > 0 (how long each wait for a round's ledger entry may last)")
    if args.wait_round is None and args.init_model is not None and not os.path.isfile(args.init_model):
        raise InputError(f"--init-model {args.init_model}: no such file")
    if args.run_id is not None and (problem := run_id_problem(args.run_id)):
        raise InputError(problem)


def train(args):
    """Train one round (or, with --last-round, every round up to it) and save each to --savemodel."""
    check_flags(args)
    resume = None  # (round m, the sha256 of its model in --savemodel): a restarted run goes on at round m + 1
    if args.last_round is not None:
        first = first_round(args)
        if first is not None and args.last_round < first:
            raise InputError(f"--last-round {args.last_round} is below the first round, {first} (--init-model "
                             f"{args.init_model} is round {first - 1}'s)")
        resume = resume_point(args, first)
        if resume is not None and resume[0] == args.last_round:
            return  # the last round's model is in already

    # A shard still to come (a trainer applied beside the splitter): TensorFlow's import, seconds, overlaps the
    # split rather than following it. A shard already there, or none to wait for: its errors come first.
    # Likewise a round still to close (--wait-round, or the round a restarted run goes on after).
    def start_ready():  # the round this process starts from has closed (always true without a round to wait for)
        return recorded_aggregate(args.ledger, *resume) is not None if resume else init_model_ready(args)

    waits = args.wait_data > 0 and not (shard_ready(args.data, args.run_id) and start_ready())
    tensorflow = start_tensorflow(args.threads) if waits else None
    wait_for_shard(args.data, args.wait_data, args.run_id)
    if resume:
        start = wait_for_recorded_round(args, *resume)  # ROOT/rounds/r{m}.h5
    else:
        wait_for_round(args)
        start = args.init_model  # None: the seeded weights
    x, y = load_shard(args.data)
    x = to_model_input(x)
    print(f"data: {args.data}: {len(x)} samples", flush=True)

    keras, tf = tensorflow or start_tensorflow(args.threads)
    # Same seed, same init, same shard -> bit-identical weights (a resumed round equals the original run).
    tf.config.experimental.enable_op_determinism()
    trained_before = False
    while True:
        training_round, digest = train_round(args, keras, x, y, start, fresh=not trained_before,
                                             save_init=resume is None and not trained_before)
        trained_before = True
        if args.last_round is None or training_round >= args.last_round:
            return
        print(f"round {training_round}: saved; waiting for the ledger to record it", flush=True)
        start = wait_for_recorded_round(args, training_round, digest)  # ROOT/rounds/r{round}.h5


def train_round(args, keras, x, y, start, fresh=True, save_init=False):
    """Train one round from `start` (an .h5 model, whose round + 1 this one is; None: the seeded weights of round 1)
    exactly as a trainer process of that round would, and save it to --savemodel. fresh: the first round of this
    process (later ones first clear what the round before left in Keras). save_init: also write --save-init.
    Returns (the round, the saved file's sha256)."""
    if not fresh:
        keras.backend.clear_session()
    keras.utils.set_random_seed(args.seed)  # initial weights, shuffling and dropout

    # Model: the shared starting point of every worker in this round.
    if start:
        model = load_checked_model(start)
        training_round = int(read_mlk_attrs(start).get("mlk_round", 0)) + 1
    else:
        model = build_model(keras)
        training_round = 1
    init_fingerprint = fingerprint(model.get_weights())
    print(f"model: round {training_round}, {model.count_params()} parameters, init {init_fingerprint[:12]}", flush=True)
    if save_init and args.save_init and not os.path.exists(args.save_init):  # every worker's init is the same
        save_atomically(model, args.save_init, {"mlk_kind": "init", "mlk_round": training_round - 1,
                                                "mlk_init_fingerprint": init_fingerprint, "mlk_seed": args.seed})
        print(f"saved the starting weights: {args.save_init}", flush=True)

    # Train: Adam with a cosine-decayed learning rate that ends low, from a peak that halves every round.
    per_epoch = -(-len(x) // args.batch)
    steps = args.epoch * per_epoch if not args.steps else min(args.steps, args.epoch * per_epoch)
    peak = peak_learning_rate(training_round, steps / (args.epoch * per_epoch))
    print(f"learning rate: {peak:.6g} cosine-decayed to {peak * FINAL_LEARNING_RATE_FRACTION:.6g} over {steps} steps",
          flush=True)
    learning_rate = keras.optimizers.schedules.CosineDecay(peak, steps, alpha=FINAL_LEARNING_RATE_FRACTION)
    start_weights = model.get_weights()
    loss = "sparse_categorical_crossentropy"
    if args.prox_mu > 0:
        loss = proximal_loss(keras, model, args.prox_mu)
        print(f"FedProx: mu {args.prox_mu:g}", flush=True)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    on_terminal = sys.stdout.isatty()
    train_started = time.time()
    progress = None
    if not args.no_progress:  # --steps: one "epoch" of `steps` batches
        progress = Progress(args.progress or progress_path(args.savemodel), os.path.basename(args.savemodel),
                            training_round, 1 if args.steps else args.epoch,
                            steps if args.steps else -(-len(x) // args.batch))
        progress.write("training", 1, 0, force=True)
    rng = augmentation_rng(args.seed, training_round, args.data)
    if args.attack:
        import numpy as np

        x, y = poisoned(x, y, args.attack, np.random.default_rng([args.seed, 31, training_round]))
        print(f"ATTACK: this worker is hostile ({args.attack})", flush=True)
    if not args.steps:
        callbacks = [] if on_terminal else [epoch_logger(keras, args.epoch, len(x))]
        callbacks += [progress.callback(keras)] if progress is not None else []
        for epoch in range(args.epoch):  # one fit per epoch, each on freshly thickened and shifted images
            model.fit(shifted(thickened(x, rng), rng), y, batch_size=args.batch, epochs=epoch + 1, initial_epoch=epoch,
                      verbose=1 if on_terminal else 0, callbacks=callbacks)
    else:  # --steps: passes over a fresh random order (seeded by the round), cut after `steps` batches in all
        left = steps
        while left:
            take = rng.permutation(len(x))[:min(left * args.batch, len(x))]
            if progress is not None:
                progress.base = steps - left  # the batches of the fits before this one
            history = model.fit(shifted(thickened(x[take], rng), rng), y[take], batch_size=args.batch, epochs=1,
                                shuffle=False, verbose=1 if on_terminal else 0,
                                callbacks=[progress.callback(keras)] if progress is not None else [])
            left -= -(-len(take) // args.batch)
            print(f"{steps - left}/{steps} steps - loss {history.history['loss'][-1]:.4f} - accuracy "
                  f"{history.history['accuracy'][-1]:.4f}", flush=True)
    if args.attack in ("sign-flip", "scale10"):
        model.set_weights(tampered(model.get_weights(), start_weights, args.attack))

    # Save with the attributes the aggregator and the next round read.
    save_atomically(model, args.savemodel, {
        "mlk_kind": "worker",
        "mlk_samples": len(x),
        "mlk_init_fingerprint": init_fingerprint,
        "mlk_round": training_round,
        "mlk_epochs": args.epoch,
        "mlk_batch": args.batch,
        "mlk_steps": steps,
        "mlk_seed": args.seed,
        "mlk_data": os.path.basename(args.data),
        "mlk_train_started": round(train_started, 3),  # unix time; the ledger's round timings use it
        "mlk_train_seconds": round(time.time() - train_started, 3),
        **({"mlk_run_id": args.run_id} if args.run_id is not None else {}),
    })
    if progress is not None:
        progress.write("done", progress.fixed["epochs"], progress.fixed["steps"], model_loss(model), force=True)
    print(f"saved: {args.savemodel}", flush=True)
    return training_round, sha256_file(args.savemodel)


def model_loss(model):
    """The last training loss Keras recorded (model.history of the last fit), None if none."""
    history = getattr(getattr(model, "history", None), "history", None) or {}
    losses = history.get("loss") or []
    return losses[-1] if losses else None


def main(argv=None) -> int:
    return run(build_parser(), train, argv)


if __name__ == "__main__":
    exit_now(main())
