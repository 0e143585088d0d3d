"""The prediction server's Flask app: `create_app(model_path)`, its routes, error answers and metrics.

Routes, request and response fields, errors and limits: docs/CONTRACTS.md, "HTTP API". Every route
that returns predictions builds each one with `prediction_json` (a pure function). The model itself
(loading, hot reload, batching) is in model.py, the image preprocessing in preprocess.py, and the
command line and the gunicorn launcher in server.py. Tests use `create_app` with Flask's test client.
"""

import io
import logging
import os
import sys
import time

from flask import Flask, Request, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CHECK_INTERVAL, Batcher, ModelHolder  # noqa: E402
from preprocess import ImageError, preprocess  # noqa: E402

MAX_BODY = 2 * 1024 * 1024  # bytes; larger requests get 413
MAX_FILES = 32  # image files per request (multipart `file` parts)
MODEL_ID_CHARS = 12  # a model is named by the first hex digits of its file's sha256

log = logging.getLogger("mlk.server")


def model_id(sha256):
    """The short name of a model in answers: the first MODEL_ID_CHARS hex digits of its sha256."""
    return sha256[:MODEL_ID_CHARS]


def prediction_json(probabilities, model_sha256):
    """One prediction as the API returns it (and the upload page shows it).

    probabilities: the model's 10 class probabilities for one image; model_sha256: the sha256 hex of
    the model file. -> {"digit": the most probable class (the first on a tie), "probabilities": the 10
    values as floats rounded to 6 decimals, "model": model_id(model_sha256)}.
    """
    values = [float(p) for p in probabilities]
    digit = max(range(len(values)), key=values.__getitem__)
    return {"digit": digit, "probabilities": [round(p, 6) for p in values], "model": model_id(model_sha256)}


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
        results = [prediction_json(row, model.sha256) for row in probabilities]
        for result in results:
            predictions.labels(str(result["digit"])).inc()
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
        return jsonify(status="ready", model=model_id(model.sha256))

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
