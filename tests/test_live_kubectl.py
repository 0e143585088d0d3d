"""scripts/live.py (issue 32): the workers' progress lines in the terminal and the ConfigMap mlk-progress, against a
kubectl stand-in whose `exec` runs the snapshot on a folder laid out like the volume; and scripts/quickstart.sh
keeping the ConfigMap up to date through it (tests/test_quickstart_kubectl.py's stand-in for the rest)."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import live  # noqa: E402  (scripts/)
from test_quickstart_kubectl import FAKE_KUBECTL, QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
# Answers what live.py asks (the running trainer pods, the snapshot through exec, the ConfigMap's apply and
# patch) and hands every other call to the quickstart tests' stand-in (FAKE_NEXT).
LIVE_KUBECTL = r'''#!/usr/bin/env python3
import json, os, subprocess, sys
args = sys.argv[1:]
env = os.environ.get
with open(env("FAKE_LIVE_LOG"), "a") as f:
    f.write(json.dumps(args) + "\n")
while args[:1] in (["--context"], ["-n"]):
    args = args[2:]
if args[:2] == ["get", "pods"] and "--field-selector=status.phase=Running" in args:
    print("mnist-trainer-0-x1 mnist-aggregator-y2", end="")
elif args[:2] == ["exec", "-i"] and args[3:] == ["--", "python", "-", "/mnt"]:
    sys.exit(subprocess.run([sys.executable, "-", env("FAKE_MNT")], stdin=sys.stdin).returncode)
elif args[:3] == ["apply", "-f", "-"] and '"mlk-progress"' in (body := sys.stdin.read()):
    n = len(os.listdir(env("FAKE_CM_DIR")))
    with open(os.path.join(env("FAKE_CM_DIR"), f"cm-{n:03d}.json"), "w") as f:
        f.write(body)
elif args[:3] == ["patch", "configmap", "mlk-progress"]:
    sys.exit(int(env("FAKE_PATCH_RC", "0")))
else:
    os.execv(sys.executable, [sys.executable, env("FAKE_NEXT"), *sys.argv[1:]])
'''


def write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def volume(root, rnd=2):
    """A volume mid-run: round rnd, worker 0 done, worker 1 half-way; round rnd - 1 scored 0.9712."""
    for i, (state, step) in enumerate((("done", 60), ("training", 30))):
        write(root / "model" / f"{i}-model.progress.json",
              {"format": "mlk-progress/1", "kind": "worker", "worker": f"{i}-model.h5", "round": rnd, "state": state,
               "epoch": 1, "epochs": 1, "step": step, "steps": 60, "loss": 0.25, "eta_seconds": 4.0,
               "updated_at": time.time()})
    write(root / "rounds" / "ledger.json", {"format": "mlk-ledger/1", "rounds": [
        {"round": r, "test_accuracy": 0.95 + 0.0212 * (r == rnd - 1), "workers": []} for r in range(1, rnd)]})
    return root


@pytest.fixture
def kube(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "next-kubectl").write_text(FAKE_KUBECTL.replace("/usr/bin/env python3", sys.executable, 1))
    kubectl = bindir / "kubectl"
    kubectl.write_text(LIVE_KUBECTL.replace("/usr/bin/env python3", sys.executable, 1))
    kubectl.chmod(0o755)
    cms = tmp_path / "configmaps"
    cms.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_NUMBER", "EPOCH", "BATCH", "ROUNDS", "KUBECTL",
                                                            "SERVE", "MIN_WORKERS", "RESUME", "MNIST_NPZ")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_LIVE_LOG=str(tmp_path / "live.log"),
               FAKE_LOG=str(tmp_path / "kubectl.log"), FAKE_DIR=str(tmp_path / "applied"),
               FAKE_NEXT=str(tmp_path / "next-kubectl"), FAKE_CM_DIR=str(cms), FAKE_MNT=str(volume(tmp_path / "mnt")),
               POLL="0")
    (tmp_path / "applied").mkdir()
    env["configmaps"] = lambda: [json.loads(p.read_text()) for p in sorted(cms.glob("cm-*.json"))]
    env["calls"] = lambda: [json.loads(line) for line in (tmp_path / "live.log").read_text().splitlines()]
    return env


def run_env(kube):
    return {k: v for k, v in kube.items() if isinstance(v, str)}


def test_worker_lines_and_the_terminal_plain_and_in_place():
    snapshot = {"workers": [{"worker": "0-model.h5", "round": 1, "epoch": 2, "epochs": 2, "step": 30, "steps": 60,
                             "loss": 0.1234, "state": "training", "eta_seconds": 12.4}],
                "round_state": {"round": 1, "state": "waiting", "present": 0, "expected": 2}}
    pairs = live.lines_of(snapshot)
    assert pairs[0][1] == ("  0-model.h5   round 1  epoch 2/2  step    30/60 [##########----------]  loss 0.1234"
                           "  training  12s left")
    assert pairs[1][1] == "  round 1: waiting for models, 0 of 2 present"
    plain = io.StringIO()
    terminal = live.Terminal(plain, tty=False)
    terminal.update(pairs)
    terminal.update(pairs)  # nothing changed: nothing printed
    snapshot["workers"][0].update(step=45)  # same epoch and state: still nothing (a log gets changes only)
    terminal.update(live.lines_of(snapshot))
    snapshot["workers"][0].update(step=60, state="done")
    terminal.update(live.lines_of(snapshot))
    lines = plain.getvalue().splitlines()
    assert len(lines) == 3 and lines[2].endswith("loss 0.1234  done")
    screen = io.StringIO()
    terminal = live.Terminal(screen, tty=True, width=200)
    terminal.update(pairs)
    terminal.write("a line of the run\n")
    terminal.update(pairs)
    # drawn; then cleared (2 lines up, clear to the end), the line written, redrawn; cleared and redrawn again
    block = pairs[0][1] + "\n" + pairs[1][1] + "\n"
    assert screen.getvalue() == block + "\x1b[2F\x1b[J" + "a line of the run\n" + block + "\x1b[2F\x1b[J" + block
    narrow = io.StringIO()
    live.Terminal(narrow, tty=True, width=30).update(pairs)  # cut to the width: a wrapped line breaks the redraw
    assert narrow.getvalue() == pairs[0][1][:30] + "\n" + pairs[1][1][:30] + "\n"


def test_kube_watch_reads_the_volume_through_exec_prints_lines_and_applies_the_configmap(kube):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/live.py"), "kube", "--interval", "0.2", "--passthrough"],
                          input="== round 2/3: 2 trainers\n", env=run_env(kube), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "== round 2/3: 2 trainers" in out  # the quickstart's own lines pass through
    assert any(line.startswith("  0-model.h5   round 2") and line.endswith("done") for line in out), out
    assert any(line.startswith("  1-model.h5   round 2") and "step    30/60" in line for line in out), out
    [cm] = kube["configmaps"]()  # applied once: the data did not change between the snapshots
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "mlk-progress"
    assert cm["metadata"]["labels"]["app.kubernetes.io/name"] == "mlk-mnist"  # teardown.sh removes it
    data = cm["data"]
    assert (data["round"], data["workers_done"], data["last_accuracy"], data["phase"]) == ("2", "1/2", "0.9712",
                                                                                           "training")
    assert "1-model.h5   round 2" in data["workers"]
    assert all(isinstance(v, str) for v in data.values())
    # the snapshot ran in the first running pod, on the volume's mount
    execs = [c for c in kube["calls"]() if c[:1] == ["exec"]]
    assert execs and execs[0][:3] == ["exec", "-i", "mnist-trainer-0-x1"]


def test_final_accuracy_patches_else_creates_and_a_bad_line_is_refused(kube):
    env = run_env(kube)
    cmd = [sys.executable, str(ROOT / "scripts/live.py"), "kube", "--once", "--accuracy"]
    assert subprocess.run(cmd + ['{"loss": 0.04, "accuracy": 0.98612}'], env=env).returncode == 0
    [patch] = [c for c in kube["calls"]() if c[:1] == ["patch"]]
    assert json.loads(patch[-1])["data"]["last_accuracy"] == "0.9861"
    assert kube["configmaps"]() == []
    env["FAKE_PATCH_RC"] = "1"  # no ConfigMap yet: created
    assert subprocess.run(cmd + ['{"accuracy": 0.5}'], env=env).returncode == 0
    [cm] = kube["configmaps"]()
    assert cm["data"]["last_accuracy"] == "0.5000" and cm["data"]["phase"] == "tested"
    bad = subprocess.run(cmd + ["not json"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--accuracy" in bad.stderr


def test_quickstart_keeps_the_progress_configmap_and_shows_the_lines(kube):
    env = run_env(kube)
    env.update(WORKER_NUMBER="2", EPOCH="1", ROUNDS="2", SERVE="0")
    proc = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # the quickstart's output went through the watch, in order, and the workers' lines are in it
    out = proc.stdout
    assert out.index("== round 1/2") < out.index("== round 2/2") < out.index("accuracy test:")
    assert "  1-model.h5   round 2" in out
    cms = kube["configmaps"]()
    assert cms and cms[0]["data"]["round"] == "2" and cms[0]["data"]["workers_done"] == "1/2"
    [patch] = [c for c in kube["calls"]() if c[:3] == ["patch", "configmap", "mlk-progress"]]
    assert json.loads(patch[-1])["data"]["last_accuracy"] == "0.9861"  # the stand-in's accuracy test line
    # and the last round's end, which no snapshot could read (its pods had ended): from the quickstart itself
    final = json.loads(patch[-1])["data"]
    assert (final["round"], final["workers_done"], final["round_state"]) == ("2", "2/2", "round 2: aggregated")
    # the ConfigMap is applied from the watch only: the pipeline's own applies are as before
    applied = [list(yaml.safe_load_all(p.read_text())) for p in sorted((Path(env["FAKE_DIR"])).glob("apply-*.yaml"))]
    assert all(d["metadata"]["name"] != "mlk-progress" for docs in applied for d in docs)


def test_quickstart_without_python3_warns_and_runs(kube, tmp_path):
    bindir = tmp_path / "nopython"
    bindir.mkdir()
    for tool in ("bash", "awk", "sed", "grep", "cat", "mktemp", "rm", "sleep", "dirname", "tail", "head", "date",
                 "tr", "sort", "cut", "wc", "printf", "env", "id", "mkdir", "tee"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bindir / tool).symlink_to(found)
    env = run_env(kube)
    kubectl_dir = env["PATH"].split(os.pathsep)[0]
    env.update(PATH=f"{kubectl_dir}{os.pathsep}{bindir}", WORKER_NUMBER="2", EPOCH="1", ROUNDS="1", SERVE="0")
    proc = subprocess.run([str(bindir / "bash"), str(QUICKSTART)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "python3 not found: no live progress lines and no ConfigMap mlk-progress" in proc.stderr
    assert kube["configmaps"]() == []


def test_passthrough_keeps_the_quickstarts_lines_when_the_cluster_cannot_be_read(tmp_path):
    """No kubectl at all: no snapshot, no ConfigMap, but every line of the quickstart still gets through, in
    order, and the watch ends with its input."""
    lines = "".join(f"line {i}\n" for i in range(200))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/live.py"), "kube", "--kubectl", str(tmp_path / "none"),
                           "--interval", "0.1", "--passthrough"], input=lines, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == lines, proc.stderr
