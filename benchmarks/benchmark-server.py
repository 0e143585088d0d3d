#!/usr/bin/env python3
"""Benchmark the production prediction server (server/server.py under gunicorn) on this machine.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/benchmark-server.py [--model M.h5]

1. Throughput/latency: POST /api/predict of one 28x28 PNG from 8 concurrent keep-alive clients for
   10 s (targets: >= 400 requests/s, p99 <= 50 ms, zero errors), then from 1 client (p50 reported).
2. Accuracy of /api/predict on photo-like versions (as for samples/) of 500 MNIST test digits
   (target >= 0.97).
Without --model it first trains one with trainer/trainer.py on the MNIST training set (~2 min).
Prints the figures; exits 1 if a target is missed, 2 on bad input.
"""

import argparse
import http.client
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
PROG = "benchmark-server.py"
BOUNDARY = "mlkbenchmarkboundary"
TARGET_RPS, TARGET_P99_MS, TARGET_ACCURACY = 400.0, 50.0, 0.97


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model .h5 (default: train one with trainer/trainer.py)")
    parser.add_argument("--dataset", help="mnist.npz (default: $MNIST_NPZ, else ../shared/datasets/mnist.npz, "
                        "else the splitter's cached download)")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="server --threads (default 4)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load run (default 10)")
    parser.add_argument("--digits", type=int, default=500, help="photo-like test digits for accuracy (default 500)")
    return parser


def mnist_path():
    """Where MNIST comes from when --dataset is not given, as for the tests (tests/helpers.py's
    mnist_path()): $MNIST_NPZ, else ../shared/datasets/mnist.npz beside the repository, else the
    splitter's checksum-verified download into the user cache. Exits 2 with one line if none works."""
    spec = importlib.util.spec_from_file_location("mlk_test_helpers", ROOT / "tests/helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    try:
        return str(helpers.mnist_path())
    except helpers.MnistUnavailable as e:
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


def load_run(port, body, clients, seconds):
    """`clients` threads, each with one keep-alive connection, posting `body` for `seconds`."""
    latencies, errors, lock = [], [0], threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad = [], 0
        start.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            try:
                status, _ = post(conn, body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.perf_counter() - t0)
            bad += status != 200
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": errors[0], "rps": len(ms) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def server_cpu_seconds(master_pid):
    """user+system CPU seconds of the server: the gunicorn master and its workers (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid == master_pid or ppid == master_pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


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
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "scripts/make-samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.photo_like


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


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    args.dataset = args.dataset or mnist_path()
    if not os.path.isfile(args.dataset):
        print(f"{parser.prog}: error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    if args.model and not os.path.isfile(args.model):
        print(f"{parser.prog}: error: --model {args.model}: no such file", file=sys.stderr)
        return 2
    with np.load(args.dataset) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    with tempfile.TemporaryDirectory(prefix="mlk-bench-") as tmp:
        model = Path(args.model) if args.model else train_model(args.dataset, Path(tmp))
        port = free_port()
        command = [sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(args.workers), "--threads", str(args.threads)]
        print("server:", " ".join(command[1:]), flush=True)
        proc = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            wait_ready(port, proc)
            out = io.BytesIO()
            Image.fromarray(x_test[0]).save(out, "PNG")
            body = multipart(out.getvalue())
            load_run(port, body, args.clients, 2.0)  # warm-up
            cpu_before = server_cpu_seconds(proc.pid)
            many = load_run(port, body, args.clients, args.seconds)
            many["cpu_ms"] = (server_cpu_seconds(proc.pid) - cpu_before) * 1000 / max(many["requests"], 1)
            one = load_run(port, body, 1, args.seconds)
            acc, acc_failed = accuracy(port, x_test, y_test, args.digits)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{args.clients} clients, {args.seconds:.0f} s: {many['requests']} requests, {many['rps']:.0f} req/s, "
          f"p50 {many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms, errors {many['errors']}; "
          f"server CPU {many['cpu_ms']:.2f} ms/request")
    print(f"machine: {os.cpu_count()} CPUs, load average before the end {os.getloadavg()[0]:.1f} "
          "(other work on the machine lowers the figures)")
    print(f"1 client, {args.seconds:.0f} s: {one['requests']} requests, {one['rps']:.0f} req/s, "
          f"p50 {one['p50_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms, errors {one['errors']}")
    print(f"accuracy on {args.digits} photo-like MNIST test digits: {acc:.3f} ({acc_failed} failed requests)")
    missed = []
    if many["rps"] < TARGET_RPS:
        missed.append(f"throughput {many['rps']:.0f} < {TARGET_RPS:.0f} req/s")
    if many["p99_ms"] > TARGET_P99_MS:
        missed.append(f"p99 {many['p99_ms']:.1f} > {TARGET_P99_MS:.0f} ms")
    if many["errors"] or one["errors"] or acc_failed:
        missed.append("errors")
    if acc < TARGET_ACCURACY:
        missed.append(f"accuracy {acc:.3f} < {TARGET_ACCURACY}")
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
