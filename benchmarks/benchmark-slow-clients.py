#!/usr/bin/env python3
"""Slow and hostile clients against the prediction server (issue 12): does a good client still get answers?

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/benchmark-slow-clients.py [--model M.h5 | --url URL [--pid PID]]

For --seconds (20) it holds --slow-headers (64) connections that send a request line and then one
header line every --interval (1 s) without ever finishing the headers, and --slow-bodies (64)
connections that send complete headers (Content-Length: 100000) and then one body byte every
--interval; each is re-opened when the server closes it. The slow connections come from 127.0.0.2-127.0.0.5
(loopback aliases, round robin: at most 32 slow bodies per address, the server's cap per client address,
so all of them are held; benchmark-fairness.py is the one-address attack). Meanwhile one good client
(127.0.0.1) alternates
GET /healthz and POST /api/predict (one 28x28 PNG) on a keep-alive connection. Also measured: when
the server closes a connection whose body stalls completely, and an idle keep-alive connection.

Targets: >= 99 % of the good client's requests answered 200, p99 <= 100 ms; the server's memory
(RSS of its process tree, when known) is printed before, at the peak and after. Prints the
figures; exits 1 if a target is missed, 2 on bad input.

Without --url it starts server/server.py on 127.0.0.1 with --model (default: a model trained with
trainer/trainer.py on MNIST, ~2 min). --url targets a running server instead (e.g. the container
from server/Dockerfile run as tests/e2e/e2e-containers.sh runs it; docs/serving.md); --pid names its
top process so that its memory can be read from /proc. Loopback addresses only.
"""

import asyncio
import http.client
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import MnistUnavailable, mnist_path
from mlkcommon import Parser, parse_args

ROOT = _repo.ROOT
PROG = "benchmark-slow-clients.py"
TARGET_SUCCESS, TARGET_P99_MS = 0.99, 100.0
PROBE_LIMIT = 40.0  # seconds a timeout probe waits for the server to close its connection
BOUNDARY = "mlkslowclientboundary"


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model .h5 for a server started here (default: train one)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000 (loopback only)")
    parser.add_argument("--pid", type=int, help="with --url: the server's top process, for its memory")
    parser.add_argument("--dataset", help="mnist.npz (default: as the tests find it)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the attack (default 20)")
    parser.add_argument("--slow-headers", type=int, default=64, help="connections trickling headers (default 64)")
    parser.add_argument("--slow-bodies", type=int, default=64, help="connections trickling bodies (default 64)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between trickled bytes (default 1)")
    return parser


# ----------------------------------------------------------------------------------- the attackers


