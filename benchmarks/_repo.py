"""The repository's modules for the benchmarks: each benchmark's first import (`import _repo`).

The benchmarks run as scripts (`.venv/bin/python benchmarks/benchmark-server.py ...`), so pytest.ini's
pythonpath does not reach them; their own folder is sys.path[0], so this module is found. Importing it puts
on sys.path, once and in front of site-packages as pytest does: common/ (mlkcommon, the one source of the
stages' command line), the stage folders pytest.ini lists (splitter, trainer, aggregator, server: `import
trainer`, `import preprocess`, `from app import create_app`) and tests/ (`from helpers import mnist_path`).
load() imports a file whose name is not a module name (scripts/make-samples.py, benchmarks/benchmark-*.py).
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "splitter", "trainer", "aggregator", "server", "tests")  # common/ first: the source

_missing = [str(ROOT / folder) for folder in FOLDERS if str(ROOT / folder) not in sys.path]
sys.path[1:1] = _missing  # after sys.path[0], this folder (or the caller's, when imported from elsewhere)


def load(path):
    """The module of the file ROOT/path (e.g. "scripts/make-samples.py"), executed once per process."""
    name = "mlk_" + Path(path).stem.replace("-", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
