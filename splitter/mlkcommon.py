# GENERATED from common/mlkcommon.py by scripts/sync-common.sh: edit that file, then run the script.
"""Code the stage programs share: the command line, atomic writes, sha256 of a file, the init-weight
fingerprint, mlk_* attributes,
the UTC time stamps of the ledger, the gate and /api/model.

The one source is common/mlkcommon.py. Every stage folder is its own image build context and imports
nothing from another folder (docs/CONTRACTS.md), so scripts/sync-common.sh copies this file into each
stage folder that uses it as <stage>/mlkcommon.py, and the programs `from mlkcommon import ...` their
local copy; tests/test_common.py fails when a copy differs from this file.

Standard library only at import time: the aggregator's image has no TensorFlow, the splitter's no h5py,
and a usage error is reported before anything slow is imported. h5py is imported inside the functions
that open .h5 files.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

MLK_PREFIX = "mlk_"
LEDGER_FORMAT = "mlk-ledger/1"  # ROOT/rounds/ledger.json (docs/CONTRACTS.md "Round ledger")
JSON_ATTRS = ("mlk_inputs",)  # mlk_* attributes stored as JSON text (docs/CONTRACTS.md)


# --- the round ledger ------------------------------------------------------------------------------

class LedgerFormatError(ValueError):
    """A ledger file that is not JSON or not an mlk-ledger/1 ledger; the message says why, in one line."""


def read_ledger(path):
    """ROOT/rounds/ledger.json parsed and checked: {"format": LEDGER_FORMAT, "rounds": [objects with an
    integer "round"], ...}. Raises FileNotFoundError when it is absent, LedgerFormatError otherwise.
    The aggregator writes it; the accuracy stage fills it in; the server shows it."""
    try:
        with open(path, "rb") as f:
            ledger = json.loads(f.read())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LedgerFormatError(f"not a readable JSON ledger ({one_line(str(err))})") from None
    if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
        raise LedgerFormatError(f"not a round ledger (expected \"format\": \"{LEDGER_FORMAT}\")")
    rounds = ledger.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in rounds):
        raise LedgerFormatError("\"rounds\" must be a list of objects with an integer \"round\"")
    return ledger


# --- time ----------------------------------------------------------------------------------------

def utc_iso(unix_time=None):
    """A unix time (default: now) as 'YYYY-MM-DDTHH:MM:SSZ', UTC: every time stamp the programs write."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if unix_time is None else unix_time))


# --- command line ------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr, `PROG: error: ...`, and exit code 2
    (a retry would fail the same way); -h/--help still prints the full usage and exits 0."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def parse_args(parser, argv=None):
    """parser.parse_args(argv); a usage error or -h/--help returns its exit code (an int: 2 or 0)
    instead of raising SystemExit, so `main(argv) -> int` can return it:

        args = parse_args(build_parser(), argv)
        if isinstance(args, int):
            return args
    """
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)


def int_at_least(minimum):
    """argparse type: an integer >= minimum, else the usage error `argument --x: must be >= ...`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def one_line(message):
    """message with its lines joined: what a program prints on stderr is always a single line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def error(prog, message, code=2):
    """Print `prog: error: message` as one line on stderr and return code (`return error(...)`)."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


# --- files -------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path` for the caller to write (with any writer: open, np.savez,
    h5py, Keras' model.save, a download); when the block ends without an exception the file is renamed
    onto `path` in one step (os.replace), else removed. Readers therefore see the old file or the new
    one, never half of one. The name is hidden and fresh, `.NAME-RANDOM` + suffix (readers skip dot
    files and *.tmp); pass suffix=".h5" for a writer that goes by the extension (Keras)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}-{secrets.token_hex(6)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path, data):
    """Write bytes to path through atomic_path (temporary name in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)


RUN_MARKER = "run-id"  # SAVEDIR/run-id: the splitter's last write, naming the run whose shards SAVEDIR holds


def wait_until(ready, seconds, what, why="", prefix="", poll=0.5, report_every=30.0):
    """Call ready() until it is true or `seconds` have passed, for a program waiting on another stage's file.
    Prints "PREFIXwaiting up to Ss for WHAT WHY" once, "PREFIXstill waiting for WHAT (Ns)" every report_every
    seconds and "PREFIXWHAT is there after N.Ns" at the end. Returns the seconds waited (0.0, printing nothing,
    when ready() is true at once), or None once `seconds` have passed (the caller says what that means)."""
    if ready():
        return 0.0
    print(f"{prefix}waiting up to {seconds:g}s for {what}{' ' + why if why else ''}", flush=True)
    started = reported = time.monotonic()
    while not ready():
        now = time.monotonic()
        if now - started >= seconds:
            return None
        if now - reported >= report_every:
            print(f"{prefix}still waiting for {what} ({now - started:.0f}s)", flush=True)
            reported = now
        time.sleep(min(poll, max(seconds - (now - started), 0.01)))
    waited = time.monotonic() - started
    print(f"{prefix}{what} is there after {waited:.1f}s", flush=True)
    return waited


