"""The prediction server's Flask app: `create_app(model_path)` (tests use it with Flask's test client).

`create_app` builds the metrics (`Metrics`), the promotion gate (gate.py), the model holder (model.py) and
the one `predictor.Predictor` that every prediction route uses, then registers the routes, one blueprint
per concern:

    pages    GET /, POST /upload            the HTML page (`Pages`: the page, and every error answer)
    api      POST /api/predict              JSON predictions; its hot path is fastpath.py, in front of Flask
    status   /healthz, /readyz, /api/model, /metrics
    history  /api/history, /history.png     the round ledger beside the model (`Ledger`)
    live     /api/progress                  the run as it happens (progress.py; --progress-dir)
    v2       /v2/...                        the Open Inference Protocol (v2.py)

Routes, request and response fields, errors and limits: docs/CONTRACTS.md, "HTTP API". Each prediction is
built by `predictor.prediction_json`, whichever route returns it (v2 sends its probabilities and digit as
tensors). The model itself (loading, hot reload, batching) is in model.py, the image preprocessing in
preprocess.py, and the command line and the gunicorn launcher in server.py.
"""

import io
import logging
import math
import os
import re
import sys
import time

from flask import Blueprint, Flask, Request, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlkcommon import LEDGER_FORMAT, read_ledger  # noqa: E402
from model import CHECK_INTERVAL, Batcher, ModelHolder, file_signature  # noqa: E402
from predictor import ModelNotReady, Predictor, model_id  # noqa: E402
from preprocess import ImageError  # noqa: E402
import fastpath  # noqa: E402
import gate as gate_module  # noqa: E402
import progress as progress_module  # noqa: E402
import v2  # noqa: E402

MAX_BODY = 2 * 1024 * 1024  # bytes; larger requests get 413
MAX_FILES = 32  # image files per request (multipart `file` parts)
MAX_PARTS = 1000  # multipart parts of any name per request (werkzeug's max_form_parts): more is a 400
INTERNAL_HEADER = "X-Mlk-Internal"  # "1": the request came in on nginx's internal port (server/nginx.conf sets
# it there and clears it on the public port): /metrics answers, /api/model gives its full answer
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"))
# the mlk_http_requests_total `method` label: one of these, or "other" (a client cannot add label values)

log = logging.getLogger("mlk.server")


def create_app(model_path, check_interval=CHECK_INTERVAL, gate_data=None, gate_epsilon=gate_module.DEFAULT_EPSILON,
               background_reload=False, gate_state=None, trust_internal_header=True, progress_dir=None):
    """The Flask app. Loads the model now if it exists; otherwise when it appears.

    gate_data: the evaluation set of the promotion gate (gate.py); None: every replaced file is served.
    gate_state: the gate's directory shared by every worker and replica (--gate-state; needs gate_data), where
    the admitted model is kept: a restart serves it, not a file the gate rejected. None: decisions in memory.
    background_reload: a replaced file is loaded and gated by a thread, not by the request that noticed it
    (model.ModelHolder; server.py's one-request-at-a-time workers).
    trust_internal_header: a request with `X-Mlk-Internal: 1` (INTERNAL_HEADER) is internal (/metrics, the full
    /api/model). True behind server.py's nginx, which sets the header on its internal port only and clears it
    on the public one, and in tests (the client sends it); False: no request is internal.
    progress_dir: the shared volume's root (--progress-dir), whose progress files /api/progress and the page's
    live card show; None: no live progress (/api/progress 404)."""
    metrics = Metrics()
    gate = build_gate(gate_data, gate_epsilon, gate_state, metrics)
    holder = ModelHolder(model_path, check_interval, background=background_reload, gate=gate)
    predictor = Predictor(holder, Batcher(), on_digit=metrics.count_prediction, on_new_model=metrics.count_load)
    ledger = Ledger(model_path)
    live = progress_module.LiveProgress(progress_dir) if progress_dir else None
    pages = Pages(ledger, live=live is not None)
    predictor.model()  # the model now, if its file is there

    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_BODY
    app.debug = False
    app.extensions.update(mlk_model=holder, mlk_gate=gate, mlk_predictor=predictor)
    count_requests(app, metrics)
    answer_errors(app, pages)
    app.extensions["mlk_internal"] = (lambda: request.headers.get(INTERNAL_HEADER) == "1") if trust_internal_header \
        else (lambda: False)
    app.register_blueprint(page_routes(predictor, pages))
    app.register_blueprint(api_routes(predictor, pages))
    app.register_blueprint(status_routes(predictor, ledger, gate, metrics, app.extensions["mlk_internal"], live))
    app.register_blueprint(history_routes(ledger, pages))
    app.register_blueprint(live_routes(predictor, ledger, live, pages))
    app.register_blueprint(v2.create_blueprint(predictor, max_items=MAX_FILES, max_body=MAX_BODY))
    app.wsgi_app = fastpath.FastPath(app.wsgi_app, lambda blobs: predict_answer(predictor, blobs),
                                     metrics.recorder(fastpath.PATH, "POST"), max_body=MAX_BODY, max_files=MAX_FILES)
    return app


