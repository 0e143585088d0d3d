"""The prediction server's Flask app: `create_app(model_path)`, its routes, error answers and metrics.

Routes, request and response fields, errors and limits: docs/CONTRACTS.md, "HTTP API". Every route
that returns predictions builds each one with `prediction_json` (a pure function). The model itself
(loading, hot reload, batching) is in model.py, the image preprocessing in preprocess.py, and the
command line and the gunicorn launcher in server.py. Tests use `create_app` with Flask's test client.
"""

import io
import json
import logging
import os
import sys
import time

from flask import Flask, Request, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import parse_options_header

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlkcommon import LEDGER_FORMAT, read_ledger  # noqa: E402
from model import CHECK_INTERVAL, Batcher, ModelHolder, file_signature  # noqa: E402
from preprocess import ImageError, mean_over_views, preprocess_views, stack_views  # noqa: E402
import gate as gate_module  # noqa: E402
import v2  # noqa: E402

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


def _gate_metrics(registry):
    """Gauges of the promotion gate (gate.py). Every worker decides by itself and they all decide the
    same, so across workers the counts are the max (not the sum) and the accuracy the most recent."""
    from prometheus_client import Gauge

    multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    target = None if multiproc else registry

    def gauge(name, doc, mode):
        return Gauge(name, doc, registry=target, **({"multiprocess_mode": mode} if multiproc else {}))

    return (gauge("mlk_gate_promotions", "Replaced model files the gate promoted", "max"),
            gauge("mlk_gate_rejections", "Replaced model files the gate rejected (the current model kept)", "max"),
            gauge("mlk_gate_candidate_accuracy", "Evaluation-set accuracy of the last candidate model", "mostrecent"),
            gauge("mlk_gate_served_accuracy", "Evaluation-set accuracy of the model being served", "mostrecent"))


# ------------------------------------------------------------------------------------- round ledger


class Ledger:
    """The training history beside the model (the aggregator's ROOT/rounds/ledger.json and the plot
    ROOT/rounds/history.png, docs/CONTRACTS.md "Round ledger"), read only. Absent: nothing shown; malformed:
    logged once (per file version) and nothing shown; never an error for the server."""

    def __init__(self, model_path):
        rounds_dir = os.path.join(os.path.dirname(os.path.abspath(model_path)), "rounds")
        self.path = os.path.join(rounds_dir, "ledger.json")
        self.plot_path = os.path.join(rounds_dir, "history.png")
        self._cached = (None, [])  # (file signature, rounds)

    def rounds(self):
        """The ledger's rounds (dicts with an int "round"), [] when absent or malformed."""
        signature = file_signature(self.path)
        if signature is None:
            return []
        cached = self._cached
        if cached[0] == signature:
            return cached[1]
        try:
            rounds = read_ledger(self.path)["rounds"]
        except (OSError, ValueError) as err:  # LedgerFormatError is a ValueError
            log.error("ignoring the round ledger %s: %s", self.path, err)
            rounds = []
        self._cached = (signature, rounds)
        return rounds

    def entry_for(self, sha256):
        """The round whose aggregate has this sha256 (the served file is a copy of rounds/r{n}.h5), or None."""
        for entry in reversed(self.rounds()):
            aggregate = entry.get("aggregate")
            if isinstance(aggregate, dict) and aggregate.get("sha256") == sha256:
                return entry
        return None

    def has_plot(self):
        return os.path.isfile(self.plot_path)


def _number(value, fmt):
    return fmt % value if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def worker_notes(entry):
    """The workers of a ledger entry as short strings for the page: file, accuracy, outlier / dropped."""
    notes = []
    for worker in entry.get("workers") if isinstance(entry.get("workers"), list) else []:
        if not isinstance(worker, dict):
            continue
        note = str(worker.get("file", "?"))
        extra = [_number(worker.get("accuracy"), "accuracy %.4f")] + [
            flag for flag in ("outlier", "dropped") if worker.get(flag) is True]
        extra = [e for e in extra if e]
        notes.append(f"{note} ({', '.join(extra)})" if extra else note)
    return notes


def history_rows(rounds, served_sha256):
    """The ledger's rounds as the page's table rows: only strings, whatever the ledger holds."""
    rows = []
    for entry in rounds:
        workers = entry.get("workers") if isinstance(entry.get("workers"), list) else []
        kept = [w for w in workers if isinstance(w, dict) and not w.get("dropped")]
        aggregate = entry.get("aggregate") if isinstance(entry.get("aggregate"), dict) else {}
        expected = entry.get("expected_workers")
        rows.append({
            "round": str(entry["round"]),
            "workers": f"{len(kept)}" + (f" of {expected}" if isinstance(expected, int) else ""),
            "samples": _number(entry.get("samples"), "%d"),
            "accuracy": _number(entry.get("test_accuracy"), "%.4f"),
            "seconds": _number(entry.get("round_seconds"), "%.1f"),
            "served": bool(served_sha256) and aggregate.get("sha256") == served_sha256,
        })
    return rows


