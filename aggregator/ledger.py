"""The round ledger, ROOT/rounds/ledger.json: what each round averaged, and exact resume from it.

    python ledger.py verify  --dir ROOT   # check every recorded sha256; last line JSON {"last_round": n, "sha256": hex}
    python ledger.py restore --dir ROOT   # verify, then copy rounds/r{n}.h5 to ROOT/aggregated-model.h5

ROOT is the folder of the aggregated model (/mnt on Kubernetes, work/ locally). The aggregator writes one
entry per round (aggregator.py); the accuracy test (trainer/evaluate.py --ledger) fills in the accuracies.
The format is in docs/CONTRACTS.md, "Round ledger". numpy/h5py/standard library only (aggregator image).
"""

import json
import shutil
import sys
from pathlib import Path

from mlkcommon import (LEDGER_FORMAT, LedgerFormatError, Parser, atomic_path, error, parse_args, read_ledger,
                       sha256_file, utc_iso, write_bytes_atomic)

PROG = "ledger.py"
FORMAT = LEDGER_FORMAT
ROUNDS_DIR = "rounds"
LEDGER_NAME = "ledger.json"
AGGREGATE_NAME = "aggregated-model.h5"


class LedgerError(Exception):
    """A ledger that cannot be used (unreadable, or its hashes no longer match the files): one line, exit 2."""


def ledger_path(root):
    return Path(root) / ROUNDS_DIR / LEDGER_NAME


def round_file(n):
    """The ledger's name (relative to ROOT) of round n's aggregate; r0.h5 is round 1's starting weights."""
    return f"{ROUNDS_DIR}/r{n}.h5"


def state_file(n):
    """The ledger's name (relative to ROOT) of the server optimiser's state after round n (aggregator.py
    --server-optimizer), read back by round n+1."""
    return f"{ROUNDS_DIR}/r{n}-opt.npz"


def iso(unix_time):
    """Unix time -> 'YYYY-MM-DDTHH:MM:SSZ' (UTC), None stays None."""
    if unix_time is None:
        return None
    return utc_iso(unix_time)


def empty():
    return {"format": FORMAT, "rounds": []}


def load(root):
    """The ledger of ROOT as a dict ({"format", "rounds": [...]}); an empty one when there is none yet."""
    path = ledger_path(root)
    try:
        return read_ledger(path)
    except FileNotFoundError:
        return empty()
    except LedgerFormatError as err:
        raise LedgerError(f"{path}: {err}") from None


def save(root, ledger):
    """Write the ledger atomically (a temporary file beside it, then rename): readers and a kill mid-write
    see the old ledger or the new one, never half of one."""
    path = ledger_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(ledger, indent=1) + "\n").encode())


def recorded_files(entry):
    """(relative file name, sha256) of every file a round entry records: start, aggregate, the server optimiser's
    state (with --server-optimizer), kept worker copies."""
    found = []
    for key in ("start", "aggregate"):
        item = entry.get(key)
        if item:
            found.append((item.get("file"), item.get("sha256")))
    optimizer = entry.get("server_optimizer")
    if optimizer:
        state = optimizer.get("state") if isinstance(optimizer, dict) else None
        state = state if isinstance(state, dict) else {}
        found.append((state.get("file"), state.get("sha256")))
    for worker in entry.get("workers") or []:
        if worker.get("kept"):
            found.append((worker["kept"], worker.get("sha256")))
    return found


def verify(root):
    """Check the ledger of ROOT against the files: rounds numbered 1..n, every recorded sha256 equal to its
    file's. Returns (n, sha256 of rounds/r{n}.h5) for the last complete round, (0, None) without rounds.
    Raises LedgerError naming the first file that is missing or differs."""
    root = Path(root)
    ledger = load(root)
    rounds = ledger["rounds"]
    for k, entry in enumerate(rounds, start=1):
        if not isinstance(entry, dict) or entry.get("round") != k:
            raise LedgerError(f"{ledger_path(root)}: entry {k} is not round {k} (rounds must be 1, 2, ... in order)")
        if not entry.get("aggregate"):
            raise LedgerError(f"{ledger_path(root)}: round {k} records no aggregate")
        for name, digest in recorded_files(entry):
            if not name or not digest:
                raise LedgerError(f"{ledger_path(root)}: round {k} has a file entry without a name or sha256")
            path = root / name
            if not path.is_file():
                raise LedgerError(f"{path}: recorded in the ledger (round {k}) but missing; refusing to resume")
            if sha256_file(path) != digest:
                raise LedgerError(f"{path}: sha256 differs from the ledger's (round {k}): the file was changed "
                                  "or replaced; refusing to resume")
    if not rounds:
        return 0, None
    return len(rounds), rounds[-1]["aggregate"]["sha256"]


def restore(root):
    """verify(), then copy the last complete round's aggregate onto ROOT/aggregated-model.h5 (atomically),
    so the next round's trainers start from it. Returns what verify() returns. A server optimiser's state
    (rounds/r{n}-opt.npz, verified with the rest) stays where it is: the aggregator reads round n+1's from the
    ledger's entry n, so a resumed run continues exactly."""
    n, digest = verify(root)
    if n:
        with atomic_path(Path(root) / AGGREGATE_NAME) as tmp:
            shutil.copyfile(Path(root) / round_file(n), tmp)
    return n, digest


def build_parser():
    p = Parser(prog=PROG, description="Verify the round ledger, or restore the last complete round from it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{verify,restore}")
    for name, text in (("verify", "check every recorded sha256 against the files"),
                       ("restore", "verify, then copy rounds/r{n}.h5 to ROOT/aggregated-model.h5")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--dir", required=True, help="ROOT: the folder of aggregated-model.h5 and rounds/")
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    root = Path(args.dir)
    try:
        if not root.is_dir():
            raise LedgerError(f"--dir {root} is not a directory")
        n, digest = (restore if args.command == "restore" else verify)(root)
    except LedgerError as e:
        return error(PROG, e)
    if args.command == "restore" and n:
        print(f"{PROG}: restored round {n}: {root / round_file(n)} -> {root / AGGREGATE_NAME}", flush=True)
    elif n:
        print(f"{PROG}: {n} complete round(s), every sha256 matches", flush=True)
    print(json.dumps({"last_round": n, "sha256": digest}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
