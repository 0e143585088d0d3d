"""Slow and hostile clients against the real serving stack (server/server.py: nginx in front of gunicorn),
on loopback only, every wait bounded: a good client is answered while slow clients hold connections,
and slow or idle connections are closed by the server; one client address cannot take every request slot;
methods a route does not serve, nginx's own errors and a client's X-Mlk-Internal header never reach the app
as such; every answer carries the security headers. Figures (latency, memory) are in
benchmarks/benchmark-slow-clients.py, not here."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = (ROOT / "samples" / "6.png").read_bytes()
BOUNDARY = "mlktestboundary"
BODY = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"6.png\"\r\n"
        "Content-Type: image/png\r\n\r\n").encode() + SAMPLE + f"\r\n--{BOUNDARY}--\r\n".encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, log, *flags, ready="/readyz"):
    """server.py on 127.0.0.1: (process, public port); its internal port is process.internal_port."""
    port, internal_port = free_port(), free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), "--internal-port", str(internal_port), *flags],
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.DEVNULL,
                                stderr=err)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server.py exited with {proc.returncode}: {Path(log).read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", ready)
            if conn.getresponse().status == 200:
                proc.internal_port = internal_port
                return proc, port
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("server.py not ready within 180 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def slow_header(port, source="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")  # never the blank line
    return s


def slow_body(port, source="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    s.sendall((f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
               f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n--{BOUNDARY}\r\n").encode())
    return s


def still_open(s):
    """True when the server has neither answered nor closed the connection."""
    s.setblocking(False)
    try:
        s.recv(1)  # an answer or b"" (closed)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def seconds_until_closed(s, limit):
    """Read until the server closes s (answers are read and ignored); fails after `limit` seconds."""
    s.settimeout(limit)
    began = time.monotonic()
    try:
        while s.recv(65536):
            if time.monotonic() - began > limit:
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for more than {limit} s")
    return time.monotonic() - began


@pytest.fixture(scope="module")
def server(mnist_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("slow") / "server.log"
    proc, port = start_server(mnist_model, log)  # default timeouts: 10 s headers, 10 s body pauses
    INTERNAL_PORTS[port] = proc.internal_port
    LOGS[port] = log
    yield port
    stop_server(proc)


INTERNAL_PORTS = {}  # the `server` fixture's public port -> its internal port
LOGS = {}  # ... -> its server.py's stderr


@pytest.fixture(scope="module")
def internal(server):
    return INTERNAL_PORTS[server]


def test_good_client_is_answered_while_slow_clients_hold_connections(server):
    # another address than the good client's (127.0.0.2, a loopback alias): 32 requests past their headers
    # is the most one address may have (the good client would get 503s from the same address)
    slow = [slow_header(server, "127.0.0.2") for _ in range(32)] + [slow_body(server, "127.0.0.2") for _ in range(32)]
    try:
        time.sleep(0.5)  # with gunicorn facing clients directly, these 64 would now hold its 8 threads
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)  # "in time": 5 s per answer at most
        answers = []
        for i in range(20):
            if i % 2:
                conn.request("GET", "/healthz")
            else:
                conn.request("POST", "/api/predict", body=BODY,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            response = conn.getresponse()
            answers.append((response.status, response.read()))
        conn.close()
        assert [status for status, _ in answers] == [200] * 20
        assert all(b'"digit":6' in body.replace(b" ", b"") for status, body in answers[::2])
        # The slow clients were still connected, unanswered, the whole time.
        assert sum(still_open(s) for s in slow) == 64
    finally:
        for s in slow:
            s.close()


def test_slow_and_idle_connections_are_closed(tmp_path):
    # No model needed for this (/healthz answers without one): a missing file keeps start-up short.
    proc, port = start_server(tmp_path / "absent.h5", tmp_path / "server.log", "--header-timeout", "2", "--body-timeout", "2",
                              "--keepalive-timeout", "2", "--connection-deadline", "8", ready="/healthz")
    try:
        # Headers trickled one line a second never finish: closed once the header timeout has passed.
        s = slow_header(port)
        began = time.monotonic()
        closed = False
        while time.monotonic() - began < 20:
            try:
                s.sendall(f"X-More-{int(time.monotonic() * 1000)}: y\r\n".encode())
            except OSError:
                closed = True
                break
            if not still_open(s):
                closed = True
                break
            time.sleep(1)
        s.close()
        assert closed, "a client trickling its headers was never disconnected"
        # A body that stops arriving: closed after the body timeout.
        with slow_body(port) as s:
            assert seconds_until_closed(s, 20) >= 1
        # An idle keep-alive connection after a complete request: closed after the keep-alive timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            seconds_until_closed(s, 20)
        # A body trickled a byte every 0.5 s (never a 2-s pause): closed by the connection deadline, 8 s (a
        # reload once a connection is 4 s old, and the old worker closes what it holds 4 s later).
        with slow_body(port) as s:
            began = time.monotonic()
            while time.monotonic() - began < 20:
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                if not still_open(s):
                    break
                time.sleep(0.5)
            lived = time.monotonic() - began
        assert 4 <= lived <= 8 + 3, lived
        # And the server still answers.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        stop_server(proc)


def test_nginx_answers_keep_the_api_shape(server, internal):
    """What nginx answers itself (a body over 2 MB) is the API's JSON error, the HTML page for /upload;
    predictions and metrics pass through to the app."""
    big = b"\0" * (2 * 1024 * 1024 + 10)
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    for path, kind in (("/api/predict", "application/json"), ("/upload", "text/html")):
        conn.request("POST", path, body=big, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 413 and response.getheader("Content-Type").startswith(kind)
        assert "request body too large (limit 2 MB)" in text
        conn.close()
    conn.request("POST", "/api/predict", body=SAMPLE, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    assert response.status == 200 and b'"digit":6' in response.read().replace(b" ", b"")
    assert 'mlk_http_requests_total{method="POST",route="/api/predict",status="200"}' in metrics_text(internal)


def test_sigterm_answers_the_requests_in_flight_and_takes_no_new_ones(mnist_model, tmp_path):
    """Kubernetes stopping the pod (SIGTERM, after the manifest's preStop pause): nginx stops listening and
    answers what it holds before gunicorn's workers stop, so an upload half-sent at SIGTERM gets its
    prediction, not the 503 of an app that is gone. /livez is nginx's own answer, no worker needed."""
    proc, port = start_server(mnist_model, tmp_path / "server.log")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/livez")
        reply = conn.getresponse()
        assert (reply.status, reply.read()) == (200, b'{"status": "alive"}\n')
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall((f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(BODY)}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode() + BODY[:100])
        time.sleep(0.3)
        proc.terminate()
        time.sleep(1.0)  # gunicorn's workers would be gone by now without the drain
        with pytest.raises(OSError):  # nginx no longer listens
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        s.sendall(BODY[100:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        s.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"digit":6' in answer.replace(b" ", b"")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------- hostile clients inside the limits


def request(port, method, path, headers=None, body=None, source="127.0.0.1"):
    """One request on a fresh connection from `source`: (status, headers (lower-case names), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_request(port, data):
    """Bytes sent as they are (what http.client would refuse to send): (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, body


def metrics_text(internal_port):
    status, headers, body = request(internal_port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, body[:200])
    return body.decode()


def assert_json_error(status, headers, body, expected_status):
    assert status == expected_status, (status, body[:300])
    assert headers["content-type"] == "application/json", headers
    payload = json.loads(body)
    assert list(payload) == ["error"] and "\n" not in payload["error"], payload
    assert headers["cache-control"] == "no-store"
    assert_security_headers(headers)


def assert_security_headers(headers):
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


ODD_METHODS = [("TRACE", "/", "GET, HEAD"), ("ZZZAAA", "/api/predict", "POST"), ("DELETE", "/healthz", "GET, HEAD"),
               ("PUT", "/v2/models/mnist/infer", "POST"), ("GET", "/api/predict", "POST"),
               ("POST", "/healthz", "GET, HEAD"), ("PATCH", "/static/samples/6.png", "GET, HEAD"),
               ("CONNECT", "/upload", "POST")]


def test_methods_a_route_does_not_serve_are_answered_by_nginx(server, internal):
    """405 in JSON with the route's Allow, from nginx: TRACE, unknown and extension methods never reach
    gunicorn (the app's request metrics count no such method). OPTIONS: 204 with Allow; an unknown route
    with a method other than GET, HEAD, POST: nginx's 404, in the app's words."""
    for method, path, allow in ODD_METHODS:
        status, headers, body = request(server, method, path)
        assert_json_error(status, headers, body, 405)
        assert headers["allow"] == allow, (method, path, headers)
        assert json.loads(body) == {"error": "method not allowed"}
    status, headers, body = request(server, "OPTIONS", "/api/predict")
    assert (status, headers["allow"], body) == (204, "POST", b"")
    status, headers, body = request(server, "DELETE", "/no/such/route")
    assert_json_error(status, headers, body, 404)
    assert json.loads(body) == {"error": "no such route"} and "allow" not in headers
    status, headers, body = request(server, "GET", "/no/such/route")  # the app's own 404
    assert_json_error(status, headers, body, 404)
    for method, path in (("HEAD", "/healthz"), ("GET", "/v2/models/mnist/ready")):  # what a route serves passes
        assert request(server, method, path)[0] == 200
    counted = {line.split('method="')[1].split('"')[0] for line in metrics_text(internal).splitlines()
               if line.startswith("mlk_http_requests_total{")}
    assert counted and counted <= {"GET", "HEAD", "POST"}, counted


def test_nginx_errors_are_json_with_the_security_headers(server):
    status, headers, body = request(server, "GET", "/" + "a" * 10_000)  # request line over 8 kB
    assert_json_error(status, headers, body, 414)
    status, headers, body = request(server, "GET", "/healthz", headers={"X-Big": "b" * 9000})  # a header over 8 kB
    assert_json_error(status, headers, body, 400)
    status, headers, body = request(server, "POST", "/api/predict", headers={"Transfer-Encoding": "gzip"}, body=b"x")
    assert_json_error(status, headers, body, 501)
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):  # no request line; no Host
        line, headers, body = raw_request(server, data)
        assert line.startswith("HTTP/1.1 400"), line
        assert_json_error(400, headers, body, 400)
    line, headers, body = raw_request(server, b"GET /__mlk/bad_request HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert line.startswith("HTTP/1.1 404"), line  # nginx's error locations are not routes
    assert_json_error(404, headers, body, 404)


def test_every_answer_has_the_security_headers_and_json_is_never_cached(server, internal):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert_security_headers(headers)
    assert "cache-control" not in headers  # the page may be cached; JSON answers may not
    status, headers, body = request(server, "GET", "/static/samples/6.png")
    assert status == 200 and headers["content-type"] == "image/png" and "no-store" not in headers.get("cache-control", "")
    assert_security_headers(headers)
    for port, path in ((server, "/healthz"), (server, "/livez"), (server, "/readyz"), (server, "/api/model"),
                       (internal, "/api/model")):
        status, headers, body = request(port, "GET", path)
        assert status == 200 and headers["content-type"] == "application/json", (path, headers)
        assert headers["cache-control"] == "no-store", path
        assert_security_headers(headers)
    status, headers, body = request(server, "POST", "/api/predict", body=SAMPLE, headers={"Content-Type": "image/png"})
    assert status == 200 and headers["cache-control"] == "no-store"
    assert_security_headers(headers)
    status, headers, body = request(internal, "GET", "/metrics")
    assert status == 200 and "cache-control" not in headers
    assert_security_headers(headers)


def test_internals_are_served_only_on_the_internal_port(server, internal):
    """/metrics and the full /api/model on the internal port only: nginx marks its requests X-Mlk-Internal and
    drops a client's own header of that name on the public port, however spelled."""
    assert "mlk_http_requests_total" in metrics_text(internal)
    for name in ("X-Mlk-Internal", "x-mlk-internal", "X-MLK-INTERNAL"):
        status, headers, body = request(server, "GET", "/metrics", headers={name: "1"})
        assert status == 404 and b"mlk_" not in body, (name, status, body[:200])
        assert_json_error(status, headers, body, 404)
    public = json.loads(request(server, "GET", "/api/model")[2])
    spoofed = json.loads(request(server, "GET", "/api/model", headers={"X-Mlk-Internal": "1"})[2])
    full = json.loads(request(internal, "GET", "/api/model")[2])
    # the same public fields with or without the header (workers differ in loaded_at); the full answer has more
    assert set(spoofed) == set(public) and set(full) - set(public), (sorted(spoofed), sorted(public), sorted(full))
    status, headers, body = request(internal, "POST", "/metrics")
    assert_json_error(status, headers, body, 405)
    assert headers["allow"] == "GET, HEAD"
    status, headers, body = request(internal, "GET", "/api/predict")  # nothing else is served there
    assert status in (404, 405) and headers["content-type"] == "application/json"
    status, headers, body = request(internal, "GET", "/")
    assert_json_error(status, headers, body, 404)


def test_one_client_address_cannot_take_every_request_slot(server):
    """At most 32 requests past their headers per client address (of 128 in all): the 33rd of one address
    gets 503 at once, while another address (127.0.0.2, a loopback alias) is still answered."""
    held = [slow_body(server) for _ in range(32)]
    try:
        time.sleep(0.5)
        status, headers, body = request(server, "POST", "/api/predict", body=SAMPLE, headers={"Content-Type": "image/png"})
        assert_json_error(status, headers, body, 503)
        assert json.loads(body) == {"error": "too many requests in progress, retry"}
        status, _, body = request(server, "POST", "/api/predict", body=SAMPLE, headers={"Content-Type": "image/png"},
                                  source="127.0.0.2")
        assert status == 200 and b'"digit":6' in body.replace(b" ", b"")
        assert request(server, "GET", "/livez")[0] == 200  # nginx's own answers come before the count
        assert sum(still_open(s) for s in held) == 32
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert request(server, "GET", "/healthz")[0] == 200


def test_bad_internal_port_and_deadline_flags_are_one_line_errors(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("server_launcher", ROOT / "server" / "server.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    for flags, message in ((["--port", "5000", "--internal-port", "5000"], "--internal-port must differ from --port"),
                           (["--internal-port", "0"], "--internal-port must be 1-65535"),
                           (["--connection-deadline", "3"], "--connection-deadline must be 4-86400 seconds")):
        assert launcher.main(["--model", "m.h5", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("server.py: error:") and message in err and err.count("\n") == 1, err


def test_no_reload_without_an_old_connection(server):
    """The connection deadline reloads nginx only when a connection outlives half of it (60 s by default):
    none of this module's connections did, so the module's server was never reloaded."""
    assert "reloading nginx" not in LOGS[server].read_text()
