"""The run as it happens, for GET /api/progress and the page: read from the progress files the stages write on
the shared volume (--progress-dir, docs/CONTRACTS.md "Live progress") and the round ledger beside them.

    DIR/model/{i}-model.progress.json     each trainer's (epoch, step of steps, loss, ETA, state)
    DIR/aggregated-model.progress.json    the aggregator's round state (waiting for k of n, averaging, aggregated)
    DIR/rounds/ledger.json                the rounds that landed, their test accuracy (the curve), outliers

Read only, never an error: a file that is absent, half-read or not JSON is skipped (every writer renames a
finished file into place, so a reader sees the old file or the new one). Standard library only.
"""

import glob
import json
import math
import os
import time

LIVE_FORMAT = "mlk-live/1"
STALE_SECONDS = 60.0  # a trainer whose file says "training" but has not changed for this long is "lost"
# (it writes at least once a second while its batches run; an epoch's augmentation takes a few seconds)
MAX_WORKERS = 1000  # progress files read at most (a volume with more is not this pipeline's)
MAX_FILE_BYTES = 64 * 1024  # a progress file (they are ~300 bytes)
MAX_LEDGER_BYTES = 16 * 1024 * 1024
WORKER_STATES = ("training", "done", "late", "lost", "flagged")
ROUND_STATES = ("waiting", "averaging", "aggregated", "scored", "failed")


def read_json(path, limit=MAX_FILE_BYTES):
    """The JSON object in path, or None (absent, over `limit` bytes, unreadable, not a JSON object)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            return None
        doc = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def number(value):
    """A finite int or float as itself, anything else None (the files are data, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not -2 ** 53 <= value <= 2 ** 53:
        return None
    return value


def integer(value):
    """A whole number (int, not bool, within 2**53) as itself, anything else None."""
    return value if isinstance(value, int) and number(value) is not None else None


def text(value, limit=200):
    return value[:limit] if isinstance(value, str) else None


def names(value):
    return [v[:200] for v in value if isinstance(v, str)][:MAX_WORKERS] if isinstance(value, list) else []


class LiveProgress:
    """snapshot() of the run under `root` (the volume: /mnt, or WORK_DIR locally)."""

    def __init__(self, root, clock=time.time):
        self.root = os.path.abspath(root)
        self.clock = clock

    def _ledger_rounds(self):
        doc = read_json(os.path.join(self.root, "rounds", "ledger.json"), MAX_LEDGER_BYTES)
        rounds = doc.get("rounds") if doc else None
        return [e for e in rounds if isinstance(e, dict) and integer(e.get("round")) is not None] \
            if isinstance(rounds, list) else []

    def workers(self, round_state, ledger):
        """Each trainer's progress, its state as the page shows it (WORKER_STATES)."""
        now = self.clock()
        paths = sorted(glob.glob(os.path.join(glob.escape(self.root), "model", "*.progress.json")))[:MAX_WORKERS]
        outliers = {}
        for entry in ledger:
            for w in entry.get("workers") if isinstance(entry.get("workers"), list) else []:
                if isinstance(w, dict) and w.get("outlier") is True and isinstance(w.get("file"), str):
                    outliers.setdefault(entry["round"], set()).add(w["file"])
        closed = round_state if round_state and round_state["state"] in ("aggregated", "scored") else None
        out = []
        for path in paths:
            if os.path.basename(path).startswith("."):
                continue
            doc = read_json(path)
            if doc is None or doc.get("kind") != "worker":
                continue
            worker = {"worker": text(doc.get("worker")) or os.path.basename(path).replace(".progress.json", ".h5")}
            for key in ("round", "epoch", "epochs", "step", "steps"):
                worker[key] = integer(doc.get(key))
            for key in ("loss", "eta_seconds", "elapsed_seconds", "updated_at"):
                worker[key] = number(doc.get(key))
            state = doc.get("state") if doc.get("state") in ("training", "done") else "training"
            updated = worker["updated_at"]
            quiet = updated is None or now - updated > STALE_SECONDS
            if closed and closed["round"] == worker["round"] and worker["worker"] in closed["missing"]:
                # left out of the round: still writing when it closed (late) or stopped before (lost)
                closed_at = closed.get("updated_at") or now
                state = "lost" if updated is None or closed_at - updated > STALE_SECONDS else "late"
            elif state == "training" and quiet:
                state = "lost"
            if worker["worker"] in outliers.get(worker["round"], ()):
                state = "flagged"
            worker["state"] = state
            out.append(worker)
        return out

    def round_state(self, ledger):
        doc = read_json(os.path.join(self.root, "aggregated-model.progress.json"))
        if doc is None or doc.get("kind") != "round" or doc.get("state") not in ROUND_STATES:
            return None
        state = {key: integer(doc.get(key)) for key in ("round", "present", "expected", "min_workers")}
        state["updated_at"] = number(doc.get("updated_at"))
        state.update(state=doc["state"], missing=names(doc.get("missing")), flagged=names(doc.get("flagged")),
                     dropped=names(doc.get("dropped")), error=text(doc.get("error"), 300))
        if state["state"] == "aggregated":
            entry = next((e for e in ledger if e["round"] == state["round"]), None)
            if entry is not None and number(entry.get("test_accuracy")) is not None:
                state["state"] = "scored"
        return state

    def snapshot(self, served=None):
        """The live state as /api/progress answers it (docs/CONTRACTS.md "Live progress"). served: the
        served model as {"id", "round"} or None."""
        ledger = self._ledger_rounds()
        round_state = self.round_state(ledger)
        workers = self.workers(round_state, ledger)
        rounds = [r for r in [w["round"] for w in workers] + [round_state and round_state["round"]]
                  if isinstance(r, int)]
        current = max(rounds, default=None)
        curve = [{"round": e["round"], "test_accuracy": number(e.get("test_accuracy")),
                  "round_seconds": number(e.get("round_seconds"))} for e in ledger]
        training = any(w["state"] == "training" for w in workers) or bool(
            round_state and round_state["state"] in ("waiting", "averaging"))
        if served is not None:
            phase = "serving"
        elif training:
            phase = "training"
        elif round_state and round_state["state"] == "failed":
            phase = "failed"
        elif workers or round_state:
            phase = "training"  # between stages: the next round's trainers or the first aggregate to come
        else:
            phase = "waiting"
        return {"format": LIVE_FORMAT, "phase": phase, "training": training, "round": current,
                "round_state": round_state, "workers": workers, "curve": curve, "served": served,
                "at": round(self.clock(), 3)}

    def live(self):
        """Whether a run is under way: a trainer writing (within STALE_SECONDS) or a round being waited for or
        averaged. /readyz answers "training" (200) only then, and only while no model file exists."""
        now = self.clock()
        ledger = []
        round_state = self.round_state(ledger)
        if round_state and round_state["state"] in ("waiting", "averaging") and round_state["updated_at"] is not None \
                and now - round_state["updated_at"] <= STALE_SECONDS:  # the aggregator rewrites it every poll
            return True
        return any(w["state"] == "training" for w in self.workers(None, ledger))


if __name__ == "__main__":  # scripts/live.py runs this file in a pod that mounts the volume: python - /mnt
    import sys

    print(json.dumps(LiveProgress(sys.argv[1] if len(sys.argv) > 1 else "/mnt").snapshot()))
