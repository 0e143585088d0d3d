#!/usr/bin/env python3
"""Benchmark the production prediction server (server/server.py: nginx + gunicorn) on this machine.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/benchmark-server.py [--model M.h5]

1. Throughput/latency with wrk (Debian's `wrk`; installed here with apt-get when run as root, else
   a one-line message): POST /api/predict of one 28x28 PNG over 8 keep-alive connections
   (wrk -t2 -c8), three 30-second runs, the first one starting the moment /readyz says ready.
   Targets for every run: >= 1000 requests/s, p99 <= 20 ms, zero errors (non-2xx answers and
   socket errors). Each run prints the load average and the server's CPU time per request. Then
   1 connection for 10 s (p50 reported).
2. Accuracy of /api/predict on photo-like versions (as for samples/) of 500 MNIST test digits
   (target >= 0.97).
Without --model it first trains one with trainer/trainer.py on the MNIST training set (~2 min).
Prints the figures; exits 1 if a target is missed, 2 on bad input or without wrk.

--in-process N instead calls the app's WSGI callable (server/app.py's create_app) N times in this
process, one thread, and prints its CPU time per request (time.process_time): a figure that moves far
less than wrk's on a shared machine, for comparing changes. No wrk and no targets then.
"""

import http.client
import shutil
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import MnistUnavailable, mnist_path as find_mnist
from mlkcommon import Parser, parse_args