# --------------------------------------------------------------------------------------- metrics


class Metrics:
    """The server's prometheus_client metrics (names and labels: docs/CONTRACTS.md); multiprocess mode when
    PROMETHEUS_MULTIPROC_DIR is set (gunicorn: /metrics from any worker sums them all)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

        self.multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        target = None if self.multiproc else self.registry
        if self.multiproc:
            multiprocess.MultiProcessCollector(self.registry)
        self.requests = Counter("mlk_http_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=target)
        self.latency = Histogram("mlk_http_request_duration_seconds", "Request latency by route", ["route"],
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=target)
        self.predictions = Counter("mlk_predictions_total", "Predictions by predicted digit", ["digit"], registry=target)
        self.loads = Counter("mlk_model_loads_total", "Models loaded (start-up and hot reloads)", registry=target)

    def count_prediction(self, digit):
        self.predictions.labels(str(digit)).inc()

    def count_load(self, model):
        self.loads.inc()

    def record(self, route, method, status, seconds):
        """One answered request: its count by route, method (METHODS, else "other") and status; its latency
        by route (if timed)."""
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        if seconds is not None:
            self.latency.labels(route).observe(seconds)

    def recorder(self, route, method):
        """record() for one route and method, its labelled metrics looked up once per status (the fast path)."""
        children = {}

        def record(status, seconds):
            pair = children.get(status)
            if pair is None:
                pair = children[status] = (self.requests.labels(route, method, str(status)), self.latency.labels(route))
            pair[0].inc()
            pair[1].observe(seconds)

        return record

    def gate_recorder(self):
        """Gauges of the promotion gate (gate.py) -> on_decision(gate, decision), which sets them. Every worker
        decides by itself and they all decide the same, so across workers the counts are the max (not the sum)
        and the accuracy the most recent."""
        from prometheus_client import Gauge

        target = None if self.multiproc else self.registry

        def gauge(name, doc, mode):
            return Gauge(name, doc, registry=target, **({"multiprocess_mode": mode} if self.multiproc else {}))

        promotions = gauge("mlk_gate_promotions", "Replaced model files the gate promoted", "max")
        rejections = gauge("mlk_gate_rejections", "Replaced model files the gate rejected (the current model kept)", "max")
        candidate_accuracy = gauge("mlk_gate_candidate_accuracy", "Evaluation-set accuracy of the last candidate model",
                                   "mostrecent")
        served_accuracy = gauge("mlk_gate_served_accuracy", "Evaluation-set accuracy of the model being served",
                                "mostrecent")

        def on_decision(gate, decision):
            promotions.set(gate.promotions)
            rejections.set(gate.rejections)
            if decision["candidate"]["accuracy"] is not None:
                candidate_accuracy.set(decision["candidate"]["accuracy"])
            kept = decision["candidate"] if decision["decision"] != "rejected" else decision["current"]
            if kept and kept["accuracy"] is not None:
                served_accuracy.set(kept["accuracy"])

        return on_decision

    def text(self):
        """(/metrics body, its Content-Type): the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def build_gate(gate_data, gate_epsilon, gate_state, metrics):
    """gate.py's Gate on the evaluation set gate_data, its decisions in metrics' gauges; None without gate_data."""
    if gate_state and not gate_data:
        raise ValueError("gate_state needs gate_data: the state keeps the gate's decisions")
    if not gate_data:
        return None
    on_decision = metrics.gate_recorder()
    gate = gate_module.Gate(gate_data, gate_epsilon, lambda decision: on_decision(gate, decision), state=gate_state)
    return gate


def count_requests(app, metrics):
    """Every request Flask answers counted by route (its rule), method and status, and timed."""

    @app.before_request
    def start_timer():
        request.environ["mlk.started"] = time.perf_counter()

    @app.after_request
    def record(response):
        started = request.environ.get("mlk.started")
        metrics.record(request.url_rule.rule if request.url_rule else "other", request.method, response.status_code,
                       None if started is None else time.perf_counter() - started)
        return response


