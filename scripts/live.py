"""The run's progress in the terminal and in the ConfigMap `mlk-progress`: one line per worker, refreshed in place
on a terminal, plain lines (one per change of round, epoch or state) in a log or CI.

    live.py local --dir WORK_DIR [--interval 1]            lines from WORK_DIR's progress files, until stopped
    live.py kube [--kubectl "kubectl --context X -n NS"] [--interval 5] [--configmap mlk-progress]
                                                           the same from the cluster's volume, and the ConfigMap
    live.py kube ... --passthrough                         also print the lines read on stdin above the live
                                                           lines, and stop at the end of stdin
    live.py kube --once --accuracy JSON [--round N --workers-done K/N]   the ConfigMap's last accuracy, from the
                                                           accuracy test (and the last round's end: no pod is left
                                                           then to read the volume in)

The snapshot is server/progress.py's (the same as the page's /api/progress). scripts/rounds.py draws the lines
for scripts/local-quickstart.sh between its own; scripts/quickstart.sh runs `kube` in the background while the
rounds run, its own output piped through `--passthrough` (so on a terminal the live lines stay below everything
it prints, refreshed in place): it reads the volume by `kubectl exec` into a running trainer or aggregator pod (their images have
Python; server/progress.py is standard library only, sent on stdin), prints the lines, and applies the
ConfigMap `mlk-progress` (round, workers done, last accuracy, phase, one line per worker) whenever it changes:
`kubectl get cm mlk-progress -o yaml` shows it. Nothing here stops or fails the run: a snapshot that cannot be
read is skipped.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_SOURCE = ROOT / "server" / "progress.py"
CONFIGMAP = "mlk-progress"
BAR = 20  # characters of a worker's bar
LIVE_PODS = "app.kubernetes.io/name=mlk-mnist,app.kubernetes.io/component in (trainer,aggregator)"


def load_progress_module():
    """server/progress.py as a module (the server's folder is not on this script's path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlk_live_progress", PROGRESS_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fmt(value, spec, missing="?"):
    return missing if value is None else format(value, spec)


def worker_line(w):
    """One worker as one line: name, round, epoch, step of steps with a bar, loss, state, time left."""
    steps, step = w.get("steps"), w.get("step")
    share = min(1.0, step / steps) if steps and step is not None else 0.0
    filled = int(round(share * BAR))
    eta = w.get("eta_seconds")
    left = f"  {eta:.0f}s left" if w.get("state") == "training" and isinstance(eta, (int, float)) else ""
    return (f"{w.get('worker', '?'):<12} round {fmt(w.get('round'), 'd')}  epoch {fmt(w.get('epoch'), 'd')}/"
            f"{fmt(w.get('epochs'), 'd')}  step {fmt(step, 'd'):>5}/{fmt(steps, 'd')} [{'#' * filled}{'-' * (BAR - filled)}]"
            f"  loss {fmt(w.get('loss'), '.4f')}  {w.get('state', '?')}{left}")


def round_line(snapshot):
    s = snapshot.get("round_state")
    if not s:
        return None
    head = f"round {fmt(s.get('round'), 'd')}: "
    if s["state"] == "waiting":
        return head + f"waiting for models, {fmt(s.get('present'), 'd')} of {fmt(s.get('expected'), 'd')} present"
    if s["state"] == "averaging":
        return head + f"averaging {fmt(s.get('present'), 'd')} models"
    if s["state"] == "failed":
        return head + f"failed: {s.get('error') or ''}"
    missing = f", missing {', '.join(s['missing'])}" if s.get("missing") else ""
    return head + ("aggregated and scored" if s["state"] == "scored" else "aggregated") + missing


def lines_of(snapshot):
    """(key, line) per worker, then the round's: the key changes when a plain log should get a new line."""
    out = [((w.get("worker"), w.get("round"), w.get("epoch"), w.get("state")), "  " + worker_line(w))
           for w in snapshot.get("workers") or []]
    line = round_line(snapshot)
    if line:
        state = snapshot["round_state"]
        out.append((("round", state.get("round"), state.get("state"), state.get("present")), "  " + line))
    return out


class Terminal:
    """The live lines below everything else written: on a terminal, redrawn in place (ANSI: cursor up, clear
    line); elsewhere, a line printed only when its key changes. write() prints other text above the block."""

    def __init__(self, out=sys.stdout, tty=None, width=None):
        self.out = out
        self.width = width  # a tty's line width (None: the terminal's, asked at each draw)
        self.tty = out.isatty() if tty is None else tty
        self.block = []  # the lines shown (tty)
        self.keys = {}  # line key -> printed (plain)
        self.lock = threading.RLock()  # the round loop's threads write too

    def _clear(self):
        if self.tty and self.block:
            self.out.write(f"\x1b[{len(self.block)}F\x1b[J")  # to the block's first line, clear to the end

    def _draw(self):
        if self.tty and self.block:  # each line cut to the terminal's width: a wrapped line would break the redraw
            width = self.width or max(20, shutil.get_terminal_size().columns - 1)
            self.out.write("".join(f"{line[:width]}\n" for line in self.block))

    def write(self, text, stream=None):
        with self.lock:
            self._clear()
            if stream is not None and stream is not self.out:
                self.out.flush()
                stream.write(text)
                stream.flush()
            else:
                self.out.write(text)
            self._draw()
            self.out.flush()

    def update(self, pairs):
        with self.lock:
            self._update(pairs)

    def _update(self, pairs):
        if self.tty:
            self._clear()
            self.block = [line for _, line in pairs]
            self._draw()
        else:
            for key, line in pairs:
                if self.keys.get(key[0]) != key:
                    self.keys[key[0]] = key
                    self.out.write(line + "\n")
        self.out.flush()

    def close(self):
        """Leave the last block on screen as plain text (nothing is redrawn over it any more)."""
        with self.lock:
            self.block = []


class Stream:
    """A file-like object whose writes go through a Terminal (above its live lines), to `target`."""

    def __init__(self, terminal, target):
        self.terminal, self.target = terminal, target

    def write(self, text):
        self.terminal.write(text, self.target)

    def writelines(self, lines):
        self.write("".join(lines))

    def flush(self):
        pass


# ------------------------------------------------------------------------------------------ the cluster


class Cluster:
    """The volume's snapshot and the ConfigMap through kubectl."""

    def __init__(self, kubectl, timeout=20):
        self.kubectl = shlex.split(kubectl)
        self.timeout = timeout

    def run(self, *args, stdin=None):
        try:
            done = subprocess.run([*self.kubectl, *args], input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def snapshot(self):
        """The live snapshot read in a running trainer or aggregator pod, or None (none running, or it failed)."""
        pods = self.run("get", "pods", "-l", LIVE_PODS, "--field-selector=status.phase=Running",
                        "-o", "jsonpath={.items[*].metadata.name}")
        for pod in (pods or "").split()[:3]:
            out = self.run("exec", "-i", pod, "--", "python", "-", "/mnt", stdin=PROGRESS_SOURCE.read_text())
            try:
                doc = json.loads(out.strip().splitlines()[-1]) if out else None
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("format") == "mlk-live/1":
                return doc
        return None

    def apply_configmap(self, name, data):
        manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mlk-mnist",
                                                          "app.kubernetes.io/component": "progress"}},
                    "data": {key: str(value) for key, value in data.items()}}
        return self.run("apply", "-f", "-", stdin=json.dumps(manifest)) is not None


