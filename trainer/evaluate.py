"""The accuracy test: evaluate a .h5 model on the MNIST test shard.

Prints the loss and accuracy, then a last stdout line of JSON {"loss": ..., "accuracy": ...}.
With --ledger ROOT/rounds/ledger.json it also fills in the round ledger (docs/CONTRACTS.md, "Round ledger"):
the test accuracy of every round's aggregate and each worker's accuracy before averaging, where missing,
and draws the training history, ROOT/rounds/history.png.
With --wait-round N it can start beside round N's trainers: it scores the rounds already recorded while it
waits, and the workers' models of ROOT/model as they land (writing nothing: the aggregator is the ledger's
only writer until round N is in), so that round N's aggregate is most of what is left once it is recorded.
"""

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mlk import InputError, exit_now, load_checked_model, load_shard, run, to_model_input
from mlkcommon import LedgerFormatError, Parser, atomic_path, read_ledger, sha256_file, utc_iso, write_bytes_atomic

DEFAULT_DATA = "/mnt/data/test.npz"  # the test shard on the shared volume (docs/CONTRACTS.md)
HISTORY_PLOT = "history.png"
DEFAULT_WAIT = 4200  # 6-aggregator.yaml's activeDeadlineSeconds: no aggregate comes later than that
POLL_SECONDS = 0.5  # as the aggregator polls for models


def build_parser():
    parser = Parser(prog="evaluate.py", description="Test a .h5 MNIST model; last stdout line is JSON loss/accuracy.")
    parser.add_argument("--modelpath", help="model .h5 to test (required unless --ledger is given)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"test .npz with keys x, y (default {DEFAULT_DATA})")
    parser.add_argument("--batch", type=int, default=1000, help="prediction batch size (default 1000; "
                        "it changes the speed, not the result)")
    parser.add_argument("--ledger", help="ROOT/rounds/ledger.json: fill in every round's test accuracy and each "
                                         "worker's, and draw ROOT/rounds/history.png")
    parser.add_argument("--wait-round", type=int, metavar="N", help="with --ledger: first wait until the ledger "
                        "records round N (its aggregate written), scoring the rounds before it meanwhile; the "
                        "result is round N's aggregate")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help=f"how long --wait-round waits (default {DEFAULT_WAIT:g}: the aggregator Job's deadline)")
    return parser


