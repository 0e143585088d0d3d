"""The prediction server (server/app.py, predictor.py, fastpath.py, model.py, server.py) through Flask's test
client: every route, every kind of bad input, hot reload, the command line, the batcher, the one prediction
pipeline (Predictor) and its JSON, the fast path of POST /api/predict."""

import base64
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import thick_seven_png

ROOT = Path(__file__).resolve().parents[1]
import app as server_app  # noqa: E402
import fastpath  # noqa: E402
import model as server_model  # noqa: E402
import predictor as server_predictor  # noqa: E402
import preprocess  # noqa: E402
import server  # noqa: E402

SAMPLES = ROOT / "samples"
INTERNAL = {server_app.INTERNAL_HEADER: "1"}  # as nginx's internal port sets it: /metrics, the full /api/model


def png_bytes(array_or_image, fmt="PNG"):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png_header_only(width, height):
    """A PNG signature + IHDR claiming width x height, with a valid CRC and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def bomb_png():
    """A small (~20 kB) PNG that decodes to 12000x12000 pixels."""
    return png_bytes(Image.new("1", (12000, 12000)))


def post_files(client, url, *blobs, field="file"):
    data = {field: [(io.BytesIO(blob), f"f{i}.png") for i, blob in enumerate(blobs)]}
    return client.post(url, data=data, content_type="multipart/form-data")


# ------------------------------------------------------------------------------------ routes


def test_page_has_upload_form_canvas_and_sample_links(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'action="/upload"' in html and 'name="file"' in html and 'enctype="multipart/form-data"' in html
    assert '<canvas id="pad"' in html and 'src="/static/page.js"' in html and 'href="/static/page.css"' in html
    script = client.get("/static/page.js").get_data(as_text=True)  # a file: the CSP allows no inline script
    assert "pointerdown" in script and "/api/predict" in script
    assert "<script>" not in html and "<style" not in html and "style=" not in html
    assert 'name="viewport"' in html
    for name in ("4.png", "6.png", "photo-3.jpg"):
        assert f"/static/samples/{name}" in html
        linked = client.get(f"/static/samples/{name}")
        assert linked.status_code == 200 and linked.data == (SAMPLES / name).read_bytes()


def test_healthz_and_readyz(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"


def test_api_model_reports_file_hash_and_aggregator_attributes(client, mnist_model):
    info = client.get("/api/model", headers=INTERNAL).get_json()
    assert info["sha256"] == hashlib.sha256(mnist_model.read_bytes()).hexdigest()
    assert info["path"] == str(mnist_model)
    assert info["workers"] == 1 and info["round"] == 1 and info["samples"] == 12000 and info["kind"] == "aggregated"
    assert info["attributes"]["mlk_inputs"][0]["file"] == "0-model.h5"
    assert info["load_seconds"] > 0 and info["loaded_at"].endswith("Z")


@pytest.mark.parametrize("name,digit", [("6.png", 6), ("4.png", 4), ("photo-2.jpg", 2), ("photo-3.jpg", 3),
                                        ("photo-7.jpg", 7)])
def test_api_predict_samples(client, name, digit):
    response = post_files(client, "/api/predict", (SAMPLES / name).read_bytes())
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["digit"] == digit
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
    assert body["probabilities"][digit] == max(body["probabilities"])
    assert len(body["model"]) == 12


def test_api_predict_raw_body(client):
    response = client.post("/api/predict", data=(SAMPLES / "6.png").read_bytes(), content_type="image/png")
    assert response.status_code == 200 and response.get_json()["digit"] == 6


def test_api_predict_several_files_in_order(client):
    response = post_files(client, "/api/predict", *((SAMPLES / n).read_bytes() for n in ("4.png", "6.png", "photo-3.jpg")))
    assert response.status_code == 200
    assert [p["digit"] for p in response.get_json()["predictions"]] == [4, 6, 3]


def test_upload_form_returns_html_with_prediction_and_probabilities(client):
    response = post_files(client, "/upload", (SAMPLES / "6.png").read_bytes())
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "predict 6" in html  # literally, as the original page said it
    assert html.count('class="bar') >= 10


def test_a_thick_upload_is_answered_with_the_mean_of_its_views(client, mnist_model):
    """Strokes much wider than MNIST's are scored as drawn and thinned; the answer is the mean of the two.
    In a request with other files, each file still gets its own row."""
    blob = thick_seven_png()
    views = preprocess.preprocess_views(blob)
    assert len(views) == 2
    loaded = server_model.LoadedModel(str(mnist_model), server_model.file_signature(str(mnist_model)))
    expected = loaded.predict(views).mean(axis=0)
    six = (SAMPLES / "6.png").read_bytes()
    response = post_files(client, "/api/predict", six, blob, six)
    assert response.status_code == 200, response.get_data(as_text=True)
    rows = response.get_json()["predictions"]
    assert len(rows) == 3 and rows[0] == rows[2] and rows[0]["digit"] == 6
    assert np.allclose(rows[1]["probabilities"], expected, atol=2e-6)
    assert rows[1]["digit"] == int(np.argmax(expected))
    assert not np.allclose(expected, loaded.predict(views[:1])[0], rtol=0, atol=1e-6)  # the second view counts


def test_canvas_style_image_black_strokes_on_transparent(client, mnist_test):
    x, y = mnist_test
    digit = x[np.flatnonzero(y == 7)[0]]
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR))
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., 3] = big  # black ink, alpha = stroke
    response = post_files(client, "/api/predict", png_bytes(Image.fromarray(rgba, "RGBA")))
    assert response.status_code == 200 and response.get_json()["digit"] == 7


def test_metrics_count_requests_latency_and_predictions(client):
    post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes())
    client.post("/api/predict", data={}, content_type="multipart/form-data")
    text = client.get("/metrics", headers=INTERNAL).get_data(as_text=True)
    assert 'mlk_http_requests_total{method="POST",route="/api/predict",status="200"}' in text
    assert 'mlk_http_requests_total{method="POST",route="/api/predict",status="400"}' in text
    assert 'mlk_http_request_duration_seconds_bucket{le="0.05",route="/api/predict"}' in text
    assert 'mlk_predictions_total{digit="6"}' in text
    assert "mlk_model_loads_total 1.0" in text


# ------------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    "empty file": (b"", "empty"),
    "text as image": (b"hello, this is not a picture\n" * 10, "not an image"),
    "html as image": (b"<!doctype html><html><body><img src=x></body></html>", "not an image"),
    "truncated png": (None, "corrupt"),
    "corrupt bytes": (b"\x89PNG\r\n\x1a\n" + os.urandom(300), None),
    "zero-size png": (png_header_only(0, 10), None),
    "decompression bomb": (None, "too large"),
}


def bad_blob(kind):
    blob, _ = BAD_INPUTS[kind]
    if kind == "truncated png":
        full = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
        return full[: len(full) // 2]
    if kind == "decompression bomb":
        return bomb_png()
    return blob


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_image_gets_400_json(client, kind):
    blob = bad_blob(kind)
    response = post_files(client, "/api/predict", blob)
    assert response.status_code == 400, (kind, response.status_code, response.get_data(as_text=True))
    error = response.get_json()["error"]
    expected = BAD_INPUTS[kind][1]
    if expected:
        assert expected in error, error
    # the same as a raw body, and the HTML form
    raw = client.post("/api/predict", data=blob, content_type="image/png")
    assert raw.status_code == 400 and raw.is_json
    form = post_files(client, "/upload", blob)
    assert form.status_code == 400 and form.mimetype == "text/html" and 'class="error"' in form.get_data(as_text=True)


def test_bomb_is_small_but_refused_before_decoding(client):
    assert len(bomb_png()) < 100_000
    assert "too large" in post_files(client, "/api/predict", bomb_png()).get_json()["error"]


def test_missing_field_and_wrong_content_type(client):
    missing = post_files(client, "/api/predict", b"abc", field="image")
    assert missing.status_code == 400 and "missing multipart field 'file'" in missing.get_json()["error"]
    as_json = client.post("/api/predict", json={"file": "x"})
    assert as_json.status_code == 400 and "multipart" in as_json.get_json()["error"]
    form = client.post("/upload", data={}, content_type="multipart/form-data")
    assert form.status_code == 400 and "missing" in form.get_data(as_text=True)


def test_body_over_2_mb_gets_413(client):
    big = b"\0" * (2 * 1024 * 1024 + 10)
    for response in (post_files(client, "/api/predict", big),
                     client.post("/api/predict", data=big, content_type="image/png")):
        assert response.status_code == 413 and "too large" in response.get_json()["error"]
    form = post_files(client, "/upload", big)
    assert form.status_code == 413 and form.mimetype == "text/html"


def test_wrong_method_and_unknown_route_are_json_4xx(client):
    assert client.get("/api/predict").status_code == 405 and client.get("/api/predict").is_json
    assert client.get("/nope").status_code == 404


def test_uploads_never_touch_the_disk(client, tmp_path, monkeypatch):
    import werkzeug.formparser

    def no_temp_files(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_temp_files)
    monkeypatch.setattr(werkzeug.formparser, "TemporaryFile", no_temp_files, raising=False)
    noisy = np.random.default_rng(3).integers(0, 256, (800, 800), dtype=np.uint8)  # ~640 kB PNG
    big = png_bytes(noisy)
    assert 600_000 < len(big) < 2_000_000
    assert post_files(client, "/api/predict", big).status_code == 200
    monkeypatch.chdir(tmp_path)
    data = {"file": (io.BytesIO((SAMPLES / "6.png").read_bytes()), "../../evil.png")}
    assert client.post("/api/predict", data=data, content_type="multipart/form-data").status_code == 200
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ model lifecycle


def constant_model(source, target, digit):
    """Copy of `source` whose output is always `digit` (zero last-layer weights, large bias)."""
    import keras

    model = keras.models.load_model(source, compile=False)
    kernel, bias = model.layers[-1].get_weights()
    bias = np.full_like(bias, -10.0)
    bias[digit] = 10.0
    model.layers[-1].set_weights([np.zeros_like(kernel), bias])
    model.save(target)
    return target


def replace(src, dst):
    tmp = dst.with_name(".incoming.h5")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def test_missing_model_then_appears(tmp_path, mnist_model):
    path = tmp_path / "aggregated-model.h5"
    app = server_app.create_app(str(path), check_interval=0)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.get_json()["error"].startswith("no model: its file is missing")
    assert str(tmp_path) not in not_ready.get_data(as_text=True)  # the path: to the log and internal requests
    detail = client.get("/readyz", headers=INTERNAL).get_json()["error"]
    assert "does not exist" in detail and str(path) in detail
    assert post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes()).status_code == 503
    assert client.get("/api/model").status_code == 503 and "path" not in client.get("/api/model").get_json()
    assert client.get("/api/model", headers=INTERNAL).get_json()["path"] == str(path)
    assert client.get("/").status_code == 200
    replace(mnist_model, path)
    assert client.get("/readyz").status_code == 200
    assert post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes()).get_json()["digit"] == 6


def test_hot_reload_swaps_model_without_failing_requests(tmp_path, mnist_model):
    path = tmp_path / "aggregated-model.h5"
    shutil.copyfile(mnist_model, path)
    always_three = constant_model(mnist_model, tmp_path / "three.h5", 3)
    app = server_app.create_app(str(path), check_interval=0)
    six = (SAMPLES / "6.png").read_bytes()
    first = post_files(app.test_client(), "/api/predict", six).get_json()
    assert first["digit"] == 6

    statuses, digits, stop = [], [], threading.Event()

    def hammer():
        client = app.test_client()
        while not stop.is_set():
            response = post_files(client, "/api/predict", six)
            statuses.append(response.status_code)
            digits.append(response.get_json().get("digit"))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        replace(always_three, path)
        client = app.test_client()
        deadline = time.monotonic() + 60  # a load converts the model for LiteRT too: seconds on a busy machine
        while post_files(client, "/api/predict", six).get_json()["digit"] != 3:
            if time.monotonic() > deadline:
                pytest.fail("the replaced model was never served")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200}, "a request failed during the swap"
    assert len(statuses) > 3 and set(digits) <= {3, 6}
    info = app.test_client().get("/api/model").get_json()
    assert info["sha256"] == hashlib.sha256(always_three.read_bytes()).hexdigest()
    assert "mlk_model_loads_total 2.0" in app.test_client().get("/metrics", headers=INTERNAL).get_data(as_text=True)


def reload_threads():
    return [t for t in threading.enumerate() if t.name == "mlk-model-reload"]


def test_background_reload_answers_with_the_old_model_until_the_new_one_is_in(tmp_path, mnist_model):
    """server.py's workers take one request at a time: the request that notices a replaced file must not load it."""
    path = tmp_path / "aggregated-model.h5"
    shutil.copyfile(mnist_model, path)
    always_three = constant_model(mnist_model, tmp_path / "three.h5", 3)
    app = server_app.create_app(str(path), check_interval=0, background_reload=True)
    client = app.test_client()
    six = (SAMPLES / "6.png").read_bytes()
    assert post_files(client, "/api/predict", six).get_json()["digit"] == 6
    replace(always_three, path)
    # this request starts the load (a conversion for LiteRT: a second or more) and is answered by the old model
    assert post_files(client, "/api/predict", six).get_json()["digit"] == 6
    assert len(reload_threads()) == 1
    assert client.get("/readyz").status_code == 200
    deadline = time.monotonic() + 60
    while post_files(client, "/api/predict", six).get_json()["digit"] != 3:
        assert time.monotonic() < deadline, "the replaced model was never served"
        time.sleep(0.05)
    assert client.get("/api/model").get_json()["sha256"] == hashlib.sha256(always_three.read_bytes()).hexdigest()
    for thread in reload_threads():
        thread.join(30)
    post_files(client, "/api/predict", six)
    assert reload_threads() == []  # the file is the served one: no load started