def configmap_data(snapshot, accuracy=None):
    """The ConfigMap's data: round, workers done (of those reporting), the last scored accuracy, the phase, the
    round's state and one line per worker."""
    workers = snapshot.get("workers") or []
    current = [w for w in workers if w.get("round") == snapshot.get("round")]
    scored = [c for c in snapshot.get("curve") or [] if isinstance(c.get("test_accuracy"), (int, float))]
    last = accuracy if accuracy is not None else (scored[-1]["test_accuracy"] if scored else None)
    return {
        "round": "" if snapshot.get("round") is None else snapshot["round"],
        "workers_done": f"{sum(w.get('state') == 'done' for w in current)}/{len(current)}",
        "last_accuracy": "" if last is None else f"{last:.4f}",
        "phase": snapshot.get("phase", ""),
        "round_state": round_line(snapshot) or "",
        "workers": "\n".join(worker_line(w) for w in workers),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def watch_cluster(cluster, terminal, interval, name, stop):
    """Snapshot, lines and ConfigMap every `interval` seconds until stop(): once at least, and once more after
    stop() turns true (the run's last state)."""
    last = None
    while True:
        stopping = stop()
        snapshot = cluster.snapshot()
        if snapshot is not None:
            terminal.update(lines_of(snapshot))
            data = configmap_data(snapshot)
            if {k: v for k, v in data.items() if k != "updated_at"} != last:
                if cluster.apply_configmap(name, data):
                    last = {k: v for k, v in data.items() if k != "updated_at"}
        if stopping:
            return
        deadline = time.monotonic() + interval
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.2)


