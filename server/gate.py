"""The promotion gate: a new model file is served only if it scores at least as well as the current one.

    server.py --model /mnt/aggregated-model.h5 --gate-data /mnt/data/test.npz [--gate-epsilon 0.005]
              [--gate-state /mnt/gate]

When `ModelHolder.refresh` (model.py) has loaded a replaced model file, it asks `Gate.choose(candidate,
current)` which model to serve. The gate scores both models on the held-out evaluation set (a shard
`.npz`, keys `x` uint8 (n, 28, 28) and `y` uint8 (n,), as docs/CONTRACTS.md "Shards"), and admits the
candidate only if `accuracy(candidate) >= accuracy(current) - epsilon`. A rejected candidate is
dropped and the current model keeps serving; model.py then remembers the file's signature, so the same
file is not loaded or scored again until it changes.

Cost: one pass over the evaluation set in batches of 1000 through the model's compiled function, about
1 s for the 10 000 MNIST test images on 2 cores, once per candidate (the current model's accuracy is
kept from when it was admitted). It runs in the request that noticed the file change, like the load
itself; the other requests keep being served by the current model meanwhile.

Without `--gate-data` there is no gate (every loadable file is served, as before). The first model
(nothing served yet) is always admitted (decision "initial", not counted as a promotion) and scored
for reference. If the evaluation set cannot be read
when a candidate arrives, the candidate is admitted ungated, and the reason is logged and reported.

One decision for every worker, pod and replica (`--gate-state DIR`, on the volume they share). Each
gunicorn worker still holds its own model and gate, but the admitted model is kept in DIR, so a restarted
worker, a new pod or a second replica cannot serve a file the gate rejected:

- DIR/models/<sha256>.h5: a copy of each admitted model, the very bytes that were hashed and loaded
  (model.read_model_file); DIR/admitted.json: the record of the last admission, {"format": "mlk-gate/1",
  "sha256", "accuracy" (null when ungated), "data", "epsilon", "at", "model": "models/<sha256>.h5"}.
  Both written to a temporary name, then renamed; the newest KEEP copies are kept, and always the one the
  record names.
- Start (nothing served yet): a usable record (valid, its copy there with that sha256) gives the first
  model (decision "restored", not counted as a promotion); the file is then a candidate against it, unless
  it holds the same bytes. No record: the file is "initial", as without DIR, and recorded.
- Every admission (initial or promoted) writes the record. Before each decision the record is read again:
  if it names the candidate, another worker or replica admitted these bytes already: promoted, not scored
  again. If it names a model that is neither the current one nor the candidate, another one moved on while
  this worker did not look: that recorded model (loaded from its copy) is what the candidate is compared
  with, and what serves if the candidate is rejected.
- A record that is unreadable, malformed, or whose copy is missing or has other bytes is logged once and
  ignored (decisions as without DIR; the next admission writes a good one). DIR not writable: the decision
  holds in this worker, a warning is logged once, and `info()["state_error"]` says why.

Decisions are deterministic (same file, same data, same arithmetic), and whoever decides first records it,
so every worker of every replica ends up serving the same model. The record is consulted at start and at
each decision, i.e. whenever the model file changes; nothing polls it in between.
"""

import json
import logging
import os
import re
import tempfile
import threading
import time

from mlkcommon import sha256_file, utc_iso, write_bytes_atomic
from model import LoadedModel, file_signature, read_model_file  # (file_signature: as the reload uses)

DEFAULT_EPSILON = 0.005  # half a percentage point: 50 of the 10 000 MNIST test images
BATCH = 1000
STATE_FORMAT = "mlk-gate/1"
KEEP = 3  # admitted model copies kept in DIR/models (the newest; and always the one the record names)
SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("mlk.server")


class GateDataError(ValueError):
    """The evaluation set is missing or not a usable shard; the message says why."""


class GateStateError(ValueError):
    """The record in --gate-state cannot be used (unreadable, malformed, its copy missing or other bytes)."""


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


# ------------------------------------------------------------------------------- --gate-state DIR


def check_state_dir(directory):
    """None if DIR and DIR/models exist or can be created, and a file can be written in each; else a one-line
    reason. server.py checks this at start, so a read-only or wrong path fails there, not at the first
    decision."""
    try:
        os.makedirs(os.path.join(directory, "models"), exist_ok=True)
        for folder in (directory, os.path.join(directory, "models")):
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".mlk-probe-"):
                pass
    except OSError as err:
        return f"cannot write to {directory}: {err.strerror or err}"
    return None


