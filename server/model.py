"""Model side of the prediction server: loading, hot reload and batching.

`LoadedModel` is one loaded .h5, run by LiteRT (converted in memory when loaded; by TensorFlow's graph
if that fails); `ModelHolder` keeps the current one and swaps in a new one when the file is replaced (a
missing file is picked up when it appears; a file that fails to load is logged and the old model kept);
`Batcher` runs the predictions of concurrent requests of one worker as one model call. TensorFlow is
imported only when a model is loaded. The model file's format is in docs/CONTRACTS.md.

A model file is read once into memory (`read_model_file`): its sha256 is of those bytes and the model is
loaded from them (through a private temporary copy: Keras and h5py load from a path), so the sha256 that
/api/model reports, the model that serves and the bytes the gate keeps (gate.py, --gate-state) are the
same even when the file is replaced while it is being read.
"""

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import threading
import time

from mlkcommon import read_mlk_attrs, utc_iso

CHECK_INTERVAL = 1.0  # seconds between cheap stat() checks of the model file
WARM_BATCHES = (1, 2, 8, 1)  # batch sizes run once when a model is loaded, before it serves

log = logging.getLogger("mlk.server")


def file_signature(path):
    """(inode, size, mtime_ns) or None when missing: changes whenever the file is replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _litert_interpreter(tf, model):
    """The model converted to LiteRT (TensorFlow Lite's runtime, the `ai-edge-litert` package) in memory, for one
    image at a time, one thread: ~0.09 ms of CPU per image there against ~0.5 ms through TensorFlow's graph
    (measured; the same probabilities to 1e-7), the largest share of a request (docs/serving.md). Several
    images run one after another (batching gains nothing at that cost). Raises if the model cannot be
    converted or LiteRT is missing."""
    from ai_edge_litert.interpreter import Interpreter

    # from_keras_model: from_concrete_functions gave NaN outputs for these Keras 3 models (seen with TensorFlow
    # 2.21, cause not pursued). Batch size 1, as the input comes.
    # It exports the model to a temporary directory (removed again) and prints its signature: not for the log.
    with contextlib.redirect_stdout(io.StringIO()):
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1, 28, 28, 1])
    interpreter.allocate_tensors()
    given, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if tuple(given["shape"]) != (1, 28, 28, 1) or tuple(output["shape"]) != (1, 10):
        raise ValueError(f"LiteRT model maps {tuple(given['shape'])} -> {tuple(output['shape'])}")
    # The flatbuffer stays referenced as long as the interpreter (model_content is not documented to be copied).
    return interpreter, given["index"], output["index"], flatbuffer


def _litert_predict(litert, x):
    """float32 (n, 28, 28, 1) -> float32 (n, 10), one image after another."""
    import numpy as np

    interpreter, given, output, _ = litert
    out = np.empty((len(x), 10), np.float32)
    for k in range(len(x)):
        interpreter.set_tensor(given, x[k:k + 1])
        interpreter.invoke()
        out[k] = interpreter.get_tensor(output)[0]
    return out


def _tensorflow_predict(tf, model):
    """The fallback: one graph for any batch size (not XLA, which compiles once per new batch size, 1-2 s each,
    measured), called flat (one tensor in, the captured weights) when this TensorFlow has it: the public call
    binds a structured signature first, ~0.2 ms of Python per call (measured, TF 2.21)."""

    def forward(x):
        return model(x, training=False)

    concrete = tf.function(forward, input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)]).get_concrete_function()
    call_flat, captured = getattr(concrete, "_call_flat", None), list(concrete.captured_inputs)
    return (lambda x: call_flat([x], captured)) if call_flat else concrete


def read_model_file(path):
    """(bytes, sha256 hex of them): the file read once. Raises OSError."""
    with open(path, "rb") as f:
        content = f.read()
    return content, hashlib.sha256(content).hexdigest()


@contextlib.contextmanager
def _private_copy(content):
    """A temporary .h5 holding `content`, removed afterwards: what Keras and h5py load, since they take a path
    and the model file itself may already hold other bytes."""
    with tempfile.NamedTemporaryFile(prefix="mlk-model-", suffix=".h5") as f:
        f.write(content)
        f.flush()
        yield f.name


class LoadedModel:
    """One loaded model: a compiled predict function plus what /api/model reports.

    content: the file's bytes when the caller already read them (read_model_file); else they are read here.
    """

    def __init__(self, path, signature, content=None):
        import keras
        import numpy as np
        import tensorflow as tf

        started = time.perf_counter()
        if content is None:
            content, self.sha256 = read_model_file(path)
        else:
            self.sha256 = hashlib.sha256(content).hexdigest()
        with _private_copy(content) as local:
            model = keras.models.load_model(local, compile=False)
            if tuple(model.input_shape[1:]) != (28, 28, 1) or tuple(model.output_shape[1:]) != (10,):
                raise ValueError(f"model has input {model.input_shape} / output {model.output_shape}, "
                                 "expected (None, 28, 28, 1) -> (None, 10)")
            self.attrs = read_mlk_attrs(local)
        self._model = model

        self._np, self._tf = np, tf
        self._lock = threading.Lock()  # a LiteRT interpreter is not thread-safe (the gate may score beside a request)
        self.runtime = "litert"
        self._litert = self._predict = None
        try:
            self._litert = _litert_interpreter(tf, model)
        except Exception as err:  # noqa: BLE001 - any model TensorFlow can run is still served, by TensorFlow
            log.warning("LiteRT unavailable for %s (%s: %s): predicting with TensorFlow", path, type(err).__name__,
                        str(err).strip().splitlines()[0] if str(err).strip() else "")
            self.runtime = "tensorflow"
            self._predict = _tensorflow_predict(tf, model)
        for size in WARM_BATCHES:  # run it now (graph or interpreter set-up, first-call work), not on a request
            self.predict(np.zeros((size, 28, 28), np.float32))
        self.path = path
        self.signature = signature
        self.loaded_at = time.time()
        self.load_seconds = time.perf_counter() - started

    def predict(self, images):
        """float32 (n, 28, 28) in [0, 1] -> float64 (n, 10) probabilities."""
        np = self._np
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32)[..., None])
        if self._litert is not None:
            with self._lock:
                return _litert_predict(self._litert, x).astype(np.float64)
        out = self._predict(self._tf.constant(x))
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.numpy().astype(np.float64)

    def info(self):
        attrs = self.attrs
        return {
            "path": self.path,
            "sha256": self.sha256,
            "loaded_at": utc_iso(self.loaded_at),
            "load_seconds": round(self.load_seconds, 3),
            "runtime": self.runtime,
            "kind": attrs.get("mlk_kind"),
            "workers": attrs.get("mlk_workers"),
            "round": attrs.get("mlk_round"),
            "samples": attrs.get("mlk_samples"),
            "epochs": attrs.get("mlk_epochs"),
            "attributes": attrs,
        }


class ModelHolder:
    """Holds the current model; swaps in a new one when the file changes, without blocking requests.

    At most once per CHECK_INTERVAL a request stat()s the file. If it changed, that request loads the
    new model (others keep using the old one meanwhile) and then replaces the reference in one
    assignment; requests already holding the old model finish with it.
    background=True: once a model is served, a changed file is loaded (and gated) by a thread of its own
    and the request goes on with the current model. server.py's workers are gunicorn `sync` workers, one
    request at a time: a request that loaded the model would hold its whole worker for the load and the
    gate, /readyz and /healthz included. The first model is always loaded by the request that needs it.
    gate: gate.py's Gate (--gate-data), which decides whether a replaced file is served (Gate.choose); None:
    every file that loads is served. With a gate that keeps its decisions (--gate-state) the first model is the
    one the gate restores, if any; the file is then a candidate like any replaced file.
    """

    def __init__(self, path, check_interval=CHECK_INTERVAL, background=False, gate=None):
        self.path = path
        self.gate = gate
        self.check_interval = check_interval
        self.background = background
        self.current = None
        self.last_error = None
        self._failed_signature = None
        self._next_check = 0.0
        self._loading = threading.Lock()
        self._restore_tried = False

    def get(self):
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            if self.background and self.current is not None:
                if self._is_new(file_signature(self.path), self.current) and not self._loading.locked():
                    threading.Thread(target=self.refresh, name="mlk-model-reload", daemon=True).start()
            else:
                self.refresh()
        return self.current

    def _is_new(self, signature, current):
        """Whether a file with this signature is worth loading: it is there and is neither the `current` model
        nor the file that last failed (to load, or the gate)."""
        return signature is not None and signature != self._failed_signature and (
            current is None or current.signature != signature)

    def refresh(self):
        """Load the file if it differs from the current model (non-blocking if a load is running)."""
        if not self._loading.acquire(blocking=False):
            return
        try:
            gate = self.gate
            if self.current is None and not self._restore_tried and gate is not None and gate.state is not None:
                self._restore_tried = True  # once: later, the gate consults its record at every decision
                self._restore(gate)
            signature = file_signature(self.path)
            current = self.current
            if signature is None:
                if current is None:
                    self.last_error = f"model file {self.path} does not exist (yet)"
                return  # keep serving the old model if the file is briefly gone
            if not self._is_new(signature, current):
                return
            try:
                content, sha256 = read_model_file(self.path)
                if current is not None and sha256 == current.sha256 and current.path != self.path:
                    # The served model came from the gate's state and the file holds the same bytes: nothing to
                    # load or decide; from now on it stands for the file.
                    current.path, current.signature = self.path, signature
                    return
                loaded = LoadedModel(self.path, signature, content)
            except Exception as err:  # a bad or half-copied file must not take the server down
                self._failed_signature = signature
                self.last_error = f"cannot load {self.path}: {type(err).__name__}: {err}"
                log.error("%s", self.last_error)
                return
            if file_signature(self.path) != signature:
                return  # replaced while loading: the next check loads the newer one
            chosen = loaded if gate is None else gate.choose(loaded, current, content)
            if chosen is not loaded:
                self._failed_signature = signature  # rejected: not loaded again until the file changes
                if chosen is current:
                    return
            self.current = chosen  # atomic swap (the candidate, or the model the gate's record names)
            self.last_error = None
            log.warning("model loaded: %s sha256 %s in %.2fs", chosen.path, chosen.sha256[:12], chosen.load_seconds)
        finally:
            self._loading.release()

    def _restore(self, gate):
        """Serve the model the gate's record names (gate.Gate.restore), before the file is looked at."""
        restored = gate.restore()
        if restored is not None:
            self.current = restored
            self.last_error = None
            log.warning("model restored: %s sha256 %s in %.2fs", restored.path, restored.sha256[:12],
                        restored.load_seconds)


class _Job:
    __slots__ = ("model", "images", "done", "lead", "probabilities", "error")

    def __init__(self, model, images):
        self.model, self.images = model, images
        self.done = threading.Event()
        self.lead = False
        self.probabilities = self.error = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.probabilities


class Batcher:
    """Runs the predictions of concurrent requests (threads of one worker) as one model call.

    No extra thread and no waiting when idle: the first request runs the model at once with whatever
    is queued; requests arriving meanwhile queue, and when the call ends the oldest of them runs the
    next batch. The model's per-call overhead (~1 ms) is then shared by the whole batch.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = []
        self._busy = False

    def predict(self, model, images):
        job = _Job(model, images)
        with self._lock:
            self._pending.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.done.wait()
            if not job.lead:
                return job.result()
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._pending:
                    self._pending[0].lead = True
                    self._pending[0].done.set()  # hand the next batch to the oldest waiting request
                else:
                    self._busy = False
        return job.result()

    @staticmethod
    def _run(batch):
        import numpy as np

        by_model = {}
        for job in batch:
            by_model.setdefault(id(job.model), []).append(job)  # a hot reload may mix two models
        for jobs in by_model.values():
            try:
                probabilities = jobs[0].model.predict(np.concatenate([job.images for job in jobs]))
                start = 0
                for job in jobs:
                    job.probabilities = probabilities[start:start + len(job.images)]
                    start += len(job.images)
            except Exception as err:  # noqa: BLE001 - handed to each waiting request
                for job in jobs:
                    job.error = err
            for job in jobs:
                job.done.set()