class Scorer:
    """Test accuracy and loss of many .h5 models on one test set, cheaply: the first model of an architecture is
    loaded and checked in full; later files with the same model_config only have their weights read into it, so
    its predict function is traced once (a ledger holds a dozen such models). Loss and accuracy are computed
    from the predicted probabilities as Keras' sparse categorical cross-entropy and accuracy do."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch
        self.models = {}  # model_config text -> a loaded model whose weights are swapped per file
        self.scores = {}  # sha256 -> (loss, accuracy)

    def __call__(self, path):
        """(loss, accuracy) of the file; a file with the same bytes as one scored before is not scored again."""
        try:
            digest = sha256_file(path)
        except OSError:
            return self.score(path)  # which names the problem
        if digest not in self.scores:
            self.scores[digest] = self.score(path)
        return self.scores[digest]

    def prescore(self, path):
        """Score a file that may be replaced meanwhile (a worker's model as it lands in ROOT/model): its bytes are
        read once and scored from a private copy, so the figure is filed under the sha256 of what was scored; the
        ledger's copy of it (rounds/r{n}/) is then not scored again. A file that does not load is left to the
        ledger's pass, which names the problem."""
        try:
            data = Path(path).read_bytes()
        except OSError:
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.scores:
            return
        with tempfile.NamedTemporaryFile(suffix=".h5") as copy:
            copy.write(data)
            copy.flush()
            try:
                self.scores[digest] = self.score(copy.name)
            except Exception:  # noqa: BLE001 (any failure: not a figure; the ledger's pass reports it)
                pass

    def score(self, path):
        import h5py

        path = str(path)
        config = None
        try:
            with h5py.File(path, "r") as f:
                config = f.attrs.get("model_config")
        except OSError:
            pass  # not HDF5: load_checked_model names the problem
        model = self.models.get(config) if config is not None else None
        if model is None:
            model = load_checked_model(path)
            if config is not None:
                self.models[config] = model
        else:
            try:
                model.load_weights(path)
            except Exception as err:  # a damaged weights group in a file whose config matched
                raise InputError(f"{path}: cannot read its weights ({str(err).strip().splitlines()[0]})") from None
        probs = model.predict(self.x, batch_size=self.batch, verbose=0)
        picked = np.clip(probs[np.arange(len(self.y)), self.y], 1e-7, 1.0)  # Keras' epsilon
        return float(np.mean(-np.log(picked))), float(np.mean(probs.argmax(axis=1) == self.y))


def load_ledger(path):
    """mlkcommon.read_ledger, its errors as this program's one-line InputError."""
    try:
        return read_ledger(path)
    except FileNotFoundError:
        raise InputError(f"--ledger {path}: no such file") from None
    except LedgerFormatError as err:
        raise InputError(f"--ledger {path}: {err}") from None


def checked(root, name, digest):
    """ROOT/name, after checking its sha256 is the ledger's (an accuracy for a replaced file would be a lie)."""
    path = root / name
    if not path.is_file():
        raise InputError(f"{path}: recorded in the ledger but missing")
    if digest and sha256_file(path) != digest:
        raise InputError(f"{path}: sha256 differs from the ledger's (the file was changed or replaced)")
    return path


def fill_ledger(ledger_path, score, write=True):
    """Evaluate every aggregate and kept worker model the ledger lacks an accuracy for; write it back atomically
    after each round (an interrupted accuracy test keeps what it measured). Returns the ledger. write=False:
    score only (Scorer keeps the figures), for while the aggregator may still write the ledger."""
    ledger_path = Path(ledger_path)
    root = ledger_path.parent.parent  # ROOT/rounds/ledger.json
    ledger = load_ledger(ledger_path)
    say = print if write else (lambda *args, **kwargs: None)  # printed once, when written
    for entry in ledger["rounds"]:
        changed = False
        if entry.get("test_accuracy") is None and entry.get("aggregate"):
            path = checked(root, entry["aggregate"]["file"], entry["aggregate"].get("sha256"))
            entry["test_loss"], entry["test_accuracy"] = score(path)
            entry["evaluated_at"] = utc_iso()
            changed = True
            say(f"round {entry['round']}: test accuracy {entry['test_accuracy']:.4f} ({path})", flush=True)
        for worker in entry.get("workers") or []:
            if worker.get("accuracy") is None and worker.get("kept"):
                path = checked(root, worker["kept"], worker.get("sha256"))
                worker["accuracy"] = score(path)[1]
                changed = True
                say(f"round {entry['round']}: worker {worker.get('file')}: accuracy {worker['accuracy']:.4f}"
                    f"{' (outlier)' if worker.get('outlier') else ''}", flush=True)
        if changed and write:
            write_bytes_atomic(ledger_path, (json.dumps(ledger, indent=1) + "\n").encode())
    return ledger


def plot_history(ledger, out):
    """The training history: aggregate accuracy per round with each worker's before averaging (top), and each
    round's wall time (bottom). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [e for e in ledger["rounds"] if e.get("test_accuracy") is not None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    xs = [e["round"] for e in rounds]
    top.plot(xs, [e["test_accuracy"] for e in rounds], "o-", color="black", linewidth=2,
             label="aggregate (after averaging)", zorder=3)
    names = sorted({w["file"] for e in rounds for w in e.get("workers") or []})
    for k, name in enumerate(names):
        points = [(e["round"], w) for e in rounds for w in e.get("workers") or []
                  if w["file"] == name and w.get("accuracy") is not None]
        if not points:
            continue
        offset = (k - (len(names) - 1) / 2) * 0.06
        top.plot([r + offset for r, _ in points], [w["accuracy"] for _, w in points], "s", alpha=0.8,
                 label=f"worker {name.removesuffix('-model.h5')} (before averaging)")
        flagged = [(r + offset, w["accuracy"]) for r, w in points if w.get("outlier")]
        if flagged:
            top.plot(*zip(*flagged), "x", color="red", markersize=12, label=None if k else "flagged outlier")
    top.set_ylabel("test accuracy")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower right")
    top.set_title("Training history (rounds/ledger.json)")
    seconds = [e.get("round_seconds") or 0 for e in rounds]
    bottom.bar(xs, seconds, color="tab:gray", width=0.5)
    for r, s in zip(xs, seconds):
        bottom.annotate(f"{s:.0f} s", (r, s), ha="center", va="bottom", fontsize=8)
    bottom.set_ylabel("round wall time (s)")
    bottom.set_xlabel("round")
    bottom.set_xticks(xs)
    bottom.set_ylim(0, max(seconds + [1]) * 1.25)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def recorded_round(ledger_path):
    """The ledger's last round, 0 while there is no ledger yet."""
    if not Path(ledger_path).exists():
        return 0
    rounds = load_ledger(ledger_path)["rounds"]
    return max((e.get("round") or 0 for e in rounds), default=0)


def wait_round(args, score):
    """Until the ledger records round --wait-round, scoring (not writing) what it already records meanwhile and the
    workers' models as they land. A volume away for a moment (an NFS server restarting) is looked at again."""
    deadline = time.monotonic() + args.wait
    models = Path(args.ledger).parent.parent / "model"  # ROOT/model: the trainers' models (docs/CONTRACTS.md)
    last, scored, seen, said = 0, 0, {}, False
    while True:
        try:
            last = recorded_round(args.ledger)  # a ledger that is not one: InputError, at once
        except OSError as err:
            print(f"cannot read {args.ledger} ({err.strerror or err}); looking again", flush=True)
        if last >= args.wait_round:
            break
        if not said:
            print(f"waiting for round {args.wait_round} in {args.ledger} (it records {last or 'none'} yet)",
                  flush=True)
            import matplotlib.pyplot  # noqa: F401 (plot_history's, imported while waiting)

            said = True
        if last > scored:  # a round came in: score it now, so that round N's is all that is left at the end
            try:
                fill_ledger(args.ledger, score, write=False)
                scored = last
            except (OSError, InputError):
                pass  # again at the next look; the pass after the wait reports what stays wrong
        try:
            landed = sorted(models.glob("[!.]*-model.h5"))  # not the trainers' hidden temporary files
        except OSError:
            landed = []
        for path in landed:
            try:
                stat = path.stat()
            except OSError:
                continue
            if seen.get(path.name) != (stat.st_ino, stat.st_size, stat.st_mtime_ns):
                seen[path.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                score.prescore(path)
        if time.monotonic() >= deadline:
            raise InputError(f"--ledger {args.ledger}: round {args.wait_round} not recorded within {args.wait:g}s "
                             f"(--wait; the last recorded round is {last or 'none'})")
        time.sleep(POLL_SECONDS)
    print(f"round {last} recorded", flush=True)


def evaluate(args):
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if args.modelpath is None and args.ledger is None:
        raise InputError("the following arguments are required: --modelpath (or --ledger)")
    if args.wait_round is not None and (args.ledger is None or args.wait_round < 1):
        raise InputError("--wait-round needs --ledger and a round >= 1")
    if not 0 <= args.wait <= 86400:
        raise InputError(f"--wait must be 0-86400 seconds, got {args.wait:g}")
    if args.ledger is not None and args.wait_round is None:
        load_ledger(args.ledger)  # a bad ledger is reported before TensorFlow starts
    elif args.ledger is not None:
        try:
            if Path(args.ledger).exists():
                load_ledger(args.ledger)  # likewise, if there is one yet
        except OSError as err:  # a volume away for a moment (an NFS server restarting): the wait looks again
            print(f"cannot read {args.ledger} ({err.strerror or err}); looking again while waiting", flush=True)
    x, y = load_shard(args.data)
    x = to_model_input(x)
    score = Scorer(x, y, args.batch)
    result = None
    if args.wait_round is not None:
        wait_round(args, score)
    if args.ledger is not None:
        ledger = fill_ledger(args.ledger, score)
        out = Path(args.ledger).parent / HISTORY_PLOT
        plot_history(ledger, out)
        print(f"history: {args.ledger}, plot {out}", flush=True)
        done = [e for e in ledger["rounds"] if e.get("test_accuracy") is not None]
        if done and (args.modelpath is None or Path(args.modelpath).is_file() and
                     sha256_file(args.modelpath) == (done[-1].get("aggregate") or {}).get("sha256")):
            result = (done[-1]["test_loss"], done[-1]["test_accuracy"])  # the same bytes: already measured
    if args.modelpath is not None and result is None:
        result = score(args.modelpath)
    if result is None:
        raise InputError(f"--ledger {args.ledger}: no rounds recorded yet")
    loss, accuracy = result
    print(f"Test samples: {len(x)}")
    print(f"Test loss: {loss:.4f}")
    print(f"Test accuracy: {accuracy:.4f}")
    print(json.dumps({"loss": loss, "accuracy": accuracy}), flush=True)


def main(argv=None) -> int:
    return run(build_parser(), evaluate, argv)


if __name__ == "__main__":
    exit_now(main())
