"""The promotion gate: a new model file is served only if it scores at least as well as the current one.

    server.py --model /mnt/aggregated-model.h5 --gate-data /mnt/data/test.npz [--gate-epsilon 0.005]

When `ModelHolder.refresh` (model.py) has loaded a replaced model file, it asks `Gate.admit(candidate,
current)` before swapping it in. The gate scores both models on the held-out evaluation set (a shard
`.npz`, keys `x` uint8 (n, 28, 28) and `y` uint8 (n,), as docs/CONTRACTS.md "Shards"), and admits the
candidate only if `accuracy(candidate) >= accuracy(current) - epsilon`. A rejected candidate is
dropped and the current model keeps serving; model.py then remembers the file's signature, so the same
file is not loaded or scored again until it changes.

Cost: one pass over the evaluation set in batches of 1000 through the model's compiled function, about
1 s for the 10 000 MNIST test images on 2 cores, once per candidate (the current model's accuracy is
kept from when it was admitted). It runs in the request that noticed the file change, like the load
itself; the other requests keep being served by the current model meanwhile.

Every gunicorn worker holds its own model and gate and decides by itself; same file, same data, same
arithmetic: every worker makes the same decision.

Without `--gate-data` there is no gate (every loadable file is served, as before). The first model
(nothing served yet) is always admitted (decision "initial", not counted as a promotion) and scored
for reference. If the evaluation set cannot be read
when a candidate arrives, the candidate is admitted ungated, and the reason is logged and reported.
"""

import logging
import threading
import time

from model import file_signature  # (inode, size, mtime_ns) of a file, as the reload uses

DEFAULT_EPSILON = 0.005  # half a percentage point: 50 of the 10 000 MNIST test images
BATCH = 1000

log = logging.getLogger("mlk.server")


class GateDataError(ValueError):
    """The evaluation set is missing or not a usable shard; the message says why."""


def load_eval_set(path):
    """A shard .npz -> (x float32 (n, 28, 28) in [0, 1], y int64 (n,)). Raises GateDataError."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise GateDataError(f"{path}: expected keys x and y, found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except GateDataError:
        raise
    except Exception as err:  # noqa: BLE001 - missing, truncated, not a zip, pickled objects ...
        raise GateDataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) == 0:
        raise GateDataError(f"{path}: x has shape {x.shape}, expected (n>0, 28, 28)")
    if y.shape != (len(x),):
        raise GateDataError(f"{path}: y has shape {y.shape}, expected ({len(x)},)")
    if x.dtype != np.uint8:
        raise GateDataError(f"{path}: x is {x.dtype}, expected uint8 (0-255)")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise GateDataError(f"{path}: y must hold integer labels 0-9")
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


def accuracy(model, x, y):
    """Fraction of x the model (anything with predict(float32 (n, 28, 28)) -> (n, 10)) labels as y."""
    import numpy as np

    correct = 0
    for start in range(0, len(x), BATCH):
        probabilities = model.predict(x[start:start + BATCH])
        correct += int((np.argmax(probabilities, axis=1) == y[start:start + BATCH]).sum())
    return correct / len(x)


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Gate:
    """Scores candidates on the evaluation set at `path`; see the module docstring.

    on_decision(decision_dict) is called after every decision (the app counts them in /metrics).
    """

    def __init__(self, path, epsilon=DEFAULT_EPSILON, on_decision=None):
        self.path = path
        self.epsilon = float(epsilon)
        self.on_decision = on_decision
        self.promotions = 0
        self.rejections = 0
        self.last_decision = None
        self._data = None  # (signature, x, y)
        self._scores = {}  # sha256 -> accuracy on the evaluation set of that signature
        self._lock = threading.Lock()

    def _eval_set(self):
        signature = file_signature(self.path)
        if signature is None:
            raise GateDataError(f"evaluation set {self.path} does not exist")
        if self._data is None or self._data[0] != signature:
            x, y = load_eval_set(self.path)
            self._data = (signature, x, y)
            self._scores = {}  # new data: earlier scores are not comparable
        return self._data[1], self._data[2]

    def score(self, model):
        """The model's accuracy on the evaluation set (cached by sha256). Raises GateDataError."""
        x, y = self._eval_set()
        if model.sha256 not in self._scores:
            self._scores[model.sha256] = accuracy(model, x, y)
        return self._scores[model.sha256]

    def admit(self, candidate, current):
        """True to serve `candidate` (a loaded model with .sha256 and .predict) instead of `current` (or None)."""
        with self._lock:
            started = time.perf_counter()
            decision = {"at": _now(), "epsilon": self.epsilon, "data": self.path,
                        "candidate": {"sha256": candidate.sha256, "accuracy": None},
                        "current": None if current is None else {"sha256": current.sha256, "accuracy": None}}
            try:
                decision["candidate"]["accuracy"] = self.score(candidate)
                if current is not None:
                    decision["current"]["accuracy"] = self.score(current)
            except GateDataError as err:
                decision.update(decision="initial" if current is None else "promoted", reason=f"ungated: {err}")
            else:
                cand = decision["candidate"]["accuracy"]
                if current is None:
                    decision.update(decision="initial", reason="first model: nothing to compare with")
                else:
                    cur = decision["current"]["accuracy"]
                    promote = cand >= cur - self.epsilon - 1e-9  # accuracies are k/n: no float rounding verdicts
                    decision.update(decision="promoted" if promote else "rejected",
                                    reason=f"{cand:.4f} {'>=' if promote else '<'} {cur:.4f} - {self.epsilon:g}")
            decision["seconds"] = round(time.perf_counter() - started, 3)
            if decision["decision"] == "promoted":
                self.promotions += 1
            elif decision["decision"] == "rejected":
                self.rejections += 1
            self.last_decision = decision
            current_text = "none" if current is None else (
                f"{current.sha256} accuracy {_fmt(decision['current']['accuracy'])}")
            log.warning("gate: %s candidate %s accuracy %s, current %s (%s; %.2fs)", decision["decision"],
                        candidate.sha256, _fmt(decision["candidate"]["accuracy"]), current_text,
                        decision["reason"], decision["seconds"])
            if self.on_decision is not None:
                self.on_decision(decision)
            return decision["decision"] != "rejected"

    def info(self, served=None):
        """What /api/model reports under "gate"."""
        served_accuracy = None
        if served is not None and self._data is not None:
            served_accuracy = self._scores.get(served.sha256)
        return {"data": self.path, "epsilon": self.epsilon, "promotions": self.promotions,
                "rejections": self.rejections, "served_accuracy": served_accuracy,
                "last_decision": self.last_decision}


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"
