#!/usr/bin/env python3
"""Kubernetes' overhead: the local pipeline and the quickstart on the real node, back to back, at the same
settings, each timed from its start to the served page; prints the ratio and where the Kubernetes run's
time went (the quickstart's own breakdown, summed over the critical path: breakdown()).

    .venv/bin/python benchmarks/benchmark-kubernetes.py [--workers 2 --epoch 1 --rounds 2 --batch 100]
        [--backend pvc|rwx] [--repeat N] [--kubeconfig FILE] [--mnist PATH]

Without --kubeconfig it starts the local control plane mlk-real and the real node (docs/real-node.md;
the stage images must be built: scripts/build-images.sh) and stops them at the end if it started them.
With --backend rwx each Kubernetes run binds one of the real node's 4 local volumes, which stay Released
after it: `scripts/local-cluster.sh up --node real` empties them for the next runs. Issue target: the
Kubernetes run within 1.5x the local one."""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from _repo import ROOT as REPO
from helpers import MnistUnavailable, mnist_path

SCRIPTS = REPO / "scripts"
COLUMNS = ("create", "schedule", "start", "boot", "work", "notice")
LIVED = re.compile(r"rounds (\d+)-(\d+) trainers$")
ROW = re.compile(r"^\S+ quickstart:   (?P<stage>.+?) +(?P<pod>\S+)" + r" +(\S+)" * len(COLUMNS) + r"$")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epoch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=1,
                   help="pairs of runs (local, then Kubernetes), alternating; the ratio is each pair's, and their "
                        "median is the figure (this machine's load moves either run by up to a third)")
    p.add_argument("--backend", choices=("pvc", "rwx"), default="pvc",
                   help="the quickstart's NFS_BACKEND (rwx: StorageClass local-rwx of the real node)")
    p.add_argument("--kubeconfig", help="a cluster with the real node up (default: start mlk-real here)")
    p.add_argument("--mnist", help="a Keras-layout mnist.npz (default: tests/helpers.py's mnist_path())")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.mnist is None:
        try:
            args.mnist = str(mnist_path())
        except MnistUnavailable as e:
            p.error(str(e))
    if not Path(args.mnist).is_file():
        p.error(f"--mnist {args.mnist}: no such file")
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(args):
    return {"WORKER_NUMBER": str(args.workers), "EPOCH": str(args.epoch), "ROUNDS": str(args.rounds),
            "BATCH": str(args.batch), "MNIST_NPZ": args.mnist, "SERVE": "1"}