def final_accuracy(cluster, name, accuracy_json, last_round=None, workers_done=None):
    """After the accuracy test: the ConfigMap's last_accuracy and phase from its result line; with the last
    round and its workers done (the quickstart knows them), the round's end too, which the watch cannot see:
    once the last aggregator has ended, no pod is left to read the volume in."""
    try:
        accuracy = float(json.loads(accuracy_json)["accuracy"])
    except (ValueError, KeyError, TypeError):
        print(f"live.py: error: --accuracy must be the accuracy test's JSON line, got {accuracy_json!r}",
              file=sys.stderr)
        return 2
    data = {"last_accuracy": f"{accuracy:.4f}", "phase": "tested",
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if last_round is not None:
        data.update(round=str(last_round), round_state=f"round {last_round}: aggregated")
    if workers_done is not None:
        data["workers_done"] = workers_done
    # a merge patch keeps what the watch wrote (round, workers); no ConfigMap yet (no snapshot was read): create it
    if cluster.run("patch", "configmap", name, "--type", "merge", "-p", json.dumps({"data": data})) is not None:
        return 0
    return 0 if cluster.apply_configmap(name, data) else 1


# ------------------------------------------------------------------------------------------ command line


def positive(text):
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0-3600 seconds, got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="live.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="lines from WORK_DIR's progress files until stopped")
    local.add_argument("--dir", required=True, help="WORK_DIR (the volume's layout)")
    local.add_argument("--interval", type=positive, default=1.0)
    kube = sub.add_parser("kube", help="lines and the ConfigMap from the cluster's volume until stopped")
    kube.add_argument("--kubectl", default="kubectl", help='the kubectl command (default "kubectl")')
    kube.add_argument("--interval", type=positive, default=5.0)
    kube.add_argument("--configmap", default=CONFIGMAP)
    kube.add_argument("--passthrough", action="store_true",
                      help="print stdin's lines above the live lines; stop at the end of stdin")
    kube.add_argument("--once", action="store_true", help="with --accuracy: update the ConfigMap once and exit")
    kube.add_argument("--accuracy", help="the accuracy test's JSON result line")
    kube.add_argument("--round", type=int, help="with --once: the last round, now aggregated")
    kube.add_argument("--workers-done", help="with --once: K/N, the last round's workers whose models it averaged")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.append(True))
    terminal = Terminal()
    if args.command == "local":
        if not os.path.isdir(args.dir):
            print(f"live.py: error: --dir {args.dir} is not a directory", file=sys.stderr)
            return 2
        live = load_progress_module().LiveProgress(args.dir)
        while not stopped:
            terminal.update(lines_of(live.snapshot()))
            time.sleep(args.interval)
        terminal.close()
        return 0
    cluster = Cluster(args.kubectl)
    if args.once:
        if not args.accuracy:
            print("live.py: error: --once needs --accuracy", file=sys.stderr)
            return 2
        return final_accuracy(cluster, args.configmap, args.accuracy, args.round, args.workers_done)
    if args.passthrough:
        def copy_stdin():  # the quickstart's own lines, above the live ones; its end stops the watch
            for line in sys.stdin:
                terminal.write(line)
            stopped.append(True)

        threading.Thread(target=copy_stdin, daemon=True).start()
    try:
        watch_cluster(cluster, terminal, args.interval, args.configmap, lambda: bool(stopped))
    except Exception as err:  # noqa: BLE001  (a view only: the quickstart's own lines must still get through)
        print(f"live.py: warning: live progress stopped: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        while args.passthrough and not stopped:
            time.sleep(0.2)
    terminal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