# ------------------------------------------------------------------------------------ answers


class Pages:
    """The HTML page (templates/index.html, with the round ledger's history) and every error answer."""

    def __init__(self, ledger, live=False):
        self.ledger = ledger
        self.live = live  # the live card (page.js polls /api/progress)

    def page(self, **values):
        ledger, model = self.ledger, values.get("model")
        rounds = ledger.rounds()
        served_round = ledger.entry_for(model.sha256) if model else None
        values.update(history=history_rows(rounds, model.sha256 if model else None),
                      history_plot=bool(rounds) and ledger.has_plot(), served_round=served_round,
                      served_workers=worker_notes(served_round) if served_round else [], live=self.live)
        return render_template("index.html", **values)

    def error(self, status, message, headers=None):
        """The page with the error for /upload (a form's answer), {"error": message} everywhere else; the
        message as one_line() makes it."""
        message = one_line(message)
        if request.path == "/upload":
            return self.page(error=message, result=None, model=None), status, headers or {}
        return jsonify(error=message), status, headers or {}


def one_line(text, limit=300):
    """A message as a client gets it: one line, no absolute path (shown as <path>), at most `limit` characters.
    Answers are worded not to need this; it is the net under them (and under werkzeug's descriptions)."""
    text = " ".join(str(text).split())
    text = re.sub(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+~-]+){2,}/?", "<path>", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def answer_errors(app, pages):
    """HTTP errors (404, 405, 413, ...) and unexpected exceptions as Pages.error answers."""

    @app.errorhandler(HTTPException)
    def http_error(err):
        if isinstance(err, RequestEntityTooLarge):
            return pages.error(413, f"request body too large (limit {MAX_BODY // (1024 * 1024)} MB)")
        headers = {}
        if isinstance(err, MethodNotAllowed) and err.valid_methods:
            headers["Allow"] = ", ".join(sorted(err.valid_methods))
        if err.code not in HTTP_MESSAGES:  # the client gets werkzeug's name for it; the log its description
            log.warning("%s %s: %s %s", request.method, request.path, err.code, one_line(err.description))
        return pages.error(err.code or 400, HTTP_MESSAGES.get(err.code) or err.name.lower(), headers)

    @app.errorhandler(Exception)
    def unexpected(err):  # last resort: log it, answer JSON, keep the worker alive
        log.exception("unexpected error")
        return pages.error(500, "internal error")


HTTP_MESSAGES = {404: "no such route", 405: "method not allowed"}  # werkzeug's descriptions are sentences