# ------------------------------------------------------------------------------------------- app


class InMemoryRequest(Request):
    """Multipart file parts stay in memory (werkzeug spools parts over 500 kB to a temp file)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # bounded by MAX_CONTENT_LENGTH (2 MB)


def create_app(model_path, check_interval=CHECK_INTERVAL, gate_data=None, gate_epsilon=gate_module.DEFAULT_EPSILON,
               background_reload=False, gate_state=None):
    """The Flask app. Loads the model now if it exists; otherwise when it appears.

    gate_data: the evaluation set of the promotion gate (gate.py); None: every replaced file is served.
    gate_state: the gate's directory shared by every worker and replica (--gate-state; needs gate_data), where
    the admitted model is kept: a restart serves it, not a file the gate rejected. None: decisions in memory.
    background_reload: a replaced file is loaded and gated by a thread, not by the request that noticed it
    (model.ModelHolder; server.py's one-request-at-a-time workers)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_BODY
    app.debug = False
    holder = ModelHolder(model_path, check_interval, background=background_reload)
    batcher = Batcher()
    app.extensions["mlk_model"] = holder
    if gate_state and not gate_data:
        raise ValueError("gate_state needs gate_data: the state keeps the gate's decisions")
    registry, requests_total, latency, predictions, loads = _metrics()
    seen_models = set()
    ledger = Ledger(model_path)
    gate = None
    if gate_data:
        promotions, rejections, candidate_accuracy, served_accuracy = _gate_metrics(registry)

        def on_decision(decision):
            promotions.set(gate.promotions)
            rejections.set(gate.rejections)
            if decision["candidate"]["accuracy"] is not None:
                candidate_accuracy.set(decision["candidate"]["accuracy"])
            kept = decision["candidate"] if decision["decision"] != "rejected" else decision["current"]
            if kept and kept["accuracy"] is not None:
                served_accuracy.set(kept["accuracy"])

        gate = gate_module.Gate(gate_data, gate_epsilon, on_decision, state=gate_state)
        holder.gate = gate
    app.extensions["mlk_gate"] = gate

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

    def page(**values):
        model = values.get("model")
        rounds = ledger.rounds()
        served_round = ledger.entry_for(model.sha256) if model else None
        values.update(history=history_rows(rounds, model.sha256 if model else None),
                      history_plot=bool(rounds) and ledger.has_plot(), served_round=served_round,
                      served_workers=worker_notes(served_round) if served_round else [])
        return render_template("index.html", **values)

    def error(status, message):
        if wants_html():
            return page(error=message, result=None, model=None), status
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

        views = []
        for index, blob in enumerate(blobs):
            try:
                views.append(preprocess_views(blob))
            except ImageError as err:
                raise ImageError(f"file {index + 1}: {err}" if len(blobs) > 1 else str(err)) from None
        model = current_model()
        if model is None:
            return None, None
        images, starts = stack_views(views)
        probabilities = mean_over_views(batcher.predict(model, images), starts)
        results = [prediction_json(row, model.sha256) for row in probabilities]
        for result in results:
            predictions.labels(str(result["digit"])).inc()
        return results, model

    def not_ready():
        return holder.last_error or "model not loaded yet"

    @app.get("/")
    def index():
        return page(result=None, error=None, model=current_model())

    @app.post("/upload")
    def upload():
        try:
            results, model = predict(uploads()[:1])
        except ImageError as err:
            return error(400, str(err))
        if results is None:
            return error(503, not_ready())
        return page(result=results[0], error=None, model=model)

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

    def ready_model():
        """The model for readiness answers: once one is served, never the request that loads (and gates) a
        replaced file, so /readyz answers at once throughout a reload."""
        return holder.current or current_model()

    @app.get("/readyz")
    def readyz():
        model = ready_model()
        if model is None:
            return jsonify(status="not ready", error=not_ready()), 503
        return jsonify(status="ready", model=model_id(model.sha256))

    @app.get("/api/model")
    def api_model():
        model = current_model()
        if model is None:
            return jsonify(error=not_ready(), path=holder.path), 503
        info = model.info()
        rounds = ledger.rounds()
        entry = ledger.entry_for(model.sha256)
        info["ledger"] = {"round": entry["round"] if entry else None, "entry": entry,
                          "history": "/api/history" if rounds else None,
                          "plot": "/history.png" if rounds and ledger.has_plot() else None}
        info["gate"] = gate.info(model) if gate is not None else None
        return jsonify(info)

    @app.get("/api/history")
    def api_history():
        rounds = ledger.rounds()
        if not rounds:
            return error(404, f"no training history ({ledger.path} absent, empty or unreadable)")
        return jsonify({"format": LEDGER_FORMAT, "rounds": rounds})

    @app.get("/history.png")
    def history_png():
        if not ledger.has_plot():
            return error(404, f"no history plot ({ledger.plot_path} absent)")
        with open(ledger.plot_path, "rb") as f:  # read whole: the aggregator may replace it meanwhile
            return send_file(io.BytesIO(f.read()), mimetype="image/png", max_age=0)

    @app.get("/metrics")
    def metrics():
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    def run_model(model, images):
        return batcher.predict(model, images)

    def count_digits(digits):
        for digit in digits:
            predictions.labels(str(digit)).inc()

    app.register_blueprint(v2.create_blueprint(
        current_model, run_model, preprocess_views, ImageError, model_id, not_ready,
        max_items=MAX_FILES, max_body=MAX_BODY, on_digits=count_digits, ready_model=ready_model))

    # The hot path: POST /api/predict without Flask's routing, request and response objects (about a third
    # of a request's CPU, measured: docs/serving.md). Same limits, answers and metrics as api_predict; any
    # request it does not take whole goes to Flask with its body untouched.
    route_metrics = {}

    def count(status, started):
        children = route_metrics.get(status)
        if children is None:
            children = route_metrics[status] = (requests_total.labels("/api/predict", "POST", str(status)),
                                                latency.labels("/api/predict"))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def json_answer(start_response, status, payload):
        data = (json.dumps(payload, ensure_ascii=True, sort_keys=True, separators=(",", ":")) + "\n").encode()
        start_response(_STATUS_LINES[status], [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(data)))])
        return [data]

    flask_wsgi = app.wsgi_app

    def wsgi_app(environ, start_response):
        if environ.get("PATH_INFO") != "/api/predict" or environ.get("REQUEST_METHOD") != "POST":
            return flask_wsgi(environ, start_response)
        started = time.perf_counter()
        length = environ.get("CONTENT_LENGTH")
        if not length or not (length.isascii() and length.isdigit()) or int(length) > MAX_BODY:
            return flask_wsgi(environ, start_response)  # chunked, malformed or too large: Flask's answers
        mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
        mimetype = mimetype.lower()
        if not (mimetype.startswith("image/") or mimetype == "multipart/form-data"):
            return flask_wsgi(environ, start_response)
        body = environ["wsgi.input"].read(int(length))
        blobs = None
        if len(body) == int(length):
            blobs = [body] if mimetype.startswith("image/") else multipart_files(body, options.get("boundary"))
        if blobs is None:
            environ["wsgi.input"] = io.BytesIO(body)
            return flask_wsgi(environ, start_response)
        try:
            try:
                results, _ = predict(blobs)
            except ImageError as err:
                status, payload = 400, {"error": str(err)}
            else:
                if results is None:
                    status, payload = 503, {"error": not_ready()}
                else:
                    status, payload = 200, results[0] if len(blobs) == 1 else {"predictions": results}
        except Exception:  # noqa: BLE001 - as Flask's last-resort handler: log, JSON 500, worker alive
            log.exception("unexpected error")
            status, payload = 500, {"error": "internal error"}
        count(status, started)
        return json_answer(start_response, status, payload)

    app.wsgi_app = wsgi_app
    return app


