"""Seeded chaos runs on the real node: faults survived with nothing lost (issue 29).

Runs scripts/quickstart.sh with the NFS backend (NFS_BACKEND=pvc: the project's NFS server pod; small
settings: WORKER_NUMBER=2 EPOCH=1 ROUNDS=2 SERVE=1 SERVICE_TYPE=ClusterIP, the server's 2 replicas and its
PodDisruptionBudget) on a cluster with the real node (scripts/local-cluster.sh up --node real), each run
in a namespace of its own:

1. once undisturbed: its final aggregate, its ledger's fingerprints, and how long each pod kind lives;
2. then once per seed. The seed picks which pod to hit (the splitter, a trainer of a round, the
   aggregator of a round, the NFS server, a server replica), when (the chosen pod is waited for until its
   container runs, then a seeded fraction of that pod kind's life in the undisturbed run passes; a server
   replica is hit while it starts or while a load client posts digits to the Service), and how
   (`kubectl delete pod`, or SIGKILL of the container's main process: its pid from `crictl inspect`
   against the real node's containerd, killed from this host).

Every run must show, with no manual step: the quickstart exits 0 (or stops cleanly, and then
`RESUME=1 scripts/quickstart.sh` finishes it: done here); the final aggregate (and every round's) equals
the undisturbed run's array by array, with the same ledger fingerprints (each round's aggregate and start
weights, workers, shards and samples); the ledger verifies (aggregator/ledger.py: every recorded sha256,
rounds 1..n once each), every .h5 on the volume opens (no torn file); every server pod serves the model
the gate admitted (gate/admitted.json), never a rejected one, and every answer of the load client comes
from it; the load client (one new connection per request to the Service's ClusterIP, through the real
node's kube-proxy) gets no failed request. A client that retries a refused or reset connection after 0.25,
0.5, 1 and 2 s, as the page does (POST /api/predict is idempotent: the same image gives the same answer), is
counted beside it: a SIGKILLed server replica cannot finish what it held or refuse new connections
gracefully, so there the check is that no request fails after those retries (the failures before them are
printed).

Prints one line per run (seed, fault, target, moment, outcome, extra wall time against the undisturbed
run) and, per fault kind, the extra time against the target: at most one round plus one pod start (both
from the undisturbed run). Exit 0 when every run passed every check, 1 otherwise; 2 on bad arguments.

    export LOCAL_CLUSTER_CACHE=$HOME/.cache/mlk/local-cluster
    scripts/local-cluster.sh up --node real      # last line: KUBECONFIG=...
    .venv/bin/python benchmarks/chaos.py --kubeconfig "$KUBECONFIG" --seeds 1-20 [--json out.json]
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _repo  # noqa: F401 - benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from helpers import KUBECTL, MnistUnavailable, clean_env, mnist_path
from mlkcommon import Parser, fingerprint, parse_args

PROG = "chaos.py"
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
KINDS = ("splitter", "trainer", "aggregator", "nfs-server", "server")
METHODS = ("delete", "sigkill")
SELECTORS = {"splitter": "app.kubernetes.io/component=splitter", "trainer": "app.kubernetes.io/component=trainer",
             "aggregator": "app.kubernetes.io/component=aggregator", "nfs-server": "role=nfs-server",
             "server": "app=mnist-server"}
CONTAINERS = {"splitter": "mnist-splitter", "trainer": "mnist-trainer-job", "aggregator": "mnist-aggregator",
              "nfs-server": "nfs-server", "server": "mnist-server"}
LOAD_SECONDS = 12  # the load client's window after the run (a server replica is hit 2-10 s into it)


class ChaosError(Exception):
    """Bad input: one line, exit 2."""


def build_parser():
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                   help="the cluster with the real node (default $KUBECONFIG)")
    p.add_argument("--seeds", default="1-20", help="seeds: A-B or a comma list (default 1-20)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"pod kinds a seed may pick (default {','.join(KINDS)})")
    p.add_argument("--methods", default=",".join(METHODS), help="delete,sigkill (default both)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epoch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--mnist-npz", help="a local mnist.npz (default: tests/helpers.mnist_path())")
    p.add_argument("--cache", default=os.environ.get("LOCAL_CLUSTER_CACHE", str(REPO / ".cache" / "local-cluster")),
                   help="the local cluster's cache: crictl and its config (default $LOCAL_CLUSTER_CACHE)")
    p.add_argument("--plan", action="store_true", help="print what each seed picks and exit (no cluster needed)")
    p.add_argument("--json", help="write every run's record to this file")
    p.add_argument("--log-dir", default=None, help="keep each run's quickstart output here (default: a temp dir)")
    return p


def parse_seeds(text):
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-", 1))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ChaosError(f"--seeds must be A-B or a comma list of integers, got '{text}'") from None
    if not seeds:
        raise ChaosError(f"--seeds names no seed: '{text}'")
    return seeds


def plan(seed, kinds=KINDS, methods=METHODS, workers=2, rounds=2):
    """What a seed picks: {'seed', 'kind', 'method', 'fraction' (of the pod's life), and for a trainer 'round'
    and 'index', for the aggregator 'round', for the server 'phase' (starting | serving) and 'replica'}."""
    rng = random.Random(seed)
    p = {"seed": seed, "kind": rng.choice(sorted(kinds, key=KINDS.index)),
         "method": rng.choice(sorted(methods, key=METHODS.index)), "fraction": round(rng.random(), 3)}
    if p["kind"] == "trainer":
        p.update(round=rng.randint(1, rounds), index=rng.randrange(workers))
    elif p["kind"] == "aggregator":
        p["round"] = rng.randint(1, rounds)
    elif p["kind"] == "server":
        p.update(phase=rng.choice(("starting", "serving")), replica=rng.randrange(2))
    return p


def describe(p):
    target = {"trainer": lambda: f"trainer {p['index']} of round {p['round']}",
              "aggregator": lambda: f"aggregator of round {p['round']}",
              "server": lambda: (f"server replica {p['replica']} under load" if p["phase"] == "serving"
                                 else "a server replica starting")}.get(p["kind"], lambda: p["kind"])()
    return target


# --- the cluster ----------------------------------------------------------------------------------

class Cluster:
    def __init__(self, kubeconfig, cache):
        self.kubeconfig = kubeconfig
        self.cache = Path(cache)
        self.crictl = self.cache / "bin" / "crictl-v1.37.0" / "crictl"
        found = sorted((self.cache / "bin").glob("crictl-*/crictl"))
        if found:
            self.crictl = found[-1]
        self.crictl_config = self.cache / "real-node" / "crictl.yaml"

    def kubectl(self, *args, namespace=None, check=True, timeout=300, input=None):
        cmd = [str(KUBECTL), "--kubeconfig", self.kubeconfig] + (["-n", namespace] if namespace else []) + list(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def get(self, *args, namespace=None):
        return json.loads(self.kubectl("get", *args, "-o", "json", namespace=namespace).stdout)

    def cri_running(self, namespace, container=None):
        """The running containers named CONTAINER of the namespace's pods, from the real node's containerd (CRI):
        [{"id", "pod", "created" (unix time)}], sorted by pod name. Local and fast: the moment a container
        starts is seen within a poll, not after an apiserver round trip."""
        out = subprocess.run([str(self.crictl), "--config", str(self.crictl_config), "ps", "-o", "json", "--state",
                              "Running", "--label", f"io.kubernetes.pod.namespace={namespace}"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return []
        found = [{"id": c["id"], "pod": c["labels"]["io.kubernetes.pod.name"], "created": int(c["createdAt"]) / 1e9,
                  "name": c["metadata"]["name"]} for c in json.loads(out.stdout).get("containers") or []]
        return sorted((c for c in found if container is None or c["name"] == container), key=lambda c: c["pod"])

    def sigkill(self, container_id):
        """SIGKILL the container's main process, found through the CRI (crictl inspect: info.pid)."""
        cid = container_id.split("://", 1)[-1]
        out = subprocess.run([str(self.crictl), "--config", str(self.crictl_config), "inspect", cid],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"crictl inspect {cid[:12]}: {out.stderr.strip()}")
        inspect = json.loads(out.stdout)
        pid = inspect.get("info", {}).get("pid") or 0
        state = inspect.get("status", {}).get("state")
        if state != "CONTAINER_RUNNING" or not isinstance(pid, int) or pid <= 1:
            raise RuntimeError(f"container {cid[:12]} is not running (state {state}, pid {pid})")
        os.kill(pid, signal.SIGKILL)
        return pid


class PodWatch(threading.Thread):
    """Polls the namespace's pods: per pod uid, its kind, name, Job uid, when this process first saw its main
    container running and when it first saw it no longer running (or gone)."""

    def __init__(self, cluster, namespace, period=0.5):
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.period = cluster, namespace, period
        self.pods, self.lock, self.stop = {}, threading.Lock(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                items = self.cluster.get("pods", namespace=self.namespace)["items"]
            except Exception:  # a slow apiserver: next poll
                time.sleep(self.period)
                continue
            now = time.monotonic()
            seen = set()
            with self.lock:
                for pod in items:
                    meta, labels = pod["metadata"], pod["metadata"].get("labels", {})
                    kind = next((k for k, sel in SELECTORS.items() if labels.get(sel.split("=")[0]) == sel.split("=")[1]),
                                None)
                    if kind is None:
                        continue
                    uid = meta["uid"]
                    seen.add(uid)
                    rec = self.pods.setdefault(uid, {"kind": kind, "name": meta["name"], "created": now,
                                                     "running": None, "ended": None, "container": None,
                                                     "job": labels.get("batch.kubernetes.io/controller-uid"),
                                                     "job_name": labels.get("job-name"), "ready": None})
                    status = next((c for c in pod["status"].get("containerStatuses") or []
                                   if c["name"] == CONTAINERS[kind]), None)
                    running = bool(status and status.get("state", {}).get("running")) and not meta.get("deletionTimestamp")
                    if running and rec["running"] is None:
                        rec["running"], rec["container"] = now, status.get("containerID")
                    if running:
                        rec["container"] = status.get("containerID")
                        if status.get("ready") and rec["ready"] is None:
                            rec["ready"] = now
                    if not running and rec["running"] is not None and rec["ended"] is None:
                        rec["ended"] = now
                for uid, rec in self.pods.items():
                    if uid not in seen and rec["ended"] is None and rec["running"] is not None:
                        rec["ended"] = now
            time.sleep(self.period)

    def lifetimes(self):
        """{kind: median seconds from running to ended} over the pods that ended; the server and the NFS server:
        running to ready / to the end of the watch."""
        out = {}
        with self.lock:
            for kind in KINDS:
                spans = sorted((r["ended"] or time.monotonic()) - r["running"] if kind not in ("server",)
                               else (r["ready"] or time.monotonic()) - r["running"]
                               for r in self.pods.values() if r["kind"] == kind and r["running"] is not None)
                if spans:
                    out[kind] = spans[len(spans) // 2]
        return out

    def start_latency(self):
        """Median seconds from a trainer pod's first sight to its container running: a pod start."""
        with self.lock:
            spans = sorted(r["running"] - r["created"] for r in self.pods.values()
                           if r["kind"] == "trainer" and r["running"] is not None)
        return spans[len(spans) // 2] if spans else 0.0


class CriWatch(threading.Thread):
    """The undisturbed run's containers as containerd sees them (every 0.2 s): per container id, its kind, when
    it was created and when it was last seen running; and when the quickstart announced each round.
    lifetimes(): {kind: median seconds}, the lives the seeded fractions apply to."""

    def __init__(self, cluster, namespace, log):
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.log, self.seen, self.stop = cluster, namespace, log, {}, threading.Event()
        self.round_starts = {}

    def run(self):
        while not self.stop.is_set():
            kinds = {CONTAINERS[k]: k for k in ("splitter", "trainer", "aggregator")}
            now_round = current_round(self.log)
            self.round_starts.setdefault(now_round, time.time())
            for c in self.cluster.cri_running(self.namespace):
                if c["name"] in kinds:
                    self.seen.setdefault(c["id"], {"kind": kinds[c["name"]], "created": c["created"],
                                                   "round": now_round})["last"] = time.time()
            time.sleep(0.2)

    def in_rounds(self, c):
        """[(round, start, end)]: the part of container c's life in each round it ran in. A trainer lives through
        every round of the run (one Job a worker, issue 30): its life is cut at the rounds' announcements. A
        container of one round (the aggregator's, a trainer's with MIN_WORKERS below the worker count), or
        any without announcements known: its whole life, in the round it was first seen in."""
        if c["kind"] != "trainer" or not self.round_starts:
            return [(c["round"], c["created"], c["last"])]
        bounds = sorted(self.round_starts.items())
        parts = []
        for i, (r, begin) in enumerate(bounds):
            end = bounds[i + 1][1] if i + 1 < len(bounds) else float("inf")
            lo, hi = max(c["created"], begin), min(c["last"], end)
            if hi > lo:
                parts.append((r, lo, hi))
        return parts

    def starts(self, t0):
        """{"kind/round": seconds from t0 (the run's start) to the first container of that kind in that round}."""
        out = {}
        for c in self.seen.values():
            for r, lo, _ in self.in_rounds(c):
                key = f"{c['kind']}/{r}"
                out[key] = round(min(out.get(key, float("inf")), lo - t0), 2)
        return out

    def lifetimes(self):
        """{kind: median seconds} over the run, and {"kind/round": median} for a trainer's or the aggregator's
        round: rounds differ (the last one also runs the accuracy test beside it, issue 30), so a seeded
        fraction of a round's pod is taken of its life in that round."""
        out = {}
        for kind in ("splitter", "trainer", "aggregator"):
            mine = [c for c in self.seen.values() if c["kind"] == kind]
            spans = sorted(c["last"] - c["created"] for c in mine)
            if spans:
                out[kind] = spans[len(spans) // 2]
            if kind == "splitter":
                continue
            by_round = {}
            for c in mine:
                for r, lo, hi in self.in_rounds(c):
                    by_round.setdefault(r, []).append(hi - lo)
            for r, spans in sorted(by_round.items()):
                out[f"{kind}/{r}"] = sorted(spans)[len(spans) // 2]
        return out


def scaled_delay(fraction, life, base_offset, offset):
    """The seeded moment, in seconds after the target container started: FRACTION of the kind's LIFE in the
    undisturbed run, scaled by this run's pace: OFFSET (this run's seconds from its start to the target's
    start) over BASE_OFFSET (the undisturbed run's, for the same kind and round), within 0.5x-1x. A machine
    less busy than during the undisturbed run shortens the pod's life, and the moment with it, so that a seed
    does not fall after the pod's end. Never later than the undisturbed run's moment: a busier machine makes
    the pod live longer anyway, and a slow start (the volume, the dataset) says nothing of a round's length
    (seed 13: a start 1.2x slower moved round 1's aggregator's moment past its end). Returns (delay, pace)."""
    pace = 1.0
    if base_offset and base_offset > 0 and offset and offset > 0:
        pace = min(1.0, max(0.5, offset / base_offset))
    return fraction * life * pace, round(pace, 2)


def current_round(log):
    """The round the quickstart's output last announced ('== round r/R'), 0 before the first."""
    try:
        text = Path(log).read_text()
    except OSError:
        return 0
    rounds = [int(line.split("== round ", 1)[1].split("/", 1)[0]) for line in text.splitlines() if "== round " in line]
    return max(rounds, default=0)


# --- the load client ------------------------------------------------------------------------------

SIX = (REPO / "samples" / "6.png").read_bytes()
BOUNDARY = "mlkchaos"
BODY = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"6.png\"\r\n"
        "Content-Type: image/png\r\n\r\n").encode() + SIX + f"\r\n--{BOUNDARY}--\r\n".encode()


def post_six(host, timeout=10):
    """One POST /api/predict on a new connection: (status or None, answer dict or error text)."""
    conn = http.client.HTTPConnection(host, 80, timeout=timeout)
    try:
        conn.request("POST", "/api/predict", body=BODY,
                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data[:200].decode(errors="replace")
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    except http.client.HTTPException as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


# A request that failed on the connection (refused, reset, closed without an answer) is sent again after these
# delays, as the page does (server/static/page.js): POST /api/predict is idempotent, the same image gives the
# same answer, and a refused connection never reached the app.
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)


class Load(threading.Thread):
    """Posts samples/6.png to the Service's ClusterIP, a new connection each time, until stopped. Records each
    request: its first answer, and the answer after the retries (RETRY_DELAYS) when the first failed on the
    connection, with how many retries it took."""

    def __init__(self, host):
        super().__init__(daemon=True)
        self.host, self.results, self.stop = host, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            status, answer = post_six(self.host)
            retry = None
            if status is None:
                for n, delay in enumerate(RETRY_DELAYS, 1):
                    time.sleep(delay)
                    retry = (*post_six(self.host), n)
                    if retry[0] is not None:
                        break
            self.results.append((time.monotonic(), status, answer, retry))
            time.sleep(0.05)

    def summary(self):
        """(requests, the failed ones, those that still failed after the retries, the most retries one took)."""
        def ok(status, answer):
            return status == 200 and isinstance(answer, dict) and answer.get("digit") == 6
        failed = [r for r in self.results if not ok(r[1], r[2])]
        after_retry = [r for r in failed if not (r[3] and ok(*r[3][:2]))]
        most = max((r[3][2] for r in failed if r[3]), default=0)
        return len(self.results), failed, after_retry, most


# --- what a run left on the volume ------------------------------------------------------------------

def volume_root(cluster, namespace):
    """The host folder of the NFS server's disk (a local PersistentVolume of the real node): /mnt of every pod."""
    pvc = cluster.get("pvc", "nfs-server-disk", namespace=namespace)
    pv = cluster.get("pv", pvc["spec"]["volumeName"])
    return Path(pv["spec"]["local"]["path"])


def arrays(path):
    """{dataset path: numpy array} of every dataset in an .h5 file."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def weights_fingerprint(path):
    """mlkcommon.fingerprint of the model's weight arrays in file order (sorted dataset paths)."""
    a = arrays(path)
    return fingerprint(a[k] for k in sorted(a) if k.startswith("model_weights/"))


def snapshot(root, dest):
    """Copy what the checks read (the aggregate, rounds/, gate/) from the volume to dest; check no torn file:
    every .h5 opens; return the ledger's fingerprints."""
    import h5py
    import ledger as ledger_py  # aggregator/ledger.py

    dest = Path(dest)
    shutil.copy2(root / "aggregated-model.h5", dest / "aggregated-model.h5")
    shutil.copytree(root / "rounds", dest / "rounds")
    if (root / "gate").is_dir():
        shutil.copytree(root / "gate", dest / "gate")
    torn = []
    for path in list(dest.rglob("*.h5")):
        try:
            with h5py.File(path, "r"):
                pass
        except OSError as e:
            torn.append(f"{path.relative_to(dest)}: {e}")
    n, digest = ledger_py.verify(dest)  # raises LedgerError: rounds out of order/twice, a hash that differs
    ledger = json.loads((dest / "rounds" / "ledger.json").read_text())
    prints = []
    for entry in ledger["rounds"]:
        prints.append({
            "round": entry["round"],
            "aggregate": weights_fingerprint(dest / entry["aggregate"]["file"]),
            "start": weights_fingerprint(dest / entry["start"]["file"]) if entry.get("start") else None,
            "workers": sorted((w["file"], w.get("data"), w.get("samples")) for w in entry["workers"]),
            "samples": entry["samples"], "missing": entry.get("missing"),
        })
    return {"last_round": n, "sha256": digest, "fingerprints": prints, "torn": torn}


def compare_arrays(a_path, b_path):
    """'' when every dataset is equal (names, dtypes, shapes, values), else the first difference."""
    import numpy as np

    a, b = arrays(a_path), arrays(b_path)
    if sorted(a) != sorted(b):
        return f"datasets differ: {sorted(set(a) ^ set(b))[:3]}"
    for k in sorted(a):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            return f"{k} differs"
    return ""


# --- one run --------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args, cluster, mnist, log_dir):
        self.args, self.cluster, self.mnist, self.log_dir = args, cluster, mnist, Path(log_dir)
        self.cleanups = []

    def env(self, namespace, **extra):
        env = clean_env(KUBECTL=f"{KUBECTL} --kubeconfig {self.cluster.kubeconfig} -n {namespace}", POLL="2",
                        NFS_BACKEND="pvc", WORKER_NUMBER=str(self.args.workers), EPOCH=str(self.args.epoch),
                        ROUNDS=str(self.args.rounds), SERVE="1", SERVICE_TYPE="ClusterIP", MNIST_NPZ=str(self.mnist))
        env.update(extra)
        return env

    def quickstart(self, namespace, log, **extra):
        with open(log, "a") as out:
            return subprocess.Popen(["bash", str(SCRIPTS / "quickstart.sh")], env=self.env(namespace, **extra),
                                    stdout=out, stderr=subprocess.STDOUT, text=True)

    def cleanup(self, namespace):
        """Remove the run (teardown.sh DELETE_DISK=1, its namespace and PersistentVolume) and give the NFS server's
        disk, a local volume of the real node, back emptied (as scripts/real-node.sh up does for a Released one).
        Runs in a thread beside the next run: deleting costs little CPU, and the node has more volumes."""
        try:
            disk = self.cluster.get("pvc", "nfs-server-disk", namespace=namespace)["spec"].get("volumeName")
        except Exception:
            disk = None
        subprocess.run(["bash", str(SCRIPTS / "teardown.sh")], env=self.env(namespace, DELETE_DISK="1"),
                       capture_output=True, text=True, timeout=600)
        self.cluster.kubectl("delete", "namespace", namespace, "--timeout=300s", check=False, timeout=360)
        self.cluster.kubectl("delete", "pv", f"mlk-nfs-{namespace}", "--ignore-not-found", check=False)
        if not disk:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pv = self.cluster.get("pv", disk)
            if pv["status"].get("phase") == "Released" and pv["spec"].get("claimRef", {}).get("namespace") == namespace:
                path = Path(pv["spec"]["local"]["path"])
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                self.cluster.kubectl("patch", "pv", disk, "--type", "json", "-p",
                                     '[{"op": "remove", "path": "/spec/claimRef"}]', check=False)
                return
            time.sleep(2)

    def cleanup_later(self, namespace):
        """cleanup() in a thread; at most one runs beside a run (the node's volumes are few)."""
        for t in self.cleanups:
            t.join()
        self.cleanups = [threading.Thread(target=self.cleanup, args=(namespace,), daemon=True)]
        self.cleanups[0].start()

    def finish(self):
        for t in self.cleanups:
            t.join()

    def hit(self, p, rec, namespace):
        if p["method"] == "delete":
            self.cluster.kubectl("delete", "pod", rec["name"], "--wait=false", namespace=namespace)
            return "deleted"
        pid = self.cluster.sigkill(rec["container"])
        return f"SIGKILL pid {pid}"

    def run(self, p, baseline=None):
        """One quickstart run (p None: undisturbed); returns its record."""
        namespace = f"chaos-{'base' if p is None else p['seed']}-{uuid.uuid4().hex[:6]}"
        log = self.log_dir / f"{namespace}.out"
        self.cluster.kubectl("create", "namespace", namespace)
        watch = PodWatch(self.cluster, namespace)
        watch.start()
        cri = CriWatch(self.cluster, namespace, log)
        if p is None:
            cri.start()
        record = {"seed": None if p is None else p["seed"], "namespace": namespace, "log": str(log),
                  "plan": p, "problems": []}
        fault = {}
        try:
            start, t0 = time.monotonic(), time.time()
            proc = self.quickstart(namespace, log)
            injector = None
            if p is not None and not (p["kind"] == "server" and p["phase"] == "serving"):
                injector = threading.Thread(target=self.inject, args=(p, log, namespace, baseline, fault, proc, t0),
                                            daemon=True)
                injector.start()
            code = proc.wait(timeout=3600)
            wall = time.monotonic() - start
            record["exit"] = code
            outcome = "exit 0" if code == 0 else f"exit {code}"
            if code != 0:  # a clean stop: RESUME=1 finishes it
                resumed = self.quickstart(namespace, log, RESUME="1").wait(timeout=3600)
                wall = time.monotonic() - start
                outcome += f", RESUME=1 exit {resumed}"
                if resumed != 0:
                    record["problems"].append(f"RESUME=1 quickstart exit {resumed}")
            if injector:
                injector.join(timeout=5)
            record["wall"] = round(wall, 1)
            record["outcome"] = outcome
            # The server: every pod serves the admitted model; a load client on the Service loses nothing.
            self.serve_checks(p, watch, namespace, record, fault)
            record["fault"] = fault
            if p is not None and not fault.get("hit"):
                record["problems"].append(f"the fault was not injected: {fault.get('error', 'no matching pod ran')}")
            if p is None:
                cri.stop.set()
                record["lifetimes"] = {k: round(v, 1) for k, v in {**watch.lifetimes(), **cri.lifetimes()}.items()}
                record["starts"] = cri.starts(t0)
                record["pod_start"] = round(watch.start_latency(), 1)
            self.volume_checks(namespace, record, baseline)
        except Exception as e:  # a check that could not run is a failed run, with its reason
            record["problems"].append(f"{type(e).__name__}: {e}")
        finally:
            watch.stop.set()
            cri.stop.set()
            if "proc" in locals() and proc.poll() is None:
                proc.kill()
            self.cleanup_later(namespace)
        record["passed"] = not record["problems"]
        return record

    def inject(self, p, log, namespace, baseline, fault, proc, t0):
        """Wait until the plan's container runs (containerd's view, polled every 0.1 s; a trainer's or the
        aggregator's round from the quickstart's output), then until the seeded fraction of that kind's life
        in the undisturbed run has passed since the container was created, then hit its pod."""
        lives = (baseline or {}).get("lifetimes", {})
        life = lives.get(f"{p['kind']}/{p.get('round')}", lives.get(p["kind"], 5.0))  # that round's, if known
        if p["kind"] == "nfs-server":  # its life is the run: the fraction falls in the split and the rounds
            life = baseline["training_span"]
        deadline = time.monotonic() + 1800
        round_seen = None  # when the plan's round was first seen announced
        while time.monotonic() < deadline and proc.poll() is None:
            found = self.cluster.cri_running(namespace, CONTAINERS[p["kind"]])
            if p["kind"] == "trainer":
                found = [c for c in found if c["pod"].startswith(f"mnist-trainer-{p['index']}-")]
            if p["kind"] in ("trainer", "aggregator"):
                if current_round(log) != p["round"]:
                    found = []
                elif round_seen is None:
                    round_seen = time.time()
            if found:
                target = found[0]
                key = f"{p['kind']}/{p.get('round', 0)}"
                # its life in this round (a trainer lives through every round): from the later of its creation
                # and the round's announcement
                began = max(target["created"], round_seen or 0.0)
                delay, pace = scaled_delay(p["fraction"], life, (baseline or {}).get("starts", {}).get(key),
                                           began - t0)
                time.sleep(max(0.0, began + delay - time.time()))
                fault.update(pod=target["pod"], life=round(life, 1), pace=pace)
                try:
                    if p["method"] == "delete":
                        if not any(c["id"] == target["id"] for c in self.cluster.cri_running(namespace, CONTAINERS[p["kind"]])):
                            raise RuntimeError(f"the container ended {time.time() - began:.1f} s into its life, "
                                               "before the moment")
                        self.cluster.kubectl("delete", "pod", target["pod"], "--wait=false", namespace=namespace)
                        how = "deleted"
                    else:
                        how = f"SIGKILL pid {self.cluster.sigkill(target['id'])}"
                    fault.update(moment=round(time.time() - began, 1), how=how, hit=True)
                except Exception as e:  # the container ended before the moment (a short life): say so
                    fault["error"] = f"{type(e).__name__}: {e}"
                return
            time.sleep(0.1)

    def serve_checks(self, p, watch, namespace, record, fault):
        svc = self.cluster.get("service", "mnist-server-svc", namespace=namespace)
        ip = svc["spec"]["clusterIP"]
        root = volume_root(self.cluster, namespace)
        admitted = json.loads((root / "gate" / "admitted.json").read_text())["sha256"]
        load = Load(ip)
        load.start()
        try:
            if p is not None and p["kind"] == "server" and p["phase"] == "serving":
                time.sleep(2 + p["fraction"] * 8)
                pods = sorted(self.server_pods(namespace))
                rec = next((r for r in watch.pods.values() if r["name"] == pods[p["replica"] % len(pods)]), None)
                fault.update(pod=rec["name"], moment=round(time.monotonic() - rec["running"], 1),
                             how=self.hit(p, rec, namespace), hit=True)
                t0 = time.monotonic()
                time.sleep(3)
                while time.monotonic() - t0 < 300 and len(self.server_pods(namespace)) < 2:
                    time.sleep(1)
                fault["recovered"] = round(time.monotonic() - t0, 1)
                time.sleep(3)
            else:
                time.sleep(LOAD_SECONDS)
        finally:
            load.stop.set()
            load.join(timeout=30)
        n, failed, after_retry, most = load.summary()
        model_ids = {a.get("model") for _, s, a, _ in load.results if s == 200 and isinstance(a, dict)}
        model_ids |= {r[3][1].get("model") for r in load.results if r[3] and r[3][0] == 200 and isinstance(r[3][1], dict)}
        record["load"] = {"requests": n, "failed": len(failed), "failed_after_retry": len(after_retry),
                          "most_retries": most, "errors": sorted({str(f[2])[:80] for f in failed})[:3]}
        if n < 20:
            record["problems"].append(f"the load client made only {n} requests")
        # A deleted replica stops gracefully (preStop, then nginx drains): no request may fail. A SIGKILLed one
        # cannot answer what it held, and refuses new connections until the kubelet has seen it die and
        # kube-proxy has dropped its endpoint: the client sees a refused or reset connection, and a client
        # that retries such a POST (idempotent: the same image, the same answer) over RETRY_DELAYS loses nothing.
        lossless = failed if p is None or p["kind"] != "server" or p["method"] != "sigkill" else after_retry
        if lossless:
            record["problems"].append(f"load: {len(failed)} of {n} requests failed ({len(after_retry)} after the retries)")
        if any(not admitted.startswith(m or "-") for m in model_ids):
            record["problems"].append(f"load: answers from model(s) {sorted(model_ids)}, admitted {admitted[:12]}")
        for name, pod_ip in self.server_pods(namespace).items():
            conn = http.client.HTTPConnection(pod_ip, 5000, timeout=10)
            try:
                conn.request("GET", "/api/model")
                info = json.loads(conn.getresponse().read())
            finally:
                conn.close()
            if info.get("sha256") != admitted:
                record["problems"].append(f"pod {name} serves {str(info.get('sha256'))[:12]}, the gate admitted {admitted[:12]}")
            decision = (info.get("gate") or {}).get("last_decision") or {}
            if decision.get("decision") == "rejected" and decision.get("candidate", {}).get("sha256") == info.get("sha256"):
                record["problems"].append(f"pod {name} serves the model its gate rejected")
        record["admitted"] = admitted

    def server_pods(self, namespace):
        pods = {}
        for pod in self.cluster.get("pods", "-l", SELECTORS["server"], namespace=namespace)["items"]:
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
            if ready and not pod["metadata"].get("deletionTimestamp"):
                pods[pod["metadata"]["name"]] = pod["status"]["podIP"]
        return pods

    def volume_checks(self, namespace, record, baseline):
        root = volume_root(self.cluster, namespace)
        dest = Path(tempfile.mkdtemp(prefix=f"{namespace}-", dir=self.log_dir))
        snap = snapshot(root, dest)
        record["snapshot"] = str(dest)
        record["ledger"] = {"last_round": snap["last_round"], "sha256": snap["sha256"]}
        record["fingerprints"] = snap["fingerprints"]
        if snap["torn"]:
            record["problems"].append(f"torn files: {snap['torn'][:3]}")
        if snap["last_round"] != self.args.rounds:
            record["problems"].append(f"the ledger ends at round {snap['last_round']}, not {self.args.rounds}")
        if record.get("admitted") and record["admitted"] != snap["sha256"]:
            record["problems"].append("the admitted model is not the last round's aggregate")
        if baseline is None:
            return
        base = Path(baseline["snapshot"])
        diff = compare_arrays(base / "aggregated-model.h5", dest / "aggregated-model.h5")
        for k in range(1, self.args.rounds + 1):
            diff = diff or compare_arrays(base / "rounds" / f"r{k}.h5", dest / "rounds" / f"r{k}.h5")
        if diff:
            record["problems"].append(f"the aggregate differs from the undisturbed run's: {diff}")
        if snap["fingerprints"] != baseline["fingerprints"]:
            record["problems"].append("the ledger's fingerprints differ from the undisturbed run's")
        record["equal_weights"] = not diff


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        seeds = parse_seeds(args.seeds)
        kinds = [k for k in args.kinds.split(",") if k]
        methods = [m for m in args.methods.split(",") if m]
        if not kinds or set(kinds) - set(KINDS):
            raise ChaosError(f"--kinds must name some of {','.join(KINDS)}, got '{args.kinds}'")
        if not methods or set(methods) - set(METHODS):
            raise ChaosError(f"--methods must name some of {','.join(METHODS)}, got '{args.methods}'")
        for name in ("workers", "epoch", "rounds"):
            if getattr(args, name) < 1:
                raise ChaosError(f"--{name} must be >= 1, got {getattr(args, name)}")
        plans = [plan(s, kinds, methods, args.workers, args.rounds) for s in seeds]
        if args.plan:
            for p in plans:
                print(f"seed {p['seed']:>3}: {p['method']:<7} {describe(p):<34} at {p['fraction']:.0%} of its life")
            return 0
        if not args.kubeconfig or not Path(args.kubeconfig).is_file():
            raise ChaosError(f"--kubeconfig {args.kubeconfig or '(unset)'}: no such file (scripts/local-cluster.sh up "
                             "--node real prints it)")
        try:
            mnist = Path(args.mnist_npz) if args.mnist_npz else mnist_path()
        except MnistUnavailable as e:
            raise ChaosError(f"no MNIST: {e}") from None
        if not mnist.is_file():
            raise ChaosError(f"--mnist-npz {mnist}: no such file")
    except ChaosError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cluster = Cluster(args.kubeconfig, args.cache)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, cluster, mnist, log_dir)

    def emit(records):
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(records, indent=1, default=str))
            tmp.replace(args.json)

    print(f"{PROG}: logs and snapshots in {log_dir}", flush=True)
    base = runner.run(None)
    records = [base]
    emit(records)
    print(f"undisturbed: {base.get('outcome')} in {base.get('wall')} s; pod lives {base.get('lifetimes')}; "
          f"pod start {base.get('pod_start')} s; load {base.get('load')}"
          + (f"; PROBLEMS: {base['problems']}" if base["problems"] else ""), flush=True)
    if base["problems"]:
        runner.finish()
        return 1
    ledger = json.loads((Path(base["snapshot"]) / "rounds" / "ledger.json").read_text())
    rounds = [e["round_seconds"] for e in ledger["rounds"]]
    base["round"] = max(rounds)
    # the NFS server's life to hit: from its start to the last round's end (the split and the rounds)
    base["training_span"] = sum(rounds) + base["lifetimes"].get("splitter", 5) + 2 * base["pod_start"] * args.rounds
    target = base["round"] + base["pod_start"]
    print(f"target: extra wall time <= one round ({base['round']:.0f} s) + one pod start ({base['pod_start']:.0f} s) "
          f"= {target:.0f} s", flush=True)
    print(f"{'seed':>4}  {'fault':<7}  {'target':<34}  {'moment':<22}  {'outcome':<26}  {'extra':>6}  result", flush=True)
    for p in plans:
        r = runner.run(p, base)
        records.append(r)
        emit(records)
        f = r.get("fault", {})
        moment = f"{f['moment']} s of ~{f.get('life', '-')} s" if "moment" in f else "not hit"
        extra = r["wall"] - base["wall"] if "wall" in r else float("nan")
        r["extra"] = round(extra, 1)
        outcome = r.get("outcome", "?")
        if p["kind"] == "server" and p["phase"] == "serving":
            load = r.get("load", {})
            outcome += (f"; load {load.get('failed')}/{load.get('requests')} failed ({load.get('failed_after_retry')} after"
                        f" the retries, at most {load.get('most_retries', 0)} needed)")
        print(f"{p['seed']:>4}  {p['method']:<7}  {describe(p):<34}  {moment:<22}  {outcome:<26}  {extra:>+6.0f}  "
              + ("ok, equal weights" if r["passed"] else f"FAILED: {'; '.join(r['problems'])}"), flush=True)
    print(f"\nper fault kind (target {target:.0f} s: one round + one pod start):")
    for kind in KINDS:
        for method in METHODS:
            rs = [r for r in records[1:] if r["plan"]["kind"] == kind and r["plan"]["method"] == method]
            if rs:
                extras = [r["extra"] for r in rs]
                print(f"  {kind:<10} {method:<7} runs {len(rs):>2}  passed {sum(r['passed'] for r in rs):>2}  "
                      f"extra mean {sum(extras) / len(extras):+.0f} s, max {max(extras):+.0f} s  "
                      + ("within target" if max(extras) <= target else "OVER target"))
    emit(records)
    runner.finish()
    failed = [r["seed"] for r in records[1:] if not r["passed"]]
    print(f"\n{len(records) - 1 - len(failed)} of {len(records) - 1} seeded runs passed"
          + (f"; failed seeds: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