def test_background_reload_of_a_corrupt_file_keeps_the_old_model_and_is_not_retried(tmp_path, mnist_model):
    path = tmp_path / "aggregated-model.h5"
    shutil.copyfile(mnist_model, path)
    app = server_app.create_app(str(path), check_interval=0, background_reload=True)
    client = app.test_client()
    sha = client.get("/api/model").get_json()["sha256"]
    tmp = tmp_path / ".x"
    tmp.write_bytes(b"not an hdf5 file")
    os.replace(tmp, path)
    assert post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes()).get_json()["digit"] == 6
    for thread in reload_threads():
        thread.join(30)
    assert "cannot load" in app.extensions["mlk_model"].last_error
    for _ in range(3):  # the same bad file: not loaded again
        assert client.get("/api/model").get_json()["sha256"] == sha
        assert reload_threads() == []
    assert post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes()).get_json()["digit"] == 6


def test_corrupt_replacement_keeps_serving_the_old_model(tmp_path, mnist_model):
    path = tmp_path / "aggregated-model.h5"
    shutil.copyfile(mnist_model, path)
    app = server_app.create_app(str(path), check_interval=0)
    client = app.test_client()
    sha = client.get("/api/model").get_json()["sha256"]
    tmp = tmp_path / ".x"
    tmp.write_bytes(b"not an hdf5 file")
    os.replace(tmp, path)
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/model").get_json()["sha256"] == sha
    assert post_files(client, "/api/predict", (SAMPLES / "6.png").read_bytes()).get_json()["digit"] == 6