ROOT = _repo.ROOT
PROG = "benchmark-server.py"
BOUNDARY = "mlkbenchmarkboundary"
TARGET_RPS, TARGET_P99_MS, TARGET_ACCURACY = 1000.0, 20.0, 0.97
# wrk's script: POST the body file; at the end one JSON line with the counts and latency percentiles.
WRK_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open(os.getenv("MLK_WRK_BODY"), "rb")); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = os.getenv("MLK_WRK_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('MLK {"requests": %d, "us": %d, "status": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50": %d, "p99": %d, "max": %d}\\n', summary.requests, summary.duration,
    e.status, e.connect, e.read, e.write, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model .h5 (default: train one with trainer/trainer.py)")
    parser.add_argument("--dataset", help="mnist.npz (default: $MNIST_NPZ, else ../shared/datasets/mnist.npz, "
                        "else the splitter's cached download)")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="server --threads (default 1: sync workers, as server.py)")
    parser.add_argument("--clients", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("--seconds", type=int, default=30, help="duration of each wrk run (default 30)")
    parser.add_argument("--runs", type=int, default=3, help="wrk runs (default 3)")
    parser.add_argument("--digits", type=int, default=500, help="photo-like test digits for accuracy (default 500)")
    parser.add_argument("--in-process", type=int, metavar="N", help="only: CPU per request of N in-process "
                        "WSGI calls of POST /api/predict (no server, no wrk)")
    return parser


def mnist_path():
    """Where MNIST comes from when --dataset is not given, as for the tests (tests/helpers.py's
    mnist_path()): $MNIST_NPZ, else ../shared/datasets/mnist.npz beside the repository, else the
    splitter's checksum-verified download into the user cache. Exits 2 with one line if none works."""
    try:
        return str(find_mnist())
    except MnistUnavailable as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


def multipart(blob, name="digit.png", content_type="image/png"):
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + blob + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(conn, body):
    conn.request("POST", "/api/predict", body=body,
                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    response = conn.getresponse()
    return response.status, response.read()


def server_cpu_seconds(top_pid):
    """user+system CPU seconds of the server's process tree: server.py (the gunicorn master), its
    workers, nginx's master and worker (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree, total, grew = {top_pid}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(stats[pid][1] for pid in tree if pid in stats)


def ensure_wrk():
    """Path of wrk; as root on Debian/Ubuntu it is installed with apt-get. None (and one line said) if missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{PROG}: installing wrk (apt-get install wrk)", file=sys.stderr, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, stdout=subprocess.DEVNULL, check=False)
        found = shutil.which("wrk")
    if not found:
        print(f"{PROG}: error: wrk not found; install it (Debian: apt-get install wrk)", file=sys.stderr)
    return found


def wrk_run(wrk, port, workdir, body, connections, seconds, threads=2):
    """One wrk run against POST /api/predict -> requests/s, p50/p99/max ms, errors."""
    (workdir / "body.bin").write_bytes(body)
    (workdir / "post.lua").write_text(WRK_SCRIPT)
    env = dict(os.environ, MLK_WRK_BODY=str(workdir / "body.bin"),
               MLK_WRK_TYPE=f"multipart/form-data; boundary={BOUNDARY}")
    proc = subprocess.run([wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s",
                           "--timeout", "10s", "-s", str(workdir / "post.lua"),
                           f"http://127.0.0.1:{port}/api/predict"],
                          env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MLK ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{PROG}: wrk failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    r = json.loads(line[4:])
    errors = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {"requests": r["requests"], "rps": r["requests"] / (r["us"] / 1e6), "p50_ms": r["p50"] / 1000,
            "p99_ms": r["p99"] / 1000, "max_ms": r["max"] / 1000, "errors": errors}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"benchmark-server.py: server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("benchmark-server.py: server not ready in time")


def train_model(dataset, workdir):
    with np.load(dataset) as npz:
        np.savez(workdir / "0.npz", x=npz["x_train"], y=npz["y_train"])
    model = workdir / "aggregated-model.h5"
    print("training a model with trainer/trainer.py on 60000 MNIST digits, 3 epochs ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "trainer/trainer.py"), "--data", str(workdir / "0.npz"), "--epoch", "3",
                    "--batch", "64", "--savemodel", str(model)], check=True, stdout=subprocess.DEVNULL)
    return model


def photo_like_function():
    return _repo.load("scripts/make-samples.py").photo_like


def accuracy(port, x, y, count):
    photo_like = photo_like_function()
    rng = np.random.default_rng(2024)
    bodies = [multipart(photo_like(x[i], rng), "photo.jpg", "image/jpeg") for i in range(count)]
    right, failed = [0], [0]

    def worker(indices):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in indices:
            status, data = post(conn, bodies[i])
            if status != 200:
                failed[0] += 1
            elif json.loads(data)["digit"] == int(y[i]):
                right[0] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(range(k, count, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return right[0] / count, failed[0]


def in_process(model, body, count):
    """CPU milliseconds per POST /api/predict of `body`, called count times on the app's WSGI callable in
    this process (after count // 10 warm-up calls), with Prometheus' multiprocess mode on as under gunicorn."""
    with tempfile.TemporaryDirectory(prefix="mlk-bench-metrics-") as metrics:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)  # as server.py's workers
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from app import create_app

        app = create_app(str(model))
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/predict", "SCRIPT_NAME": "", "QUERY_STRING": "",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "SERVER_PROTOCOL": "HTTP/1.1",
                   "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                   "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.input_terminated": True,
                   "HTTP_HOST": "127.0.0.1:5000", "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}"}
        statuses = []

        def call():
            answer = app(dict(environ, **{"wsgi.input": io.BytesIO(body)}), lambda s, h, e=None: statuses.append(s))
            b"".join(answer)
            if hasattr(answer, "close"):
                answer.close()

        for _ in range(max(count // 10, 1)):
            call()
        statuses.clear()
        started = time.process_time()
        for _ in range(count):
            call()
        cpu_ms = (time.process_time() - started) * 1000 / count
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if set(statuses) != {"200 OK"}:
        raise SystemExit(f"{PROG}: in-process calls answered {sorted(set(statuses))}")
    return cpu_ms


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):  # --help (0) or a usage error (2, one line)
        return args
    args.dataset = args.dataset or mnist_path()
    if not os.path.isfile(args.dataset):
        print(f"{parser.prog}: error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    if args.model and not os.path.isfile(args.model):
        print(f"{parser.prog}: error: --model {args.model}: no such file", file=sys.stderr)
        return 2
    if min(args.clients, args.seconds, args.runs, args.workers, args.threads) < 1:
        print(f"{parser.prog}: error: --clients, --seconds, --runs, --workers and --threads must be >= 1",
              file=sys.stderr)
        return 2
    if args.in_process is not None and (args.in_process < 1 or not args.model):
        print(f"{parser.prog}: error: --in-process needs N >= 1 and --model", file=sys.stderr)
        return 2
    if args.in_process:
        with np.load(args.dataset) as npz:
            digit = npz["x_test"][0]
        out = io.BytesIO()
        Image.fromarray(digit).save(out, "PNG")
        cpu_ms = in_process(args.model, multipart(out.getvalue()), args.in_process)
        print(f"in-process POST /api/predict (one 28x28 PNG), {args.in_process} calls, one thread: "
              f"CPU {cpu_ms:.3f} ms/request; load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
        return 0
    wrk = ensure_wrk()
    if not wrk:
        return 2
    with np.load(args.dataset) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    with tempfile.TemporaryDirectory(prefix="mlk-bench-") as tmp:
        model = Path(args.model) if args.model else train_model(args.dataset, Path(tmp))
        port = free_port()
        command = [sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--internal-port", str(free_port()), "--workers", str(args.workers),
                   "--threads", str(args.threads)]
        print("server:", " ".join(command[1:]), flush=True)
        proc = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        runs = []
        try:
            wait_ready(port, proc)
            out = io.BytesIO()
            Image.fromarray(x_test[0]).save(out, "PNG")
            body = multipart(out.getvalue())
            print(f"wrk -t2 -c{args.clients} -d{args.seconds}s, POST /api/predict (one 28x28 PNG), "
                  f"the first run from the moment /readyz said ready; machine: {os.cpu_count()} CPUs", flush=True)
            for i in range(args.runs):
                cpu_before = server_cpu_seconds(proc.pid)
                run = wrk_run(wrk, port, Path(tmp), body, args.clients, args.seconds)
                run["cpu_ms"] = (server_cpu_seconds(proc.pid) - cpu_before) * 1000 / max(run["requests"], 1)
                run["load"] = os.getloadavg()
                runs.append(run)
                print(f"run {i + 1}: {run['requests']} requests, {run['rps']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, "
                      f"p99 {run['p99_ms']:.1f} ms, max {run['max_ms']:.1f} ms, errors {run['errors']}; "
                      f"server CPU {run['cpu_ms']:.2f} ms/request; load average "
                      + " ".join(f"{v:.2f}" for v in run["load"]), flush=True)
            one = wrk_run(wrk, port, Path(tmp), body, 1, 10, threads=1)
            print(f"1 connection, 10 s: {one['requests']} requests, {one['rps']:.0f} req/s, "
                  f"p50 {one['p50_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms, errors {one['errors']}")
            acc, acc_failed = accuracy(port, x_test, y_test, args.digits)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"accuracy on {args.digits} photo-like MNIST test digits: {acc:.3f} ({acc_failed} failed requests)")
    print("(the load average counts everything on the machine: other work there lowers the figures)")
    missed = []
    for i, run in enumerate(runs, 1):
        if run["rps"] < TARGET_RPS:
            missed.append(f"run {i}: throughput {run['rps']:.0f} < {TARGET_RPS:.0f} req/s")
        if run["p99_ms"] > TARGET_P99_MS:
            missed.append(f"run {i}: p99 {run['p99_ms']:.1f} > {TARGET_P99_MS:.0f} ms")
    if any(run["errors"] for run in runs) or one["errors"] or acc_failed:
        missed.append("errors")
    if acc < TARGET_ACCURACY:
        missed.append(f"accuracy {acc:.3f} < {TARGET_ACCURACY}")
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
