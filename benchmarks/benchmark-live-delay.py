#!/usr/bin/env python3
"""How long the live page takes to show a change: server/server.py (nginx + gunicorn, no model yet) with
--progress-dir on a temporary folder, its page open in headless Chromium; a trainer's progress file is rewritten
(atomically, as trainer.py does) at a random moment, and the time until the page shows the new step is measured.

    .venv/bin/python benchmarks/benchmark-live-delay.py [--samples 30] [--chromium /usr/bin/chromium]

The delay is from the file's rename to the worker row's text changing in the page (Playwright polls the page on
every animation frame), so it includes the page's polling interval (1 s), the request through nginx, the read of
the files and the redraw. A trainer writes at most once a second, so a batch reaches the page within that second
plus this delay. Prints figures only (no targets: the machine is shared); exit 2 on bad input.
"""

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import free_port
from mlkcommon import Parser, error, int_at_least, parse_args, write_progress

ROOT = _repo.ROOT
PROG = "benchmark-live-delay.py"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int_at_least(1), default=30, help="changes measured")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    return p


def worker_doc(step):
    return {"kind": "worker", "worker": "0-model.h5", "round": 1, "state": "training", "epoch": 1, "epochs": 1,
            "step": step, "steps": 100000, "loss": 0.5, "elapsed_seconds": 1.0, "eta_seconds": 10.0}


def wait_up(url, proc, seconds=180):
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if requests.get(url + "/api/progress", timeout=2).status_code == 200:
                return True
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.3)
    return False


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    if not os.path.exists(args.chromium):
        return error(PROG, f"--chromium {args.chromium}: no such file")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="mlk-bench-live-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        progress = tmp / "model" / "0-model.progress.json"
        write_progress(progress, worker_doc(0))
        port, internal = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "server/server.py"), "--model", str(tmp / "absent.h5"),
                                 "--host", "127.0.0.1", "--port", str(port), "--internal-port", str(internal),
                                 "--progress-dir", str(tmp)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            if not wait_up(url, proc):
                return error(PROG, f"server not up: {(tmp / 'server.log').read_text()[-500:]}", 1)
            delays = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page()
                page.goto(url + "/")
                # function expressions, not bare ones: the page's CSP has no 'unsafe-eval'
                page.wait_for_function("() => document.querySelector('#live-workers .live-info') !== null",
                                       timeout=30000)
                rng = random.Random(0)
                for k in range(1, args.samples + 1):
                    time.sleep(rng.uniform(0, 1.0))  # a random phase against the page's 1 s polling
                    written = time.perf_counter()
                    write_progress(progress, worker_doc(k))
                    page.wait_for_function("k => document.querySelector('#live-workers .live-info').textContent"
                                           ".indexOf('step ' + k + '/') >= 0", arg=k, timeout=10000)
                    delays.append(time.perf_counter() - written)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()
    delays.sort()
    result = {"samples": len(delays), "median_s": round(statistics.median(delays), 3),
              "p90_s": round(delays[int(0.9 * (len(delays) - 1))], 3), "max_s": round(delays[-1], 3),
              "mean_s": round(statistics.fmean(delays), 3),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(f"file written -> page shows it: median {result['median_s']:.2f} s, p90 {result['p90_s']:.2f} s, "
          f"max {result['max_s']:.2f} s over {len(delays)} changes; load average {result['load_average'][0]:.1f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