# ------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,message", [
    ([], "--model"),
    (["--model", "m.h5", "--port", "0"], "--port"),
    (["--model", "m.h5", "--workers", "0"], "--workers"),
    (["--model", "/"], "directory"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert server.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("server.py: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("flag", ["--header-timeout", "--body-timeout", "--keepalive-timeout"])
def test_cli_bad_timeouts_exit_2(flag, capsys):
    assert server.main(["--model", "m.h5", flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("server.py: error:") and flag in err and "\n" not in err


def test_missing_nginx_is_one_line_naming_the_package(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLK_NGINX", str(tmp_path / "no-nginx"))
    assert server.main(["--model", str(tmp_path / "m.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("server.py: error: nginx not found") and "apt-get install nginx-light" in err
    assert "\n" not in err


def test_nginx_config_fills_every_placeholder_and_nginx_accepts_it(tmp_path):
    args = server.build_parser().parse_args(["--model", "m.h5", "--host", "::1", "--port", "5123",
                                             "--header-timeout", "7", "--body-timeout", "8", "--keepalive-timeout", "9"])
    text = server.nginx_config(args, str(tmp_path), str(tmp_path / "g.sock"))
    assert "{{" not in text
    for line in ("listen [::1]:5123", "client_header_timeout 7s;", "client_body_timeout 8s;", "keepalive_timeout 9s;",
                 "client_max_body_size 2m;", "client_body_buffer_size 2m;", f"server unix:{tmp_path}/g.sock;",
                 "proxy_max_temp_file_size 0;"):
        assert line in text, line
    (tmp_path / "nginx.conf").write_text(text)
    nginx = server.find_nginx()
    assert nginx, "nginx not installed (Debian: apt-get install nginx-light)"
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # Everything nginx writes is under the run directory (the container's root is read-only).
    written = [line.split()[1].rstrip(";") for line in text.splitlines()
               if line.strip().split(" ")[0] in ("pid", "client_body_temp_path", "proxy_temp_path",
                                                 "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path")]
    assert len(written) == 6 and all(path.startswith(f"{tmp_path}/") for path in written), written
    assert "error_log stderr" in text and "access_log off;" in text


def test_nginx_gates_readiness_on_every_worker_and_buffers_for_the_app(tmp_path):
    """nginx alone (server.py's Nginx), in front of a stand-in app on the unix socket: /readyz is 503 until
    the workers' `ready/all` file exists, then the app's answer; the app gets whole requests."""
    import http.client
    import http.server
    import socket
    import socketserver

    seen, spooled = [], []
    run_dir = tmp_path / "run"

    def nginx_temp_files():
        """Files nginx has open under its client_body temp dir (unlinked at once, so read from /proc)."""
        master = nginx.proc.pid
        pids = [master] + Path(f"/proc/{master}/task/{master}/children").read_text().split()
        found = []
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(str(run_dir / "client_body")):
                    found.append(target)
        return found

    class App(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self._answer(b'{"status": "ready"}')

        def do_POST(self):
            spooled.append(nginx_temp_files())  # while nginx still holds the body
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            self._answer(b'{"got": %d}' % len(seen[-1]))

        def _answer(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self):
            conn, _ = self.socket.accept()
            return conn, ("local", 0)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = server.build_parser().parse_args(["--model", "m.h5", "--host", "127.0.0.1", "--port", str(port)])
    (run_dir / "ready").mkdir(parents=True)
    app = UnixServer(str(run_dir / "g.sock"), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    nginx = server.Nginx(server.find_nginx(), str(run_dir), server.nginx_config(args, str(run_dir), str(run_dir / "g.sock")))
    try:
        assert nginx.start() is None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        assert response.status == 503 and b"workers still starting" in response.read()
        (run_dir / "ready" / "all").touch()
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b'{"status": "ready"}'
        body = os.urandom(1_500_000)
        conn.request("POST", "/api/predict", body=body, headers={"Content-Type": "image/png"})
        assert conn.getresponse().read() == b'{"got": 1500000}' and seen == [body]
        assert spooled == [[]]  # the body stayed in nginx's memory, never a temp file
    finally:
        nginx.stop()
        app.shutdown()
        app.server_close()
    assert nginx.proc.returncode is not None


def test_port_in_use_is_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert server.main(["--model", str(tmp_path / "m.h5"), "--host", "127.0.0.1", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("server.py: error: nginx exited") and "Address already in use" in err


def test_batcher_merges_concurrent_calls_and_returns_each_its_own_rows():
    class Recorder:
        def __init__(self):
            self.batches = []

        def predict(self, images):
            self.batches.append(len(images))
            time.sleep(0.02)  # long enough for the other threads to queue up
            return images.reshape(len(images), -1)[:, :10] * 2

    model, batcher = Recorder(), server_model.Batcher()
    results, errors = {}, []

    def call(i):
        try:
            images = np.full((1 + i % 3, 28, 28), float(i), np.float32)
            results[i] = batcher.predict(model, images)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, rows in results.items():
        assert rows.shape == (1 + i % 3, 10) and np.all(rows == 2.0 * i)
    assert sum(model.batches) == sum(1 + i % 3 for i in range(24))
    assert len(model.batches) < 24  # some calls were merged

    class Broken:
        def predict(self, images):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        batcher.predict(Broken(), np.zeros((1, 28, 28), np.float32))
    assert batcher.predict(model, np.ones((1, 28, 28), np.float32)).shape == (1, 10)  # still usable


# ------------------------------------------------------------------------- prediction JSON


def test_prediction_json_is_digit_rounded_probabilities_and_model_id():
    probabilities = np.array([0.01, 0.02, 0.03, 0.9, 0.01, 0.01, 0.0, 0.0, 0.0, 0.02 + 1e-9], np.float32)
    sha = "0123456789abcdef" * 4
    out = server_predictor.prediction_json(probabilities, sha)
    assert out == {"digit": 3, "probabilities": [round(float(p), 6) for p in probabilities], "model": "0123456789ab"}
    assert set(out) == {"digit", "probabilities", "model"}
    assert type(out["digit"]) is int and all(type(p) is float for p in out["probabilities"])
    assert out["probabilities"][9] == 0.02  # 6 decimals
    assert server_predictor.prediction_json([0.5, 0.5] + [0.0] * 8, sha)["digit"] == 0  # a tie: the first class
    assert server_predictor.prediction_json(np.eye(10)[7].astype(np.float64), sha)["digit"] == 7
    assert server_predictor.prediction_json(probabilities, sha) == out  # pure: same input, same output
    import json

    assert json.loads(json.dumps(out)) == out  # plain JSON types


def test_every_prediction_route_uses_prediction_json(client, monkeypatch):
    calls = []
    real = server_predictor.prediction_json

    def spy(probabilities, model_sha256):
        calls.append(model_sha256)
        return real(probabilities, model_sha256)

    monkeypatch.setattr(server_predictor, "prediction_json", spy)
    six = (SAMPLES / "6.png").read_bytes()
    single = post_files(client, "/api/predict", six).get_json()
    several = post_files(client, "/api/predict", six, six).get_json()
    raw = client.post("/api/predict", data=six, content_type="image/png").get_json()
    page = post_files(client, "/upload", six)
    assert len(calls) == 5 and page.status_code == 200
    v2_image = client.post("/v2/models/mnist/infer", json={"inputs": [{
        "name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(six).decode()],
        "parameters": {"content_type": "base64"}}]})
    v2_arrays = client.post("/v2/models/mnist/infer", json={"inputs": [{
        "name": "input", "datatype": "UINT8", "shape": [2, 784], "data": [0] * (2 * 784)}]})
    assert v2_image.status_code == v2_arrays.status_code == 200
    assert len(calls) == 5 + 1 + 2  # v2 too: one per image
    sha = client.get("/api/model").get_json()["sha256"]
    assert set(calls) == {sha}
    assert single == raw == several["predictions"][0] == several["predictions"][1]
    assert single["model"] == client.get("/readyz").get_json()["model"] == sha[:12]
    v2_answer = v2_image.get_json()
    assert v2_answer["parameters"]["model"] == sha[:12]
    assert v2_answer["outputs"][1] == {"name": "digit", "datatype": "INT64", "shape": [1], "data": [single["digit"]]}


# ------------------------------------------------------------------------- the one Predictor


class FakeHolder:
    """What Predictor needs of model.ModelHolder."""

    def __init__(self):
        self.current = self.last_error = None

    def get(self):
        return self.current


class FakeModel:
    """Answers class (row index + digit) for each image, with probability 0.7 (0.3 on class 0)."""

    def __init__(self, sha256, digit):
        self.sha256, self.digit = sha256, digit

    def predict(self, images):
        out = np.zeros((len(images), 10))
        for row in range(len(images)):
            out[row, 0] += 0.3
            out[row, (row + self.digit) % 10] += 0.7
        return out


def test_predictor_results_metric_hooks_and_not_ready():
    holder, digits, models = FakeHolder(), [], []
    predictor = server_predictor.Predictor(holder, server_model.Batcher(), on_digit=digits.append,
                                           on_new_model=models.append)
    two = server_predictor.Predictor.arrays(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(server_predictor.ModelNotReady, match="^model not loaded yet$"):
        predictor.predict(two)
    holder.last_error = "cannot load /m.h5: OSError: gone"
    with pytest.raises(server_predictor.ModelNotReady, match="^no model: its file is missing or cannot be loaded"):
        predictor.predict(two)  # the reason without the path, which is in the log and not_ready_detail
    assert predictor.not_ready_detail() == "cannot load /m.h5: OSError: gone"
    assert digits == [] and models == [] and predictor.ready_model() is None
    first = holder.current = FakeModel("ab" * 32, 3)
    out = predictor.predict(two)
    assert out.model is first and out.probabilities.shape == (2, 10)
    assert [r["digit"] for r in out.results] == [3, 4] and {r["model"] for r in out.results} == {"abababababab"}
    assert out.results[0]["probabilities"] == [0.3, 0, 0, 0.7, 0, 0, 0, 0, 0, 0]
    predictor.predict(two)
    assert digits == [3, 4, 3, 4] and models == [first]  # each prediction counted; the model once
    second = holder.current = FakeModel("cd" * 32, 8)
    assert [r["digit"] for r in predictor.predict(two).results] == [8, 9]
    assert models == [first, second] and predictor.ready_model() is second


def test_predictor_images_name_the_file_that_is_not_an_image():
    six = (SAMPLES / "6.png").read_bytes()
    images = server_predictor.Predictor.images([six, thick_seven_png(), six])
    assert images.images.shape == (4, 28, 28) and list(images.starts) == [0, 1, 3]  # the thick 7: two views
    assert server_predictor.Predictor.images([six]).starts is None
    with pytest.raises(server_predictor.UploadImageError) as several:
        server_predictor.Predictor.images([six, b"hello"])
    assert (several.value.index, several.value.count) == (1, 2)
    assert str(several.value).startswith("file 2: not an image") and several.value.reason.startswith("not an image")
    with pytest.raises(preprocess.ImageError) as one:  # an UploadImageError is an ImageError
        server_predictor.Predictor.images([b"hello"])
    assert str(one.value).startswith("not an image")


def test_the_gate_is_given_to_the_model_holder_at_construction(mnist_model, monkeypatch, tmp_path):
    built = []

    class Recording(server_model.ModelHolder):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("gate", "not given"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(server_app, "ModelHolder", Recording)
    np.savez(tmp_path / "eval.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.zeros(20, np.uint8))
    gated = server_app.create_app(str(mnist_model), gate_data=str(tmp_path / "eval.npz"))
    server_app.create_app(str(mnist_model))
    assert len(built) == 2 and built[1] is None
    assert built[0] is gated.extensions["mlk_gate"] and type(built[0]).__name__ == "Gate"
    assert gated.extensions["mlk_model"].current is not None  # the first model, through the gate it was given
    assert gated.extensions["mlk_gate"].last_decision["decision"] == "initial"


# ------------------------------------------------------------- the fast path of POST /api/predict

_BOUNDARY = "bnd"


def _part(blob, name="file", filename="d.png", extra=""):
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (f"--{_BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}Content-Type: image/png\r\n\r\n".encode()
            + blob + b"\r\n")


def _fast_path_cases():
    rng = np.random.default_rng(3)
    one, two = (png_bytes((rng.random((28, 28)) * 255).astype(np.uint8)) for _ in range(2))
    end = f"--{_BOUNDARY}--\r\n".encode()
    multipart = f"multipart/form-data; boundary={_BOUNDARY}"
    bodies = {
        "one": _part(one) + end, "two": _part(one) + _part(two) + end, "no final CRLF": _part(one) + end[:-2],
        "not an image": _part(b"notanimage") + end, "second bad": _part(one) + _part(b"xx") + end,
        "other field first": _part(b"hello", name="note", filename=None) + _part(one) + end,
        "no file field": _part(b"hello", name="note", filename=None) + end, "no filename": _part(one, filename=None) + end,
        "preamble": b"pre\r\n" + _part(one) + end, "LF only": _part(one).replace(b"\r\n", b"\n") + end,
        "epilogue": _part(one) + end + b"trailing", "truncated": _part(one), "empty": b"",
        "33 files": b"".join(_part(one) for _ in range(33)) + end, "extra header": _part(one, extra="X-Foo: 1\r\n") + end,
        "empty file": _part(b"") + end, "bad PNG": _part(b"\x89PNG\r\n\x1a\n" + b"\0" * 10) + end,
        # found by benchmarks/fuzz-server.py: werkzeug's delimiter after LF or CR alone
        "LF delimiter in a part": _part(b"\n--" + _BOUNDARY.encode() + b"\r\n" + one) + end,
        "CR delimiter in a part": _part(b"\r--" + _BOUNDARY.encode() + b"\r\n" + one) + end,
    }
    cases = [(name, body, multipart, None) for name, body in bodies.items()]
    cases += [("raw PNG", one, "image/png", None), ("raw not an image", b"zz", "image/jpeg", None),
              ("text", b"hi", "text/plain", None),
              ("upper-case type", bodies["one"], f"Multipart/Form-Data; boundary={_BOUNDARY}", None),
              ("no boundary", bodies["one"], "multipart/form-data", None),
              ("wrong boundary", bodies["one"], "multipart/form-data; boundary=zzz", None),
              ("quoted boundary", bodies["one"], f'multipart/form-data; boundary="{_BOUNDARY}"', None)]
    cases += [(f"Content-Length {length!r}", bodies["one"], multipart, length)
              for length in ("\xb2", "-1", " 5", "abc", str(3 * 1024 * 1024), str(len(bodies["one"]) + 10))]
    return cases


def _wsgi_call(wsgi, body, content_type, content_length=None):
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/predict", "SCRIPT_NAME": "", "QUERY_STRING": "",
               "SERVER_NAME": "x", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "CONTENT_TYPE": content_type, "HTTP_HOST": "x",
               "CONTENT_LENGTH": str(len(body)) if content_length is None else content_length,
               "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
    started = []
    chunks = wsgi(environ, lambda status, headers, exc_info=None: started.append((status, sorted(headers))))
    return started[0], b"".join(chunks)


def test_the_predict_fast_path_answers_byte_for_byte_as_flask_does(mnist_model):
    """POST /api/predict skips Flask for plain bodies (server/fastpath.py); every body shape, good or bad, gets
    exactly the status line, headers and body Flask's own route gives, and the plain ones really skip Flask."""
    from flask import Flask

    application = server_app.create_app(str(mnist_model))
    through_flask = []
    application.before_request(lambda: through_flask.append(1) and None)
    for name, body, content_type, length in _fast_path_cases():
        through_flask.clear()
        fast = _wsgi_call(application.wsgi_app, body, content_type, length)
        fast_used_flask = bool(through_flask)
        flask_only = _wsgi_call(lambda e, s: Flask.wsgi_app(application, e, s), body, content_type, length)
        assert fast == flask_only, name
        if name in ("one", "two", "raw PNG", "not an image", "quoted boundary"):
            assert not fast_used_flask, f"{name}: expected the fast path"


def test_the_fast_path_leaves_to_werkzeug_what_werkzeug_reads_otherwise():
    """Found by benchmarks/fuzz-server.py (the fast path predicted where Flask answered 400): "--boundary" after
    a lone LF or CR inside a part is a delimiter to werkzeug, and werkzeug refuses a part header line that is not
    UTF-8; the fast path hands both to Flask."""
    end = f"--{_BOUNDARY}--\r\n".encode()
    for inner in (b"\n--" + _BOUNDARY.encode() + b"\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv",
                  b"\r--" + _BOUNDARY.encode() + b"\r\n"):
        body = _part(b"data" + inner) + end
        assert fastpath.multipart_files(body, _BOUNDARY, max_files=32) is None
    header = (f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\nContent-Type: text/plai\x1dz:C"
              .encode("latin-1") + b"\x8c\xa4n\r\n\r\nxx\r\n" + end)
    assert fastpath.multipart_files(header, _BOUNDARY, max_files=32) is None
    with pytest.raises(preprocess.ImageError, match="^malformed multipart body$"):
        server_app.multipart_files(header, _BOUNDARY)
    plain = _part(b"a--" + _BOUNDARY.encode() + b"b") + end  # the boundary after no line break: still data
    assert fastpath.multipart_files(plain, _BOUNDARY, max_files=32) is None  # (rare; Flask reads it the same)
    assert server_app.multipart_files(plain, _BOUNDARY) == [b"a--" + _BOUNDARY.encode() + b"b"]


def test_multipart_files_takes_at_most_max_files_parts():
    end = f"--{_BOUNDARY}--\r\n".encode()
    two = _part(b"one") + _part(b"two") + end
    assert fastpath.multipart_files(two, _BOUNDARY, max_files=2) == [b"one", b"two"]
    assert fastpath.multipart_files(two, _BOUNDARY, max_files=1) is None  # then Flask answers (and counts them)
    assert fastpath.multipart_files(two, "other", max_files=2) is None


# ------------------------------------------------------------ what a hostile client can send (issue 28)


def _one_line_json_error(response):
    """The answer's {"error": ...}: one line, no absolute path (the contract of every error answer)."""
    assert response.is_json, response.get_data()
    error = response.get_json()["error"]
    assert isinstance(error, str) and "\n" not in error and "\r" not in error
    assert not any(root in error for root in ("/tmp", "/work", "/home", "/var", "/nonexistent")), error
    return error


def test_a_file_part_without_a_filename_is_an_upload(client):
    """curl -F file=<x.png sends the part without a filename: the same answer as with one, on the fast path and
    through Flask (a preamble makes the fast path hand the body to Flask)."""
    six = (SAMPLES / "6.png").read_bytes()
    end = f"--{_BOUNDARY}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={_BOUNDARY}"
    named = client.post("/api/predict", data=_part(six) + end, content_type=content_type)
    unnamed = client.post("/api/predict", data=_part(six, filename=None) + end, content_type=content_type)
    through_flask = client.post("/api/predict", data=b"preamble\r\n" + _part(six, filename=None) + end,
                                content_type=content_type)
    assert named.status_code == unnamed.status_code == through_flask.status_code == 200
    assert named.get_json() == unnamed.get_json() == through_flask.get_json() and named.get_json()["digit"] == 6
    form = client.post("/upload", data=_part(six, filename=None) + end, content_type=content_type)
    assert form.status_code == 200 and "6" in form.get_data(as_text=True)


def test_1001_small_parts_are_too_many_parts_not_a_body_too_large(client):
    parts = b"".join(_part(b"x", name=f"n{i}", filename=None) for i in range(1001))
    body = parts + f"--{_BOUNDARY}--\r\n".encode()
    assert len(body) < 200_000
    response = client.post("/api/predict", data=body, content_type=f"multipart/form-data; boundary={_BOUNDARY}")
    assert response.status_code == 400
    assert _one_line_json_error(response) == f"too many multipart parts (limit {server_app.MAX_PARTS})"


@pytest.mark.parametrize("body", [b"--bnd\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",  # cut short
                                  b"--bnd\r\nno colon here\r\n\r\nabc\r\n--bnd--\r\n", b"\r\n\r\n--", b"--bnd--\r\n"])
def test_malformed_multipart_is_a_one_line_400(client, body):
    response = client.post("/api/predict", data=b"junk\r\n" + body, content_type="multipart/form-data; boundary=bnd")
    assert response.status_code == 400
    _one_line_json_error(response)


def test_an_unknown_method_is_one_metric_label_and_unknown_routes_one_route(mnist_model):
    client = server_app.create_app(str(mnist_model)).test_client()  # metrics of its own
    for method in ("ZZZAAA", "YYYBBB", "M-SEARCH"):
        assert client.open("/api/predict", method=method).status_code == 405
    for path in ("/a", "/b/c", "/nonexistent/rounds/ledger.json"):
        assert client.get(path).status_code == 404
    text = client.get("/metrics", headers=INTERNAL).get_data(as_text=True)
    assert "ZZZAAA" not in text and "YYYBBB" not in text and "M-SEARCH" not in text
    assert 'mlk_http_requests_total{method="other",route="other",status="405"} 3.0' in text
    assert "/nonexistent" not in text and 'route="/a"' not in text and 'route="other",status="404"' in text


def test_metrics_answer_internal_requests_only(mnist_model):
    application = server_app.create_app(str(mnist_model))
    client = application.test_client()
    hidden = client.get("/metrics")
    assert hidden.status_code == 404 and _one_line_json_error(hidden) == "no such route"
    assert client.get("/metrics", headers={server_app.INTERNAL_HEADER: "yes"}).status_code == 404
    shown = client.get("/metrics", headers=INTERNAL)
    assert shown.status_code == 200 and "mlk_http_requests_total" in shown.get_data(as_text=True)
    untrusting = server_app.create_app(str(mnist_model), trust_internal_header=False).test_client()
    assert untrusting.get("/metrics", headers=INTERNAL).status_code == 404
    assert "path" not in untrusting.get("/api/model", headers=INTERNAL).get_json()


def test_api_model_without_the_internal_header_has_no_paths_or_internals(client, mnist_model):
    public = client.get("/api/model")
    info = public.get_json()
    full = client.get("/api/model", headers=INTERNAL).get_json()
    assert str(mnist_model) not in public.get_data(as_text=True) and str(mnist_model.parent) not in public.get_data(
        as_text=True)
    assert "path" not in info and "attributes" not in info and full["path"] == str(mnist_model)
    assert info["model"] == info["sha256"][:12] and info["sha256"] == full["sha256"]
    for key in ("round", "workers", "samples", "epochs", "ledger", "gate", "kind", "loaded_at", "runtime"):
        assert info[key] == full[key], key
    assert (info["round"], info["workers"], info["samples"]) == (1, 1, 12000)


def test_405_says_allow_and_keeps_its_json(client):
    response = client.get("/api/predict")
    assert response.status_code == 405 and response.headers["Allow"] == "OPTIONS, POST"
    assert _one_line_json_error(response) == "method not allowed"
    infer = client.get("/v2/models/mnist/infer")
    assert infer.status_code == 405 and "POST" in infer.headers["Allow"].split(", ") and infer.is_json
    assert set(client.delete("/").headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_a_404_names_no_path(client):
    response = client.get("/nonexistent/rounds/ledger.json")
    assert response.status_code == 404 and _one_line_json_error(response) == "no such route"


def tiff_bytes():
    return png_bytes(Image.new("L", (28, 28), 0), "TIFF")


def test_an_unsupported_format_is_415_on_every_prediction_route(client):
    """preprocess.py's UnsupportedImage (a TIFF, an ICO, ...) carries status 415: the fast path, Flask's route,
    the page and v2 answer it; a request's files share one pixel budget (413 over it)."""
    tiff = tiff_bytes()
    end = f"--{_BOUNDARY}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={_BOUNDARY}"
    fast = client.post("/api/predict", data=tiff, content_type="image/tiff")
    flask = client.post("/api/predict", data=b"pre\r\n" + _part(tiff) + end, content_type=content_type)
    page = client.post("/upload", data=_part(tiff) + end, content_type=content_type)
    v2 = client.post("/v2/models/mnist/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                     "data": [base64.b64encode(tiff).decode()], "parameters": {"content_type": "base64"}}]})
    assert (fast.status_code, flask.status_code, page.status_code, v2.status_code) == (415, 415, 415, 415)
    assert "unsupported image format" in _one_line_json_error(fast) and fast.get_json() == flask.get_json()
    assert "unsupported image format" in _one_line_json_error(v2)


def test_one_pixel_budget_for_all_the_files_of_a_request(client):
    """Two 25-megapixel PNGs (flat: 25 kB each) are 50 MP, over the request's 40 MP: 413, before the second is
    decoded; one of them alone is fine."""
    big = png_bytes(Image.new("L", (5000, 5000), 0))
    assert len(big) < 100_000
    alone = post_files(client, "/api/predict", big)
    assert alone.status_code == 200, alone.get_data()
    both = post_files(client, "/api/predict", big, big)
    assert both.status_code == 413 and "megapixels" in _one_line_json_error(both)


def test_error_answers_are_one_line_without_paths(client):
    answers = [client.post("/api/predict", data=b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, content_type="image/png"),
               client.post("/api/predict", data=b"x", content_type="text/plain"),
               client.get("/history.png"), client.get("/api/history"), client.put("/readyz"),
               client.post("/v2/models/mnist/infer", data=b"{\n\n", content_type="application/json"),
               client.post("/v2/models/mni\nst/infer", json={})]
    for response in answers:
        assert 400 <= response.status_code < 500
        _one_line_json_error(response)


@pytest.mark.parametrize("status", [200, 400, 413, 415, 418, 500, 503])
def test_the_fast_path_spells_every_status_line_as_werkzeug_does(status):
    """STATUS_LINES for the statuses an answer has (413 and 415 since preprocess.py's statuses), and any other
    spelled the same way rather than a KeyError out of the WSGI layer."""
    from werkzeug.wrappers import Response

    started = []
    fastpath.json_answer(lambda line, headers: started.append(line), status, {"error": "x"})
    assert started == [Response(status=status).status]