class Attack:
    """The slow connections, in one asyncio loop in a thread. Counts opens and server-side closes."""

    def __init__(self, host, port, slow_headers, slow_bodies, interval):
        self.host, self.port, self.interval = host, port, interval
        self.sources = attacker_addresses(host)
        self.counts = {"header": slow_headers, "body": slow_bodies}
        self.opened = {"header": 0, "body": 0}
        self.closed = {"header": [], "body": []}  # seconds each connection lived until the server closed it
        self.open_now = {"header": 0, "body": 0}
        self.failed_connects = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self):
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join(timeout=30)

    async def _main(self):
        tasks = [asyncio.create_task(self._keep_one(kind, self.sources[i % len(self.sources)]))
                 for kind, n in self.counts.items() for i in range(n)]
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_one(self, kind, source):
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=source)
            except OSError:
                self.failed_connects += 1
                await asyncio.sleep(0.2)
                continue
            self.opened[kind] += 1
            self.open_now[kind] += 1
            began = time.monotonic()
            try:
                closed = await self._trickle(kind, reader, writer)
            finally:
                self.open_now[kind] -= 1
                writer.close()
            if closed:
                self.closed[kind].append(time.monotonic() - began)

    async def _trickle(self, kind, reader, writer):
        """Send slowly until the server closes the connection (True) or the attack ends (False)."""
        if kind == "header":
            writer.write(f"POST /api/predict HTTP/1.1\r\nHost: {self.host}\r\n".encode())
        else:
            writer.write((f"POST /api/predict HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 100000\r\n"
                          f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
        sent = 0
        while not self.stop.is_set():
            try:
                await writer.drain()
                await asyncio.wait_for(reader.read(4096), timeout=self.interval)
                return True  # an answer (408, 400) or EOF: the server is done with this connection
            except asyncio.TimeoutError:
                pass
            except OSError:
                return True
            sent += 1
            writer.write(f"X-Slow-{sent}: y\r\n".encode() if kind == "header" else b"x")
        return False


def attacker_addresses(host):
    """Where the slow connections come from: (address, 0) for 127.0.0.2-5 when host is IPv4 loopback
    (Linux routes all of 127/8 to lo, no set-up), else [None] (the system's choice)."""
    try:
        ipv4_loopback = all(info[4][0].startswith("127.") for info in socket.getaddrinfo(host, None, socket.AF_INET))
    except OSError:
        ipv4_loopback = False
    return [(f"127.0.0.{i}", 0) for i in range(2, 6)] if ipv4_loopback else [None]


# ------------------------------------------------------------------------------- the good client


def good_client(host, port, body, seconds, source=None):
    """Alternate GET /healthz and POST /api/predict on one keep-alive connection for `seconds` (from the
    address `source`, else the system's choice)."""
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def connect():
        return http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0) if source else None)

    conn, i = connect(), 0
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            if i % 2 == 0:
                conn.request("GET", "/healthz")
            else:
                conn.request("POST", "/api/predict", body=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            status = type(err).__name__
            conn.close()
            conn = connect()
        elapsed = time.perf_counter() - t0
        with lock:
            latencies.append(elapsed)
            if status != 200:
                failures.append(status)
        i += 1
        time.sleep(0.01)
    conn.close()
    return latencies, failures


def multipart_png(dataset):
    from PIL import Image

    with np.load(dataset) as npz:
        digit = npz["x_test"][0]
    out = io.BytesIO()
    Image.fromarray(digit).save(out, "PNG")
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + out.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()


# ------------------------------------------------------------------------------ the timeouts, probed


def seconds_until_closed(host, port, first_bytes, limit):
    """Open a connection, send first_bytes (then nothing): seconds until the server closes it, None after limit."""
    with socket.create_connection((host, port), timeout=limit) as s:
        began = time.monotonic()
        s.sendall(first_bytes)
        return _wait_closed(s, began, limit)


def _wait_closed(s, began, limit):
    try:
        while s.recv(65536):
            if time.monotonic() - began > limit:
                return None
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - began


def idle_keepalive_seconds(host, port, limit):
    """One complete GET /healthz on a keep-alive connection, then idle: seconds until the server closes it."""
    with socket.create_connection((host, port), timeout=limit) as s:
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                return 0.0
            got += chunk
        return _wait_closed(s, time.monotonic(), limit)


# --------------------------------------------------------------------------------------- memory


def tree_rss_mb(pid):
    """RSS (MB) of pid and all its descendants, from /proc; None when unreadable."""
    if pid is None:
        return None
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            if p == pid:
                return None
        todo.extend(children.get(p, []))
    return total / 1024


class MemoryWatch:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            rss = tree_rss_mb(self.pid)
            if rss:
                self.peak = max(self.peak, rss)
            self.stop.wait(0.5)


# ------------------------------------------------------------------------------------------ main


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(host, port, proc=None, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{PROG}: server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.3)
    raise SystemExit(f"{PROG}: server at {host}:{port} not ready within {timeout} s")


def run(args, host, port, pid, body):
    print(f"server {host}:{port}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          "(other work on the machine slows the good client down)", flush=True)
    wait_ready(host, port)
    base_lat, base_fail = good_client(host, port, body, 3.0)
    rss_before = tree_rss_mb(pid)
    watch = MemoryWatch(pid)
    watch.thread.start()
    attack = Attack(host, port, args.slow_headers, args.slow_bodies, args.interval)
    attack.start()
    time.sleep(min(2.0, args.seconds / 4))  # let the slow connections pile up first
    held = dict(attack.open_now)
    latencies, failures = good_client(host, port, body, args.seconds)
    held_end = dict(attack.open_now)
    attack.finish()
    time.sleep(1.0)
    watch.stop.set()
    rss_after = tree_rss_mb(pid)

    ms = np.array(latencies) * 1000
    ok = 1 - len(failures) / max(len(latencies), 1)
    p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
    base_ms = np.array(base_lat) * 1000
    print(f"good client alone, 3 s: {len(base_ms)} requests, p50 {np.percentile(base_ms, 50):.1f} ms, "
          f"p99 {np.percentile(base_ms, 99):.1f} ms, failures {len(base_fail)}")
    print(f"attack: {args.slow_headers} slow-header + {args.slow_bodies} slow-body connections for "
          f"{args.seconds:.0f} s, one byte each every {args.interval:g} s; open at the start "
          f"{held['header']} + {held['body']}, at the end {held_end['header']} + {held_end['body']}; "
          f"connections made {attack.opened['header']} + {attack.opened['body']}, refused {attack.failed_connects}")
    for kind in ("header", "body"):
        lives = attack.closed[kind]
        if lives:
            print(f"  slow-{kind} connections closed by the server: {len(lives)}, after "
                  f"{np.median(lives):.1f} s (median; max {max(lives):.1f} s)")
        else:
            print(f"  slow-{kind} connections closed by the server: 0 (held until the attack ended)")
    print(f"good client under attack, {args.seconds:.0f} s: {len(ms)} requests (GET /healthz and POST /api/predict "
          f"alternating), {ok * 100:.2f} % answered 200, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms.max():.1f} ms"
          + (f"; failures: {sorted(set(map(str, failures)))}" if failures else ""))
    if pid:
        print(f"server memory (RSS of the process tree): before {rss_before:.0f} MB, peak {watch.peak:.0f} MB, "
              f"after {rss_after or 0:.0f} MB")
    else:
        print("server memory: unknown (give --pid with --url)")
    print(f"measuring the timeouts (unfinished headers, a stalled body, an idle keep-alive connection; "
          f"at most {PROBE_LIMIT:.0f} s) ...", flush=True)
    probes = {
        "headers unfinished": lambda: seconds_until_closed(
            host, port, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode(), PROBE_LIMIT),
        "body stalled": lambda: seconds_until_closed(host, port, (
            f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode(), PROBE_LIMIT),
        "idle keep-alive": lambda: idle_keepalive_seconds(host, port, PROBE_LIMIT),
    }
    seen = {}
    threads = [threading.Thread(target=lambda k=k, f=f: seen.__setitem__(k, f())) for k, f in probes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("timeouts seen: " + "; ".join(
        f"{k} -> " + (f"still open after {PROBE_LIMIT:.0f} s" if seen.get(k) is None else f"closed after {seen[k]:.1f} s")
        for k in probes))
    missed = []
    if ok < TARGET_SUCCESS:
        missed.append(f"success {ok * 100:.2f} % < {TARGET_SUCCESS * 100:.0f} %")
    if p99 > TARGET_P99_MS:
        missed.append(f"p99 {p99:.1f} > {TARGET_P99_MS:.0f} ms")
    missed += [f"{k}: not closed within {PROBE_LIMIT:.0f} s" for k in probes if seen.get(k) is None]
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


def target_and_body(parser, args, ipv4_only=False):
    """Check --url (a loopback address, IPv4 only with ipv4_only: the clients run here), --dataset (default:
    helpers.mnist_path()) and --model; -> (host, port) of --url (None, None without it) and the multipart
    body of one test digit. A bad value is a usage error (one line, exit 2)."""
    host = port = None
    if args.url:
        parsed = urllib.parse.urlsplit(args.url)
        host, port = parsed.hostname, parsed.port or 80
        if parsed.scheme != "http" or not host:
            parser.error(f"--url {args.url}: expected http://HOST:PORT")
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET if ipv4_only else 0, proto=socket.IPPROTO_TCP)
            loopback = all(info[4][0].startswith("127.") or (info[4][0] == "::1" and not ipv4_only) for info in infos)
        except OSError as err:
            parser.error(f"--url {args.url}: {err}")
        if not loopback:
            parser.error(f"--url {args.url}: only {'IPv4 ' if ipv4_only else ''}loopback addresses (the clients run "
                         "on this machine)")
    if not args.dataset:
        try:
            args.dataset = str(mnist_path())
        except MnistUnavailable as err:
            parser.error(str(err))
    if not os.path.isfile(args.dataset):
        parser.error(f"dataset {args.dataset} not found")
    if args.model and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file")
    return host, port, multipart_png(args.dataset)


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):  # --help (0) or a usage error (2, one line)
        return args
    for name in ("slow_headers", "slow_bodies"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.seconds <= 0 or args.interval <= 0:
        parser.error("--seconds and --interval must be > 0")
    if args.model and args.url:
        parser.error("give --model or --url, not both")
    if args.pid is not None and not args.url:
        parser.error("--pid goes with --url")
    host, port, body = target_and_body(parser, args)
    if args.url:
        return run(args, host, port, args.pid, body)
    with tempfile.TemporaryDirectory(prefix="mlk-slow-") as tmp:
        model = args.model
        if not model:
            model = _repo.load("benchmarks/benchmark-server.py").train_model(
                args.dataset, Path(tmp))
        port = free_port()
        command = [sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--internal-port", str(free_port())]
        print("server:", " ".join(command[1:]), flush=True)
        proc = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            wait_ready("127.0.0.1", port, proc)
            return run(args, "127.0.0.1", port, proc.pid, body)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