_STATUS_LINES = {200: "200 OK", 400: "400 BAD REQUEST", 500: "500 INTERNAL SERVER ERROR",
                 503: "503 SERVICE UNAVAILABLE"}  # as werkzeug spells them


def multipart_files(body, boundary):
    """The `file` parts of a multipart/form-data body as bytes, as werkzeug would give them to api_predict;
    None when the body is anything but the plain shape browsers, curl and requests send (then werkzeug
    parses it): a preamble-free `--boundary CRLF`, parts with only Content-Disposition (form-data,
    name "file", a filename) and Content-Type headers, CRLF line breaks, a closing delimiter, at most
    MAX_FILES parts."""
    if not boundary or not 1 <= len(boundary) <= 70:
        return None
    try:
        delimiter = b"\r\n--" + boundary.encode("ascii")
    except UnicodeEncodeError:
        return None
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    blobs, position = [], len(delimiter)  # just past the first delimiter's CRLF
    while True:
        headers_end = body.find(b"\r\n\r\n", position)
        end = body.find(delimiter, position)
        if headers_end < 0 or end < 0 or headers_end > end or len(blobs) >= MAX_FILES:
            return None
        if not _is_file_part(body[position:headers_end]):
            return None
        blobs.append(body[headers_end + 4:end])
        after = body[end + len(delimiter):end + len(delimiter) + 2]
        if after == b"\r\n":
            position = end + len(delimiter) + 2
        elif after == b"--":
            return blobs if body[end + len(delimiter) + 2:] in (b"", b"\r\n") else None
        else:
            return None


def _is_file_part(head):
    """Part headers (bytes) naming a `file` form field with a filename and nothing else werkzeug reads."""
    disposition = None
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or b"\n" in line or b"\r" in line or line[:1] in (b" ", b"\t"):
            return False
        name = name.strip(b" \t").lower()
        if name == b"content-disposition" and disposition is None:
            try:
                disposition = parse_options_header(value.decode().strip(" \t"))
            except UnicodeDecodeError:
                return False
        elif name != b"content-type":
            return False
    return (disposition is not None and disposition[0].lower() == "form-data"
            and disposition[1].get("name") == "file" and disposition[1].get("filename") is not None)
