#!/usr/bin/env python3
"""Benchmark the server's Open Inference Protocol endpoint (POST /v2/models/mnist/infer) and the
promotion gate's scoring cost, on this machine.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/benchmark-v2.py [--model M.h5] [--seconds 10]

1. Throughput: server/server.py (nginx + gunicorn, as benchmark-server.py starts it), then `--clients`
   keep-alive clients for `--seconds` each on: /api/predict with one PNG (the reference), v2 with that
   PNG as BYTES (binary tensor data), v2 with one digit as FP32 [1, 28, 28] JSON, v2 with 32 digits as
   UINT8 [32, 784] binary (requests/s and images/s).
2. Gate cost (in this process): loading a model as the server does and scoring it on the 10 000 MNIST
   test images, as gate.py does for each candidate.
Without --model it trains one with trainer/trainer.py on 12 000 MNIST digits (2 epochs, ~1 min).
Prints the figures (no targets: this machine is shared, the figures are indicative); exit 2 on bad input.
"""

import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from mlkcommon import Parser, parse_args

ROOT = _repo.ROOT
PROG = "benchmark-v2.py"
HEADER = "Inference-Header-Content-Length"


def bench_server_module():
    """benchmarks/benchmark-server.py (its MNIST lookup, multipart body, port and readiness helpers)."""
    return _repo.load("benchmarks/benchmark-server.py")


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message}\n")
    parser.add_argument("--model", help="model .h5 (default: train one with trainer/trainer.py)")
    parser.add_argument("--dataset", help="mnist.npz (default: as tests/helpers.py's mnist_path())")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="server --threads (default 1: sync workers, as server.py)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load run (default 10)")
    return parser


def v2_binary(tensor, raw, outputs_binary=True):
    """(body, headers) of a v2 request with one input sent as binary tensor data."""
    tensor = dict(tensor, parameters={"binary_data_size": len(raw)})
    request = {"inputs": [tensor], "parameters": {"binary_data_output": outputs_binary}}
    head = json.dumps(request).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER: str(len(head))}


def load_run(port, path, body, headers, clients, seconds):
    """`clients` threads, each with one keep-alive connection, posting `body` to `path` for `seconds`."""
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
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
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


def gate_cost(model_path, x_test, y_test):
    """(load seconds, scoring seconds, accuracy) of one candidate, as the gate sees it."""
    import gate
    import model as server_model
    import tensorflow  # noqa: F401 - imported before timing: the server's workers have it already

    started = time.perf_counter()
    loaded = server_model.LoadedModel(str(model_path), None)
    load_seconds = time.perf_counter() - started
    x = x_test.astype(np.float32) / 255.0
    started = time.perf_counter()
    accuracy = gate.accuracy(loaded, x, y_test.astype(np.int64))
    return load_seconds, time.perf_counter() - started, accuracy


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):  # --help (0) or a usage error (2, one line)
        return args
    for name in ("workers", "threads", "clients"):
        if getattr(args, name) < 1:
            print(f"{PROG}: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    if args.seconds <= 0:
        print(f"{PROG}: error: --seconds must be > 0", file=sys.stderr)
        return 2
    bench = bench_server_module()
    args.dataset = args.dataset or bench.mnist_path()
    if not os.path.isfile(args.dataset):
        print(f"{PROG}: error: dataset {args.dataset} not found", file=sys.stderr)
        return 2
    if args.model and not os.path.isfile(args.model):
        print(f"{PROG}: error: --model {args.model}: no such file", file=sys.stderr)
        return 2
    with np.load(args.dataset) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="mlk-bench-v2-") as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            with np.load(args.dataset) as npz:
                np.savez(Path(tmp) / "0.npz", x=npz["x_train"][:12000], y=npz["y_train"][:12000])
            model = Path(tmp) / "aggregated-model.h5"
            print("training a model with trainer/trainer.py on 12000 MNIST digits, 2 epochs ...", flush=True)
            subprocess.run([sys.executable, str(ROOT / "trainer/trainer.py"), "--data", str(Path(tmp) / "0.npz"),
                            "--epoch", "2", "--batch", "64", "--savemodel", str(model)],
                           check=True, stdout=subprocess.DEVNULL)
        port = bench.free_port()
        command = [sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--internal-port", str(bench.free_port()), "--workers", str(args.workers),
                   "--threads", str(args.threads)]
        print("server:", " ".join(command[1:]), flush=True)
        proc = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            bench.wait_ready(port, proc)
            out = io.BytesIO()
            Image.fromarray(x_test[0]).save(out, "PNG")
            png = out.getvalue()
            runs = {
                "/api/predict, 1 PNG (multipart)": (
                    "/api/predict", bench.multipart(png),
                    {"Content-Type": f"multipart/form-data; boundary={bench.BOUNDARY}"}, 1),
                "v2, 1 PNG as BYTES [1] (binary)": (
                    "/v2/models/mnist/infer",
                    *v2_binary({"name": "image", "datatype": "BYTES", "shape": [1]},
                               len(png).to_bytes(4, "little") + png), 1),
                "v2, 1 digit as FP32 [1, 28, 28] (JSON)": (
                    "/v2/models/mnist/infer",
                    json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 28, 28],
                                            "data": (x_test[0] / 255.0).ravel().tolist()}]}).encode(),
                    {"Content-Type": "application/json"}, 1),
                "v2, 32 digits as UINT8 [32, 784] (binary)": (
                    "/v2/models/mnist/infer",
                    *v2_binary({"name": "input", "datatype": "UINT8", "shape": [32, 784]}, x_test[:32].tobytes()), 32),
            }
            for name, (path, body, headers, _) in runs.items():  # each answers 200 once before timing
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                conn.close()
                if response.status != 200:
                    print(f"{PROG}: {name}: HTTP {response.status} {answer[:200]!r}", file=sys.stderr)
                    return 1
            load_run(port, *runs["/api/predict, 1 PNG (multipart)"][:3], args.clients, 2.0)  # warm-up
            for name, (path, body, headers, images) in runs.items():
                results[name] = load_run(port, path, body, headers, args.clients, args.seconds)
                results[name]["images"] = images
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        load_s, score_s, accuracy = gate_cost(model, x_test, y_test)
    print(f"{args.clients} clients, {args.seconds:.0f} s each, server --workers {args.workers} --threads {args.threads}:")
    for name, r in results.items():
        print(f"  {name:44s} {r['rps']:7.0f} req/s {r['rps'] * r['images']:8.0f} images/s  p50 {r['p50_ms']:6.1f} ms  "
              f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}")
    print(f"gate, one candidate: load {load_s:.2f} s + score on {len(x_test)} test images {score_s:.2f} s "
          f"(accuracy {accuracy:.4f})")
    print(f"machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f} "
          "(other work on the machine lowers the figures)")
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
