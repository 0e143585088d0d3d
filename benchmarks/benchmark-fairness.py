#!/usr/bin/env python3
"""One client taking every request slot it can (issue 28): is another client still answered?

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/benchmark-fairness.py [--model M.h5 | --url URL]

For --seconds (20) an attacker at 127.0.0.2 (a loopback alias: Linux routes all of 127/8 to lo, no set-up)
keeps --uploads (128) connections that each send complete headers of POST /api/predict (Content-Length:
100000) and then one body byte every --interval (1 s): each is a request past its headers, which the
server's overall cap (128) counts. When the server answers one (503: over the per-address cap) or closes
it, the attacker waits --interval and opens it again. Meanwhile a good client at 127.0.0.1 alternates GET
/healthz and POST /api/predict (one 28x28 PNG) on a keep-alive connection, as in benchmark-slow-clients.py.

Targets: >= 99 % of the good client's requests answered 200, p99 <= 100 ms. Prints the figures (and how
many uploads the attacker held, how many of its requests were refused); exits 1 if a target is missed,
2 on bad input. Without --url it starts server/server.py on 127.0.0.1 (a socket bound to 127.0.0.2
reaches it) with --model (default: a model trained with trainer/trainer.py on MNIST, ~2 min).
Loopback addresses only.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from mlkcommon import Parser, parse_args

ROOT = _repo.ROOT
PROG = "benchmark-fairness.py"
slow = _repo.load("benchmarks/benchmark-slow-clients.py")  # multipart_png, wait_ready, free_port, tree_rss_mb
TARGET_SUCCESS, TARGET_P99_MS = 0.99, 100.0
ATTACKER, GOOD = "127.0.0.2", "127.0.0.1"


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model .h5 for a server started here (default: train one)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000 (loopback only)")
    parser.add_argument("--dataset", help="mnist.npz (default: as the tests find it)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the attack (default 20)")
    parser.add_argument("--uploads", type=int, default=128, help="trickling uploads the attacker keeps (default 128)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between trickled bytes (default 1)")
    return parser


class Attacker:
    """--uploads trickling uploads from ATTACKER, in one asyncio loop in a thread."""

    def __init__(self, host, port, uploads, interval):
        self.host, self.port, self.uploads, self.interval = host, port, uploads, interval
        self.held = 0  # connections open now whose request the server has neither answered nor closed
        self.answers = {}  # status (or "closed") -> count
        self.opened = self.failed_connects = 0
        self.samples = []  # self.held, sampled every 0.5 s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        tasks = [asyncio.create_task(self._keep_one()) for _ in range(self.uploads)]
        while not self.stop.is_set():
            await asyncio.sleep(0.5)
            self.samples.append(self.held)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_one(self):
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(ATTACKER, 0))
            except OSError:
                self.failed_connects += 1
                await asyncio.sleep(self.interval)
                continue
            self.opened += 1
            self.held += 1
            try:
                outcome = await self._trickle(reader, writer)
            finally:
                self.held -= 1
                writer.close()
            if outcome is not None:
                self.answers[outcome] = self.answers.get(outcome, 0) + 1
                await asyncio.sleep(self.interval)  # refused or closed: try again a moment later

    async def _trickle(self, reader, writer):
        """Trickle the body until the server answers (its status) or closes ("closed"), or the run ends (None)."""
        writer.write((f"POST /api/predict HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 100000\r\n"
                      f"Content-Type: multipart/form-data; boundary={slow.BOUNDARY}\r\n\r\n").encode())
        while not self.stop.is_set():
            try:
                await writer.drain()
                got = await asyncio.wait_for(reader.read(4096), timeout=self.interval)
                if got.startswith(b"HTTP/1.1 "):
                    return got[9:12].decode()
                return "closed"
            except asyncio.TimeoutError:
                pass
            except OSError:
                return "closed"
            writer.write(b"x")
        return None


def good_client(host, port, body, seconds):
    """GET /healthz and POST /api/predict alternating from GOOD on one keep-alive connection."""
    return slow.good_client(host, port, body, seconds, source=GOOD)


def run(args, host, port, body):
    print(f"server {host}:{port}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    slow.wait_ready(host, port)
    base_lat, base_fail = good_client(host, port, body, 3.0)
    attacker = Attacker(host, port, args.uploads, args.interval)
    attacker.thread.start()
    time.sleep(min(2.0, args.seconds / 4))  # let the uploads pile up first
    held_start = attacker.held
    latencies, failures = good_client(host, port, body, args.seconds)
    held_end = attacker.held
    attacker.stop.set()
    attacker.thread.join(timeout=30)

    ms = np.array(latencies) * 1000
    ok = 1 - len(failures) / max(len(latencies), 1)
    p50, p99 = (float(np.percentile(ms, q)) for q in (50, 99))
    base_ms = np.array(base_lat) * 1000
    held = np.array(attacker.samples or [0])
    print(f"good client ({GOOD}) alone, 3 s: {len(base_ms)} requests, p50 {np.percentile(base_ms, 50):.1f} ms, "
          f"p99 {np.percentile(base_ms, 99):.1f} ms, failures {len(base_fail)}")
    print(f"attacker ({ATTACKER}): {args.uploads} trickling uploads (one body byte every {args.interval:g} s) for "
          f"{args.seconds:.0f} s; uploads held by the server, unanswered: {held_start} at the start, {held_end} at "
          f"the end, median {np.median(held):.0f}, max {held.max()}; connections made {attacker.opened}, "
          f"refused {attacker.failed_connects}; answers {dict(sorted(attacker.answers.items()))}")
    print(f"good client ({GOOD}) meanwhile, {args.seconds:.0f} s: {len(ms)} requests (GET /healthz and POST "
          f"/api/predict alternating), {ok * 100:.2f} % answered 200, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {ms.max():.1f} ms" + (f"; failures: {sorted(set(map(str, failures)))}" if failures else ""))
    missed = []
    if ok < TARGET_SUCCESS:
        missed.append(f"success {ok * 100:.2f} % < {TARGET_SUCCESS * 100:.0f} %")
    if p99 > TARGET_P99_MS:
        missed.append(f"p99 {p99:.1f} > {TARGET_P99_MS:.0f} ms")
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):  # --help (0) or a usage error (2, one line)
        return args
    if args.uploads < 1 or args.seconds <= 0 or args.interval <= 0:
        parser.error("--uploads must be >= 1, --seconds and --interval > 0")
    if args.model and args.url:
        parser.error("give --model or --url, not both")
    host, port, body = slow.target_and_body(parser, args, ipv4_only=True)
    if args.url:
        return run(args, host, port, body)
    with tempfile.TemporaryDirectory(prefix="mlk-fair-") as tmp:
        model = args.model or _repo.load("benchmarks/benchmark-server.py").train_model(args.dataset, Path(tmp))
        port = slow.free_port()
        command = [sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--internal-port", str(slow.free_port())]
        print("server:", " ".join(command[1:]), flush=True)
        proc = subprocess.Popen(command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            slow.wait_ready("127.0.0.1", port, proc)
            return run(args, "127.0.0.1", port, body)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
