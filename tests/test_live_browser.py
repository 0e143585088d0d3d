"""Training watched live (issue 32): scripts/local-quickstart.sh with SERVE=1 starts the server first, and its page,
in headless Chromium under nginx's Content-Security-Policy, moves from "training" through every round (each
worker's bar, the accuracy curve growing) to the served model, without a reload; then one click on a sample
predicts it."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from helpers import clean_env, free_port
from test_browser import CHROMIUM, CHROMIUM_ARGS, CSP_WATCH, browser  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
ROUNDS = 3
# What the page shows, read every 0.2 s: the status line, the round line, each worker's row and the curve.
READ_PAGE = """() => ({
  status: document.getElementById('live-status').textContent,
  phase: document.getElementById('live-status').getAttribute('data-phase'),
  round: document.getElementById('live-round').textContent,
  points: Number(document.getElementById('live-curve').getAttribute('data-points') || 0),
  workers: Array.from(document.querySelectorAll('#live-workers .live-worker')).map(row => ({
    worker: row.getAttribute('data-worker'), state: row.getAttribute('data-state'),
    width: parseFloat(row.querySelector('.bar span').style.width || '0'),
    info: row.querySelector('.live-info').textContent})),
})"""


def test_the_page_follows_the_run_from_training_to_the_served_model(subset, tmp_path, browser):  # noqa: F811
    port, internal = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    env = clean_env(TF_CPP_MIN_LOG_LEVEL="2", VENV=str(VENV), WORKER_NUMBER="2", EPOCH="4", BATCH="32",
                    ROUNDS=str(ROUNDS), SERVE="1", PORT=str(port), INTERNAL_PORT=str(internal), WORK_DIR=str(work),
                    MNIST_NPZ=str(subset))
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts/local-quickstart.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    try:
        deadline = time.time() + 120
        while True:  # the server answers before the first round ends
            assert proc.poll() is None, f"quickstart exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if requests.get(url + "/api/progress", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert time.time() < deadline, f"no server within 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.add_init_script(CSP_WATCH)
        page.goto(url + "/")
        deadline = time.time() + 600
        while True:
            view = page.evaluate(READ_PAGE)
            if not seen or view != seen[-1]:
                seen.append(view)
            if view["status"].startswith("serving model") and f"(round {ROUNDS})" in view["status"] \
                    and view["points"] == ROUNDS:
                break
            assert proc.poll() is None, f"quickstart exited with {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the page did not reach round {ROUNDS}: {seen[-3:]}"
            time.sleep(0.2)
        final = page.evaluate(READ_PAGE)
        assert page.evaluate("window.__cspViolations") == []

        # one click on a sample predicts it with the served model
        page.click('a[data-sample="6.png"]')
        page.locator("#sample-result").wait_for(state="visible", timeout=15000)
        assert page.locator("#sample-digit").inner_text() == "6"
        assert page.locator("#sample-bars .bar").count() == 10
        assert page.evaluate("window.__cspViolations") == []
        page.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    # the page started at "training", before any model was served
    assert seen[0]["status"].startswith("training"), seen[0]
    # every round's trainers were seen mid-way: a bar between empty and full, for each worker
    for rnd in range(2, ROUNDS + 1):  # round 1 may be half over when the server is up on a busy machine
        mid = {w["worker"] for view in seen for w in view["workers"]
               if f"round {rnd} " in w["info"] and w["state"] == "training" and 0 < w["width"] < 100}
        assert mid == {"0-model.h5", "1-model.h5"}, (rnd, [v["workers"] for v in seen])
    # the bars moved: some worker's bar grew between two readings of one round
    widths = [(w["worker"], w["info"].split(" · ")[0], w["width"]) for view in seen for w in view["workers"]]
    assert any(a[:2] == b[:2] and b[2] > a[2] for a, b in zip(widths, widths[2:])), widths
    # the curve grew one round at a time, and the status passed through serving earlier rounds
    points = [view["points"] for view in seen]
    assert points == sorted(points) and set(range(1, ROUNDS + 1)) <= set(points), points
    served = [view["status"] for view in seen if view["status"].startswith("serving")]
    assert any("training round" in s for s in served), served  # serving round r while round r+1 trains
    assert all(w["state"] == "done" and w["width"] == 100 for w in final["workers"]), final
    assert "aggregated and scored" in final["round"], final