class GateState:
    """DIR of --gate-state: the record of the admitted model and the copies of admitted models."""

    def __init__(self, directory):
        self.directory = directory
        self.record_path = os.path.join(directory, "admitted.json")
        self.models_dir = os.path.join(directory, "models")

    def copy_path(self, sha256):
        return os.path.join(self.models_dir, f"{sha256}.h5")

    def read(self):
        """The record (a dict), or None when there is none. Raises GateStateError when it is unreadable or
        malformed, or its copy is missing or holds other bytes: a record is only worth following if the
        model it names can be loaded."""
        try:
            with open(self.record_path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise GateStateError(f"cannot read {self.record_path}: {err.strerror or err}") from None
        try:
            record = json.loads(text)
        except ValueError as err:
            raise GateStateError(f"{self.record_path} is not JSON ({err})") from None
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise GateStateError(f"{self.record_path} is not a {STATE_FORMAT} record")
        sha256 = record.get("sha256")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256) or record.get("model") != f"models/{sha256}.h5":
            raise GateStateError(f"{self.record_path}: \"sha256\" must be 64 hex digits and \"model\" "
                                 "models/<sha256>.h5")
        try:
            actual = sha256_file(self.copy_path(sha256))
        except OSError as err:
            raise GateStateError(f"{self.record_path} names {record['model']}, which cannot be read "
                                 f"({err.strerror or err})") from None
        if actual != sha256:
            raise GateStateError(f"{self.record_path} names {record['model']}, whose sha256 is {actual}")
        return record

    def save(self, content, sha256, accuracy, data, epsilon):
        """Keep `content` (an admitted model's bytes, whose sha256 is `sha256`) and record it as admitted.
        The copy goes first, so a record never names a copy that is not there yet. Raises OSError."""
        os.makedirs(self.models_dir, exist_ok=True)
        write_bytes_atomic(self.copy_path(sha256), content)  # same name, same bytes: concurrent writers agree
        record = {"format": STATE_FORMAT, "sha256": sha256, "accuracy": accuracy, "data": data,
                  "epsilon": epsilon, "at": utc_iso(), "model": f"models/{sha256}.h5"}
        write_bytes_atomic(self.record_path, (json.dumps(record, indent=2) + "\n").encode())
        self.prune(sha256)
        return record

    def prune(self, keep):
        """Delete all but the KEEP newest copies; never `keep` nor the one the record names now (another
        worker may have written it since)."""
        kept = {f"{keep}.h5"}
        try:
            with open(self.record_path, "rb") as f:
                kept.add(f"{json.loads(f.read())['sha256']}.h5")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        copies = []
        for name in os.listdir(self.models_dir):
            if name.endswith(".h5") and SHA256.fullmatch(name[:-3]):
                try:
                    copies.append((os.stat(os.path.join(self.models_dir, name)).st_mtime_ns, name))
                except FileNotFoundError:
                    pass  # pruned by another worker meanwhile
        for _, name in sorted(copies, reverse=True)[KEEP:]:
            if name not in kept:
                try:
                    os.unlink(os.path.join(self.models_dir, name))
                except FileNotFoundError:
                    pass


# ------------------------------------------------------------------------------------------ gate