def run_id_problem(run_id):
    """What is wrong with a --run-id value (a message for the flag), or None: 1-64 letters, digits, '.', '_'
    or '-', not starting with a punctuation mark (it is a file's content and a manifest's argument)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", run_id):
        return None
    return f"--run-id must be 1-64 letters, digits, '.', '_' or '-' (a letter or digit first), got {run_id!r}"


def read_run_id(savedir):
    """The run id the splitter last wrote into `savedir` (splitter.py --run-id), or None: no marker (no
    split finished since, or one without --run-id), or the volume unreachable for the moment."""
    try:
        return (Path(savedir) / RUN_MARKER).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def sha256_file(path):
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(arrays):
    """The init fingerprint of a weight list (docs/CONTRACTS.md): sha256 hex over each array's shape as text
    ("3x3x1x32;") and its float32 little-endian bytes, in Keras' get_weights() order. The trainer records it
    (mlk_init_fingerprint); the aggregator checks a round's starting weights against it."""
    import numpy as np  # here: the splitter's image has numpy, but this module imports nothing at load

    digest = hashlib.sha256()
    for array in arrays:
        array = np.asarray(array)
        digest.update(("x".join(str(d) for d in array.shape) + ";").encode())
        digest.update(array.astype("<f4").tobytes())
    return digest.hexdigest()


# --- mlk_* attributes of the .h5 models (docs/CONTRACTS.md) --------------------------------------

def attr_value(value):
    """An HDF5 attribute as a plain Python value: bytes decoded, numpy scalars to int/float/str."""
    if isinstance(value, bytes):
        return value.decode()
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
        return value.decode() if isinstance(value, bytes) else value
    return value


@contextlib.contextmanager
def _h5(source, mode):
    """An open h5py File/Group as it is, or a path opened in mode (and closed afterwards)."""
    if hasattr(source, "attrs"):
        yield source
        return
    import h5py

    with h5py.File(source, mode) as f:
        yield f


def read_mlk_attrs(source):
    """The root mlk_* attributes of an .h5 file (a path or an open h5py File) as plain Python values;
    JSON ones (mlk_inputs) decoded, left as text if they do not parse. {} when there are none."""
    with _h5(source, "r") as f:
        out = {}
        for key, value in f.attrs.items():
            if not key.startswith(MLK_PREFIX):
                continue
            value = attr_value(value)
            if key in JSON_ATTRS and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
            out[key] = value
        return out


def write_mlk_attrs(target, attrs, replace=False):
    """Set root mlk_* attributes of an .h5 file (a path, opened r+, or an open h5py File); lists and
    dicts are stored as JSON text. replace=True first deletes every mlk_* attribute already there."""
    bad = [key for key in attrs if not key.startswith(MLK_PREFIX)]
    if bad:
        raise ValueError(f"not mlk_* attributes: {', '.join(bad)}")
    with _h5(target, "r+") as f:
        if replace:
            for key in [k for k in f.attrs if k.startswith(MLK_PREFIX)]:
                del f.attrs[key]
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value


# --- live progress (docs/CONTRACTS.md "Live progress") -------------------------------------------

PROGRESS_FORMAT = "mlk-progress/1"
PROGRESS_SUFFIX = ".progress.json"  # beside the stage's output: model/0-model.h5 -> model/0-model.progress.json
PROGRESS_INTERVAL = 1.0  # seconds: a stage rewrites its progress file at most this often


def progress_path(output):
    """The progress file of a stage writing `output` (an .h5): the same name with .progress.json."""
    output = str(output)
    return (output[:-3] if output.endswith(".h5") else output) + PROGRESS_SUFFIX


def write_progress(path, doc):
    """Write a progress document (a dict; "format" and "updated_at" are added) atomically. Progress is a view,
    never a reason to fail: an OSError (a full or read-only volume) is returned, not raised."""
    doc = {"format": PROGRESS_FORMAT, **doc, "updated_at": round(time.time(), 3)}
    try:
        write_bytes_atomic(path, (json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n").encode())
    except (OSError, ValueError) as err:
        return err
    return None
