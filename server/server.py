"""Prediction server for the aggregated MNIST model: upload page, drawing canvas, JSON API, metrics.

    python server.py --model /mnt/aggregated-model.h5 [--host 0.0.0.0] [--port 5000] [--workers N]

runs the app under gunicorn (never Flask's development server). `create_app(model_path)` builds the
Flask app (tests use it with Flask's test client). Each worker loads the model itself, predicts
through a compiled tf.function, and reloads it when the file is replaced; a missing model is
picked up when it appears (/readyz says 503 until then). See docs/CONTRACTS.md for the model file.
"""

import argparse
import gc
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time

from flask import Flask, Request, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preprocess import ImageError, preprocess  # noqa: E402

MAX_BODY = 2 * 1024 * 1024  # bytes; larger requests get 413
MAX_FILES = 32  # per /api/predict request
CHECK_INTERVAL = 1.0  # seconds between cheap stat() checks of the model file
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 4

log = logging.getLogger("mlk.server")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = Parser(prog="server.py", description="Serve MNIST predictions of an aggregated .h5 model over HTTP.")
    parser.add_argument("--model", required=True, help="the aggregated model .h5 (may appear later; reloaded when replaced)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"gunicorn worker processes, one model each (default {DEFAULT_WORKERS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"request threads per worker (default {DEFAULT_THREADS})")
    return parser


# ----------------------------------------------------------------------------------------- model


def _file_signature(path):
    """(inode, size, mtime_ns) or None when missing: changes whenever the file is replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_attrs(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            if not key.startswith("mlk_"):
                continue
            if isinstance(value, bytes):
                value = value.decode()
            elif hasattr(value, "item"):
                value = value.item()
            if key == "mlk_inputs" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
    return out


class LoadedModel:
    """One loaded model: a compiled predict function plus what /api/model reports."""

    def __init__(self, path, signature):
        import keras
        import numpy as np
        import tensorflow as tf

        started = time.perf_counter()
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        model = keras.models.load_model(path, compile=False)
        if tuple(model.input_shape[1:]) != (28, 28, 1) or tuple(model.output_shape[1:]) != (10,):
            raise ValueError(f"model has input {model.input_shape} / output {model.output_shape}, "
                             "expected (None, 28, 28, 1) -> (None, 10)")
        self.attrs = _read_attrs(path)
        self._model = model

        def forward(x):
            return model(x, training=False)

        # One compiled graph for any batch size, called as a concrete function (the least per-call
        # overhead: about 1 ms here, against ~30 ms for model.predict). XLA when it compiles the model.
        spec = [tf.TensorSpec([None, 28, 28, 1], tf.float32)]
        self._np, self._tf = np, tf
        try:
            self._predict = tf.function(forward, input_signature=spec, jit_compile=True).get_concrete_function()
            self.predict(np.zeros((1, 28, 28), np.float32))  # compile now, not on the first request
        except Exception:  # noqa: BLE001 - an op XLA cannot compile: plain graph mode
            self._predict = tf.function(forward, input_signature=spec).get_concrete_function()
            self.predict(np.zeros((1, 28, 28), np.float32))
        self.path = path
        self.signature = signature
        self.loaded_at = time.time()
        self.load_seconds = time.perf_counter() - started

    def predict(self, images):
        """float32 (n, 28, 28) in [0, 1] -> float64 (n, 10) probabilities."""
        x = self._tf.constant(self._np.asarray(images, dtype=self._np.float32)[..., None])
        return self._predict(x).numpy().astype(self._np.float64)

    def info(self):
        attrs = self.attrs
        return {
            "path": self.path,
            "sha256": self.sha256,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "load_seconds": round(self.load_seconds, 3),
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
    """

    def __init__(self, path, check_interval=CHECK_INTERVAL):
        self.path = path
        self.check_interval = check_interval
        self.current = None
        self.last_error = None
        self._failed_signature = None
        self._next_check = 0.0
        self._loading = threading.Lock()

    def get(self):
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self.refresh()
        return self.current

    def refresh(self):
        """Load the file if it differs from the current model (non-blocking if a load is running)."""
        if not self._loading.acquire(blocking=False):
            return
        try:
            signature = _file_signature(self.path)
            current = self.current
            if signature is None:
                if current is None:
                    self.last_error = f"model file {self.path} does not exist (yet)"
                return  # keep serving the old model if the file is briefly gone
            if (current is not None and current.signature == signature) or signature == self._failed_signature:
                return
            try:
                loaded = LoadedModel(self.path, signature)
            except Exception as err:  # a bad or half-copied file must not take the server down
                self._failed_signature = signature
                self.last_error = f"cannot load {self.path}: {type(err).__name__}: {err}"
                log.error("%s", self.last_error)
                return
            if _file_signature(self.path) != signature:
                return  # replaced while loading: the next check loads the newer one
            self.current = loaded  # atomic swap
            self.last_error = None
            log.warning("model loaded: %s sha256 %s in %.2fs", self.path, loaded.sha256[:12], loaded.load_seconds)
        finally:
            self._loading.release()


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


# --------------------------------------------------------------------------------------- metrics


def _metrics():
    """prometheus_client metrics; multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (gunicorn)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

    multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    registry = CollectorRegistry()
    target = None if multiproc else registry
    if multiproc:
        multiprocess.MultiProcessCollector(registry)
    requests_total = Counter("mlk_http_requests_total", "HTTP requests by route and status",
                             ["route", "method", "status"], registry=target)
    latency = Histogram("mlk_http_request_duration_seconds", "Request latency by route", ["route"],
                        buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=target)
    predictions = Counter("mlk_predictions_total", "Predictions by predicted digit", ["digit"], registry=target)
    reloads = Counter("mlk_model_loads_total", "Models loaded (start-up and hot reloads)", registry=target)
    return registry, requests_total, latency, predictions, reloads


# ------------------------------------------------------------------------------------------- app


class InMemoryRequest(Request):
    """Multipart file parts stay in memory (werkzeug spools parts over 500 kB to a temp file)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # bounded by MAX_CONTENT_LENGTH (2 MB)


def create_app(model_path, check_interval=CHECK_INTERVAL):
    """The Flask app. Loads the model now if it exists; otherwise when it appears."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_BODY
    app.debug = False
    holder = ModelHolder(model_path, check_interval)
    batcher = Batcher()
    app.extensions["mlk_model"] = holder
    registry, requests_total, latency, predictions, loads = _metrics()
    seen_models = set()

    def current_model():
        model = holder.get()
        if model is not None and id(model) not in seen_models:
            seen_models.add(id(model))
            loads.inc()
        return model

    current_model()

    @app.before_request
    def start_timer():
        request.environ["mlk.started"] = time.perf_counter()

    @app.after_request
    def record(response):
        route = request.url_rule.rule if request.url_rule else "other"
        requests_total.labels(route, request.method, str(response.status_code)).inc()
        started = request.environ.get("mlk.started")
        if started is not None:
            latency.labels(route).observe(time.perf_counter() - started)
        return response

    def wants_html():
        return request.path == "/upload"

    def error(status, message):
        if wants_html():
            return render_template("index.html", error=message, result=None, model=None), status
        return jsonify(error=message), status

    @app.errorhandler(HTTPException)
    def http_error(err):
        if isinstance(err, RequestEntityTooLarge):
            return error(413, f"request body too large (limit {MAX_BODY // (1024 * 1024)} MB)")
        return error(err.code or 400, err.description or err.name)

    @app.errorhandler(Exception)
    def unexpected(err):  # last resort: log it, answer JSON, keep the worker alive
        log.exception("unexpected error")
        return error(500, "internal error")

    def uploads():
        """The images of this request as bytes: multipart `file` fields, or a raw image/* body."""
        content_type = request.mimetype or ""
        if content_type.startswith("image/"):
            return [request.get_data(cache=False)]
        if content_type != "multipart/form-data":
            raise ImageError("send the image as multipart field 'file' or as a raw body with an image/* content type")
        files = request.files.getlist("file")
        if not files:
            raise ImageError("missing multipart field 'file'")
        if len(files) > MAX_FILES:
            raise ImageError(f"too many files ({len(files)}; limit {MAX_FILES})")
        return [f.read() for f in files]

    def predict(blobs):
        """bytes list -> (list of results, model). Raises ImageError (400) or returns model None (503)."""
        import numpy as np

        images = []
        for index, blob in enumerate(blobs):
            try:
                images.append(preprocess(blob))
            except ImageError as err:
                raise ImageError(f"file {index + 1}: {err}" if len(blobs) > 1 else str(err)) from None
        model = current_model()
        if model is None:
            return None, None
        probabilities = batcher.predict(model, np.stack(images))
        results = []
        for row in probabilities:
            digit = int(row.argmax())
            predictions.labels(str(digit)).inc()
            results.append({"digit": digit, "probabilities": [round(float(p), 6) for p in row],
                            "model": model.sha256[:12]})
        return results, model

    def not_ready():
        return holder.last_error or "model not loaded yet"

    @app.get("/")
    def index():
        return render_template("index.html", result=None, error=None, model=current_model())

    @app.post("/upload")
    def upload():
        try:
            results, model = predict(uploads()[:1])
        except ImageError as err:
            return error(400, str(err))
        if results is None:
            return error(503, not_ready())
        return render_template("index.html", result=results[0], error=None, model=model)

    @app.post("/api/predict")
    def api_predict():
        try:
            blobs = uploads()
            results, _ = predict(blobs)
        except ImageError as err:
            return error(400, str(err))
        if results is None:
            return error(503, not_ready())
        if len(blobs) == 1:
            return jsonify(results[0])
        return jsonify(predictions=results)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz():
        model = current_model()
        if model is None:
            return jsonify(status="not ready", error=not_ready()), 503
        return jsonify(status="ready", model=model.sha256[:12])

    @app.get("/api/model")
    def api_model():
        model = current_model()
        if model is None:
            return jsonify(error=not_ready(), path=holder.path), 503
        return jsonify(model.info())

    @app.get("/metrics")
    def metrics():
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    return app


# ---------------------------------------------------------------------------------------- gunicorn


def serve(args):
    from gunicorn.app.base import BaseApplication

    model_path = os.path.abspath(args.model)

    class Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
                "workers": args.workers,
                "worker_class": "gthread",
                "threads": args.threads,
                "keepalive": 5,
                "timeout": 120,  # first model load + TensorFlow start-up
                "graceful_timeout": 10,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "child_exit": child_exit,
                "worker_tmp_dir": tempfile.gettempdir(),
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            # Runs in each worker after the fork: TensorFlow is never imported by the master.
            logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
            app = create_app(model_path)
            # TensorFlow and Keras leave ~10^6 long-lived objects: keep them out of the cyclic
            # garbage collector's scans, which otherwise show up as latency spikes.
            gc.collect()
            gc.freeze()
            return app

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    Server().run()


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problems = []
    if not 1 <= args.port <= 65535:
        problems.append(f"--port must be 1-65535, got {args.port}")
    if args.workers < 1:
        problems.append(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if os.path.isdir(args.model):
        problems.append(f"--model {args.model} is a directory, expected the .h5 file")
    if problems:
        print(f"{parser.prog}: error: {problems[0]}", file=sys.stderr)
        return 2
    # Metrics from every worker: prometheus_client's multiprocess mode, in a fresh private directory.
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="mlk-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if not os.path.exists(args.model):
        print(f"{parser.prog}: {args.model} does not exist yet; serving /readyz 503 until it appears",
              file=sys.stderr, flush=True)
    try:
        serve(args)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