class InMemoryRequest(Request):
    """Multipart file parts stay in memory (werkzeug spools parts over 500 kB to a temp file)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()  # bounded by MAX_CONTENT_LENGTH (2 MB)


def uploads():
    """The images of this request as bytes: multipart `file` parts, or a raw image/* body. Raises ImageError."""
    content_type = request.mimetype or ""
    if content_type.startswith("image/"):
        return [request.get_data(cache=False)]
    if content_type != "multipart/form-data":
        raise ImageError("send the image as multipart field 'file' or as a raw body with an image/* content type")
    files = multipart_files(request.get_data(cache=False), request.mimetype_params.get("boundary"))
    if not files:
        raise ImageError("missing multipart field 'file'")
    if len(files) > MAX_FILES:
        raise ImageError(f"too many files ({len(files)}; limit {MAX_FILES})")
    return files


def multipart_files(body, boundary):
    """The `file` parts of a multipart/form-data body, in order, as bytes: with a filename (a file input,
    curl -F file=@x.png) or without (curl -F file=<x.png); other parts are skipped. werkzeug's own parser
    (request.files) would put a part without a filename in request.form, decoded as text. Raises ImageError
    for a body that is not multipart (no boundary, malformed, cut short) or has over MAX_PARTS parts."""
    if not boundary:
        raise ImageError("multipart body without a boundary parameter in its Content-Type")
    try:
        decoder = MultipartDecoder(boundary.encode("latin-1"), max_form_memory_size=None, max_parts=MAX_PARTS)
        decoder.receive_data(body)
        decoder.receive_data(None)
        files, name, chunks = [], None, []
        event = decoder.next_event()
        while not isinstance(event, (Epilogue, NeedData)):
            if isinstance(event, (Field, File)):
                name, chunks = event.name, []
            elif isinstance(event, Data):
                chunks.append(event.data)
                if not event.more_data and name == "file":
                    files.append(b"".join(chunks))
            event = decoder.next_event()
    except RequestEntityTooLarge:
        raise ImageError(f"too many multipart parts (limit {MAX_PARTS})") from None
    except (ValueError, UnicodeError) as err:
        log.warning("malformed multipart body: %s", err)
        raise ImageError("malformed multipart body") from None
    if isinstance(event, NeedData):
        raise ImageError("malformed multipart body (it ends before its closing boundary)")
    return files


def predict_answer(predictor, blobs):
    """POST /api/predict's answer to these images, (status, JSON payload), from Flask's route or the fast path:
    one image: its prediction; several: {"predictions": [...]}; 400 a bad image, 503 no model yet."""
    try:
        results = predictor.predict(Predictor.images(blobs)).results
    except ImageError as err:
        return image_status(err), {"error": one_line(err)}
    except ModelNotReady as err:
        return 503, {"error": str(err)}
    return 200, results[0] if len(blobs) == 1 else {"predictions": results}


def image_status(err):
    """The status an ImageError is answered with: its own (preprocess.py: 400, 413 over the request's pixel
    budget, 415 a format not read), 400 when it has none."""
    status = getattr(err, "status", 400)
    return status if status in (400, 413, 415) else 400


# ------------------------------------------------------------------------------------------ routes


def page_routes(predictor, pages):
    """GET / (the upload form and canvas) and POST /upload (the page with the first image's prediction)."""
    bp = Blueprint("pages", __name__)

    @bp.get("/")
    def index():
        return pages.page(result=None, error=None, model=predictor.model())

    @bp.post("/upload")
    def upload():
        try:
            predicted = predictor.predict(Predictor.images(uploads()[:1]))
        except ImageError as err:
            return pages.error(image_status(err), str(err))
        except ModelNotReady as err:
            return pages.error(503, str(err))
        return pages.page(result=predicted.results[0], error=None, model=predicted.model)

    return bp


def api_routes(predictor, pages):
    """POST /api/predict through Flask: what fastpath.FastPath does not take (and answers the same way)."""
    bp = Blueprint("api", __name__)

    @bp.post("/api/predict")
    def api_predict():
        try:
            blobs = uploads()
        except ImageError as err:
            return pages.error(image_status(err), str(err))
        status, payload = predict_answer(predictor, blobs)
        return jsonify(payload), status

    return bp


def status_routes(predictor, ledger, gate, metrics, internal, live=None):
    """/healthz (the process answers), /readyz (a model is served; or, with --progress-dir, a run is training
    and no model file exists yet: 200 "training"), /api/model (which, with its round and the gate's record: in
    full to internal requests, its public fields to others) and /metrics (internal requests only). internal():
    whether this request is internal (INTERNAL_HEADER)."""
    bp = Blueprint("status", __name__)

    @bp.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @bp.get("/readyz")
    def readyz():
        model = predictor.ready_model()
        if model is None and live is not None and not os.path.exists(predictor.holder.path) and live.live():
            # The page is what there is to serve while the first aggregate is trained (predictions: 503).
            # Only while no model file exists: a file that cannot be loaded (or one a restart must gate) is
            # still not ready, so a rollout never replaces a serving pod by one without its model.
            return jsonify(status="training", model=None)
        if model is None:
            return jsonify(status="not ready", error=predictor.not_ready_detail() if internal() else
                           predictor.not_ready()), 503
        return jsonify(status="ready", model=model_id(model.sha256))

    @bp.get("/api/model")
    def api_model():
        model = predictor.model()
        full = internal()
        if model is None:
            if full:
                return jsonify(error=predictor.not_ready_detail(), path=predictor.holder.path), 503
            return jsonify(error=predictor.not_ready()), 503
        info = model.info()
        rounds = ledger.rounds()
        entry = ledger.entry_for(model.sha256)
        info["ledger"] = {"round": entry["round"] if entry else None, "entry": entry,
                          "aggregation": aggregation_text(entry) if entry else None,
                          "history": "/api/history" if rounds else None,
                          "plot": "/history.png" if rounds and ledger.has_plot() else None}
        info["gate"] = gate.info(model) if gate is not None else None
        return jsonify(info if full else public_model_info(info))

    @bp.get("/metrics")
    def metrics_text():
        if not internal():
            return jsonify(error="no such route"), 404
        body, content_type = metrics.text()
        return body, 200, {"Content-Type": content_type}

    return bp


PUBLIC_MODEL_FIELDS = ("sha256", "loaded_at", "runtime", "kind", "workers", "round", "samples", "epochs", "ledger")
PUBLIC_GATE_FIELDS = ("epsilon", "promotions", "rejections", "served_accuracy", "restored")
PUBLIC_DECISION_FIELDS = ("at", "decision", "candidate", "current", "seconds")


def public_model_info(info):
    """/api/model for any client: which model (id, sha256), its round, workers, samples and epochs, the ledger's
    links, the gate's decisions in summary; not the file's path, its attributes (worker file names), the gate's
    evaluation-set path, state directory or errors, nor a decision's reason (which names files)."""
    public = {key: info.get(key) for key in PUBLIC_MODEL_FIELDS}
    public["model"] = model_id(info["sha256"])
    gate = info.get("gate")
    if gate is not None:
        decision = gate.get("last_decision")
        gate = {key: gate.get(key) for key in PUBLIC_GATE_FIELDS}
        gate["last_decision"] = None if decision is None else {key: decision.get(key) for key in PUBLIC_DECISION_FIELDS}
    public["gate"] = gate
    return public


def live_routes(predictor, ledger, live, pages):
    """/api/progress: the run as it happens (progress.py), with the served model; 404 without --progress-dir."""
    bp = Blueprint("live", __name__)

    @bp.get("/api/progress")
    def api_progress():
        if live is None:
            return pages.error(404, "no live progress (the server runs without --progress-dir)")
        model = predictor.model()
        served = None
        if model is not None:
            entry = ledger.entry_for(model.sha256)
            attr_round = model.attrs.get("mlk_round")
            served = {"model": model_id(model.sha256),
                      "round": entry["round"] if entry else (int(attr_round) if str(attr_round).isdigit() else None),
                      "test_accuracy": progress_module.number(entry.get("test_accuracy")) if entry else None}
        response = jsonify(live.snapshot(served))
        response.headers["Cache-Control"] = "no-store"
        return response

    return bp


def history_routes(ledger, pages):
    """/api/history (the round ledger as JSON) and /history.png (its plot); 404 while there is none."""
    bp = Blueprint("history", __name__)

    @bp.get("/api/history")
    def api_history():
        rounds = ledger.rounds()
        if not rounds:
            return pages.error(404, "no training history (the round ledger is absent, empty or unreadable)")
        return jsonify({"format": LEDGER_FORMAT, "rounds": rounds})

    @bp.get("/history.png")
    def history_png():
        if not ledger.has_plot():
            return pages.error(404, "no history plot")
        with open(ledger.plot_path, "rb") as f:  # read whole: the aggregator may replace it meanwhile
            return send_file(io.BytesIO(f.read()), mimetype="image/png", max_age=0)

    return bp


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
            rounds = [finite(entry) for entry in read_ledger(self.path)["rounds"]]
        except (OSError, ValueError, RecursionError) as err:  # LedgerFormatError is a ValueError
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


def finite(value):
    """A ledger value with every float that is not finite (NaN, Infinity: Python's json reads them) and every
    integer beyond 64 bits as None, so /api/history and /api/model answer standard JSON and the page formats
    only numbers it can ("%.4f" of a 400-digit integer is an OverflowError)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -2 ** 63 <= value < 2 ** 64 else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def _number(value, fmt):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    if isinstance(value, int) and abs(value) > 10 ** 18:  # "%.4f" of a 400-digit int: OverflowError
        return ""
    return fmt % value


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


def aggregation_text(entry):
    """How a ledger entry's models became one, as a short string: the rule (fedavg when the entry records none) with
    its parameters, then the server optimiser's, e.g. "trimmed-mean (beta 0.2) + fedavgm (server_lr 1, momentum 0.9)".
    Only plain numbers and short words from the ledger are shown."""

    def word(value):
        text = str(value) if isinstance(value, str) else ""
        return text if text and len(text) <= 32 and all(c.isalnum() or c in "-_" for c in text) else "?"

    def described(name, record, keys):
        params = [f"{key} {_number(record.get(key), '%g')}" for key in keys if _number(record.get(key), "%g")]
        return f"{name} ({', '.join(params)})" if params else name

    rule = entry.get("aggregation") if isinstance(entry.get("aggregation"), dict) else {}
    text = described(word(rule.get("rule")) if rule else "fedavg", rule, ("beta", "f", "m"))
    optimizer = entry.get("server_optimizer") if isinstance(entry.get("server_optimizer"), dict) else None
    if optimizer:
        text += " + " + described(word(optimizer.get("name")), optimizer, ("server_lr", "momentum"))
    return text


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
            "aggregation": aggregation_text(entry),
            "served": bool(served_sha256) and aggregate.get("sha256") == served_sha256,
        })
    return rows