def run_local(args):
    """scripts/local-quickstart.sh until it serves the last round's model (the same point as the quickstart's
    "server: ready"); seconds."""
    port, internal = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="mlk-bench-k8s-") as work:
        env = dict(os.environ, **settings(args), WORK_DIR=work, PORT=str(port), INTERNAL_PORT=str(internal))
        log = open(Path(work) / "run.log", "w")
        start = time.monotonic()
        proc = subprocess.Popen(["bash", str(SCRIPTS / "local-quickstart.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"local-quickstart.sh exited {proc.returncode}:\n{(Path(work) / 'run.log').read_text()[-3000:]}")
                # Served: the run says so after its accuracy test (its page is up from the start and serves
                # round 1's model as soon as it lands), and /readyz says ready.
                if "serving the model at" in (Path(work) / "run.log").read_text():
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                            if r.status == 200 and json.load(r).get("status") == "ready":
                                return time.monotonic() - start
                    except (OSError, ValueError):
                        pass
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def run(cmd, timeout=3600, **env):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **env), stdin=subprocess.DEVNULL)


class Cluster:
    """The cluster with the real node: given, or started here (and stopped again)."""

    def __init__(self, kubeconfig):
        self.given, self.config, self.started = kubeconfig, kubeconfig, []

    def __enter__(self):
        if not self.config:
            proc = run([SCRIPTS / "local-cluster.sh", "up"], LOCAL_CLUSTER_NAME="mlk-real")
            if proc.returncode:
                sys.exit(f"local-cluster.sh up failed:\n{proc.stderr[-3000:]}")
            if "already running" not in proc.stderr:
                self.started.append("cluster")
            self.config = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
            proc = run([SCRIPTS / "real-node.sh", "up", "--exclusive", self.config])
            if proc.returncode:
                self.__exit__()
                sys.exit(f"real-node.sh up failed:\n{proc.stderr[-3000:]}")
            if "kubelet already running" not in proc.stderr:
                self.started.append("node")
        return self.config

    def __exit__(self, *exc):
        if "node" in self.started:
            run([SCRIPTS / "real-node.sh", "down"], timeout=600)
        if "cluster" in self.started:
            run([SCRIPTS / "local-cluster.sh", "down"], timeout=600, LOCAL_CLUSTER_NAME="mlk-real")


def run_kubernetes(args, kubeconfig):
    """scripts/quickstart.sh in a namespace of its own until the server is ready; seconds and its output."""
    kubectl = str(REPO / ".venv" / "bin" / "kubectl") if (REPO / ".venv" / "bin" / "kubectl").exists() else "kubectl"
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    run([kubectl, "--kubeconfig", kubeconfig, "create", "namespace", ns])
    env = dict(settings(args), KUBECTL=f"{kubectl} --kubeconfig {kubeconfig} -n {ns}", NFS_BACKEND=args.backend,
               SERVICE_TYPE="ClusterIP")
    if args.backend == "rwx":
        env["STORAGE_CLASS"] = "local-rwx"
    try:
        start = time.monotonic()
        proc = run(["bash", SCRIPTS / "quickstart.sh"], **env)
        took = time.monotonic() - start
        if proc.returncode:
            sys.exit(f"quickstart.sh exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return took, proc.stdout
    finally:
        run(["bash", SCRIPTS / "teardown.sh"], timeout=600, **env, DELETE_DISK="1")
        run([kubectl, "--kubeconfig", kubeconfig, "delete", "namespace", ns, "--timeout=120s"], timeout=180)


def trainers_of(stage, stages):
    """The trainers' stage of a "round N ..." stage among STAGES: "round N trainers", or the trainers that lived
    through rounds A-B ("rounds A-B trainers", A <= N <= B: one Job a worker for the run); None if neither."""
    n = int(stage.split()[1])
    if f"round {n} trainers" in stages:
        return f"round {n} trainers"
    return next((s for s in stages if (m := LIVED.match(s)) and int(m[1]) <= n <= int(m[2])), None)


def breakdown(output):
    """The quickstart's rows, and per column the sum over the critical path: each stage's last pod (by when it
    was done), where stages that overlap count once. A round's aggregator is applied with its trainers: the
    slowest trainer's way to done, then the aggregator's own part (done after the last model) and its notice.
    Trainers that lived through several rounds ("rounds A-B trainers", their rows and every round's counting from
    their one apply) hold the aggregators of the rounds before B inside their work: only round B's aggregator
    adds its part after them. The accuracy test applied with the last round ("round N accuracy-test") counts
    likewise with the part of it left once the quickstart saw the round done; the server, applied then, runs
    beside that part: the longer of the two counts. (An accuracy test applied after the round, "accuracy-test",
    counts whole.) The dataset upload and the splitter applied with round 1's trainers ("round 1 dataset",
    "round 1 splitter") count nothing: their rows count from the same apply as the trainers', which waited for
    the split."""
    rows = []
    for line in output.splitlines():
        m = ROW.match(line)
        if m and m["pod"] != "pod":
            values = [None if v == "-" else float(v) for v in m.groups()[2:]]
            rows.append((m["stage"], m["pod"], values))
    last = {}
    for stage, pod, values in rows:
        done = sum(v for v in values[:5] if v is not None)
        if stage not in last or done > last[stage][0]:
            last[stage] = (done, values)
    rounds = [s for s in last if s.startswith("round ")]
    paired = {trainers_of(s, last) for s in rounds if s.endswith(" aggregator")} - {None}
    path, tail = [], []
    for stage, (done, values) in last.items():
        trainers = trainers_of(stage, last) if stage in rounds else None
        if stage in paired:
            continue  # counted with its aggregator
        if stage.endswith((" splitter", " dataset")) and trainers:
            continue  # inside its round's trainers' way to done
        if stage.endswith(" aggregator") and trainers:
            t_done, t_values = last[trainers]
            lived = LIVED.match(trainers)
            if lived and int(stage.split()[1]) < int(lived[2]):
                continue  # a round before their last: inside their work (they waited for its aggregate)
            path += [t_values[:5] + [0.0], [0.0] * 4 + [max(0.0, done - t_done), values[5]]]
        elif stage.endswith(" accuracy-test") and stage.replace("accuracy-test", "aggregator") in last:
            a_done, a_values = last[stage.replace("accuracy-test", "aggregator")]
            tail.append([0.0] * 4 + [max(0.0, done - a_done - (a_values[5] or 0)), values[5]])
        elif stage in ("server", "accuracy-test"):
            tail.append(values)
        else:
            path.append(values)
    if tail:
        path.append(max(tail, key=lambda values: sum(v or 0 for v in values)))
    totals = [sum(values[i] or 0 for values in path) for i in range(len(COLUMNS))]
    return rows, totals


def main(argv=None):
    args = parse_args(argv)
    print(f"settings: {args.workers} workers x {args.epoch} epochs x {args.rounds} rounds, batch {args.batch}, "
          f"backend {args.backend}", flush=True)
    pairs = []
    with Cluster(args.kubeconfig) as kubeconfig:
        for n in range(1, args.repeat + 1):
            local = run_local(args)
            print(f"pair {n}: local pipeline (scripts/local-quickstart.sh, SERVE=1): {local:.1f} s to the served page",
                  flush=True)
            kube, output = run_kubernetes(args, kubeconfig)
            print(f"pair {n}: real node (scripts/quickstart.sh, NFS_BACKEND={args.backend}): {kube:.1f} s to the "
                  f"served page; ratio {kube / local:.2f}x", flush=True)
            pairs.append((kube / local, local, kube, output))
    ratio, local, kube, output = sorted(pairs, key=lambda p: p[0])[(len(pairs) - 1) // 2]
    if len(pairs) > 1:
        print(f"ratios: {', '.join(f'{p[0]:.2f}x' for p in pairs)}; the median pair: {local:.1f} s and {kube:.1f} s")
    rows, totals = breakdown(output)
    print(f"ratio: {ratio:.2f}x (target <= 1.5x)")
    print(f"\n{'stage':<24} {'pod':<34} " + " ".join(f"{c:>8}" for c in COLUMNS))
    for stage, pod, values in rows:
        print(f"{stage:<24} {pod:<34} " + " ".join(f"{'-' if v is None else f'{v:.1f}':>8}" for v in values))
    print(f"{'critical path (s)':<59} " + " ".join(f"{t:>8.1f}" for t in totals))
    rest = kube - sum(totals)
    print(f"work {totals[4]:.1f} s of {kube:.1f} s; Kubernetes and the quickstart's waiting "
          f"{kube - totals[4]:.1f} s, of which {rest:.1f} s outside the stages' pods (applies, deletes, checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