class Gate:
    """Scores candidates on the evaluation set at `path`; see the module docstring.

    on_decision(decision_dict) is called after every decision (the app counts them in /metrics).
    state: the --gate-state directory, or None (decisions live in this process only).
    """

    def __init__(self, path, epsilon=DEFAULT_EPSILON, on_decision=None, state=None):
        self.path = path
        self.epsilon = float(epsilon)
        self.on_decision = on_decision
        self.state = GateState(state) if state else None
        self.state_error = None  # why the last admission could not be saved in `state`, or None
        self.promotions = 0
        self.rejections = 0
        self.last_decision = None
        self._restored = None  # sha256 of the model last taken from the record (restored, or another's)
        self._warned = set()
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
        return self.choose(candidate, current) is candidate

    def choose(self, candidate, current, content=None):
        """The model to serve now that `candidate` (a loaded model with .sha256 and .predict) arrived: the
        candidate, `current` (or None), or with --gate-state the model the record names (module docstring).
        content: the candidate's file bytes, kept in the state when it is admitted (None: read again from
        candidate.path and kept only if they still have its sha256)."""
        with self._lock:
            started = time.perf_counter()
            record = self._record()
            if record is not None and record["sha256"] == candidate.sha256 and (
                    current is None or current.sha256 != candidate.sha256):
                decision = self._decision(candidate, current)
                decision.update(decision="restored" if current is None else "promoted", reason=(
                    f"recorded by another worker/replica in {self.state.record_path}; not scored here"))
                if current is None:
                    self._restored = candidate.sha256
                self._finish(decision, candidate, current, started)
                return candidate
            base, note = current, ""
            if record is not None and record["sha256"] not in (candidate.sha256, getattr(current, "sha256", None)):
                recorded = self._load_copy(record)
                if recorded is not None:  # another worker/replica moved on: compare with (and keep) its model
                    base = recorded
                    note = (f"; compared with {record['model']}, recorded by another worker/replica"
                            f" (this worker served {'nothing' if current is None else current.sha256[:12]})")
            decision = self._decision(candidate, base)
            try:
                decision["candidate"]["accuracy"] = self.score(candidate)
                if base is not None:
                    decision["current"]["accuracy"] = self.score(base)
            except GateDataError as err:
                decision.update(decision="initial" if base is None else "promoted", reason=f"ungated: {err}")
            else:
                cand = decision["candidate"]["accuracy"]
                if base is None:
                    decision.update(decision="initial", reason="first model: nothing to compare with")
                else:
                    cur = decision["current"]["accuracy"]
                    promote = cand >= cur - self.epsilon - 1e-9  # accuracies are k/n: no float rounding verdicts
                    decision.update(decision="promoted" if promote else "rejected",
                                    reason=f"{cand:.4f} {'>=' if promote else '<'} {cur:.4f} - {self.epsilon:g}")
            decision["reason"] += note
            if decision["decision"] == "rejected":
                if base is not current:
                    self._restored = base.sha256
                chosen = base
            else:
                chosen = candidate
                if self.state is not None:
                    self._save(candidate, content, decision["candidate"]["accuracy"])
            self._finish(decision, candidate, base, started)
            return chosen

    def restore(self):
        """At start (nothing served yet): the model the record names, loaded from its copy (decision
        "restored"), or None when there is no usable record (the file is then "initial", as without state)."""
        if self.state is None:
            return None
        with self._lock:
            started = time.perf_counter()
            record = self._record()
            model = self._load_copy(record) if record is not None else None
            if model is None:
                return None
            decision = self._decision(model, None)
            decision.update(decision="restored",
                            reason=f"{self.state.record_path} names it (admitted {record.get('at')})")
            try:
                decision["candidate"]["accuracy"] = self.score(model)
            except GateDataError as err:
                decision["reason"] += f"; not scored: {err}"
            self._restored = model.sha256
            self._finish(decision, model, None, started)
            return model

    def _decision(self, candidate, current):
        return {"at": utc_iso(), "epsilon": self.epsilon, "data": self.path,
                "candidate": {"sha256": candidate.sha256, "accuracy": None},
                "current": None if current is None else {"sha256": current.sha256, "accuracy": None}}

    def _finish(self, decision, candidate, current, started):
        """Count, log and report a decision."""
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

    def _warn_once(self, message):
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _record(self):
        """The state's record, or None when there is no state, no record or an unusable one (logged once)."""
        if self.state is None:
            return None
        try:
            return self.state.read()
        except GateStateError as err:
            self._warn_once(f"gate: ignoring the gate's state: {err}; deciding as without --gate-state")
            return None

    def _load_copy(self, record):
        """The model the record names, loaded from its copy (checked against the record's sha256), or None
        (logged once): then the decision is taken as if there were no record."""
        path = self.state.copy_path(record["sha256"])
        try:
            content, sha256 = read_model_file(path)
            if sha256 != record["sha256"]:
                raise GateStateError(f"its sha256 is {sha256}, not the recorded {record['sha256']}")
            return LoadedModel(path, None, content)
        except Exception as err:  # noqa: BLE001 - a bad copy must not stop serving
            self._warn_once(f"gate: cannot use the recorded model {path} ({type(err).__name__}: {err}); "
                            "deciding as without --gate-state")
            return None

    def _save(self, model, content, model_accuracy):
        """Record `model` as admitted in the state. Never raises: unsaved, the decision still holds here."""
        try:
            if content is None:
                path = getattr(model, "path", None)
                if path is None:
                    raise GateStateError("the model's bytes are unknown")
                content, sha256 = read_model_file(path)
                if sha256 != model.sha256:
                    raise GateStateError(f"{path} no longer holds the admitted model")
            self.state.save(content, model.sha256, model_accuracy, self.path, self.epsilon)
        except (OSError, GateStateError) as err:
            problem = f"cannot save the decision in {self.state.directory}: {type(err).__name__}: {err}"
            if self.state_error is None:  # once, until a save works again
                log.warning("gate: %s; it holds in this worker only", problem)
            self.state_error = problem
        else:
            self.state_error = None

    def info(self, served=None):
        """What /api/model reports under "gate"."""
        served_accuracy = None
        if served is not None and self._data is not None:
            served_accuracy = self._scores.get(served.sha256)
        return {"data": self.path, "epsilon": self.epsilon, "promotions": self.promotions,
                "rejections": self.rejections, "served_accuracy": served_accuracy,
                "last_decision": self.last_decision,
                "state": None if self.state is None else self.state.directory,
                "restored": served is not None and served.sha256 == self._restored,
                "state_error": self.state_error}


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"
