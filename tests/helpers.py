"""Small helpers several test files share (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import socket

import h5py


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlk_attrs(path):
    """The project's `mlk_*` root attributes of an .h5 model, strings decoded."""
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items() if k.startswith("mlk_")}
