"""Slow and hostile clients against the real serving stack (server/server.py: nginx in front of gunicorn),
on loopback only, every wait bounded: a good client is answered while slow clients hold connections,
and slow or idle connections are closed by the server. Figures (latency, memory) are in
benchmarks/benchmark-slow-clients.py, not here."""

import http.client
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
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), *flags],
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


def slow_header(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")  # never the blank line
    return s


def slow_body(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
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
    proc, port = start_server(mnist_model, tmp_path_factory.mktemp("slow") / "server.log")  # default timeouts: 10 s headers, 10 s body pauses
    yield port
    stop_server(proc)


def test_good_client_is_answered_while_slow_clients_hold_connections(server):
    slow = [slow_header(server) for _ in range(32)] + [slow_body(server) for _ in range(32)]
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
                              "--keepalive-timeout", "2", ready="/healthz")
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
        # And the server still answers.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        stop_server(proc)


def test_nginx_answers_keep_the_api_shape(server):
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
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    assert 'mlk_http_requests_total{method="POST",route="/api/predict",status="200"}' in metrics


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
