"""scripts/fetch-go.py: the pinned Go toolchain from a Go module proxy, verified and unpacked once, against
a small stand-in toolchain served over HTTP from this process (no network)."""

import hashlib
import http.server
import importlib.util
import io
import os
import threading
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch-go.py"
spec = importlib.util.spec_from_file_location("fetch_go", SCRIPT)
fetch_go = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_go)

PREFIX = f"golang.org/toolchain@v0.0.1-go{fetch_go.GO_VERSION}.linux-amd64/"


def toolchain_zip(extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        go = zipfile.ZipInfo(PREFIX + "bin/go")
        go.external_attr = 0o755 << 16
        z.writestr(go, "#!/bin/sh\necho go version go1.26.8 stand-in\n")
        z.writestr(PREFIX + "src/README", "sources\n")
        z.writestr("elsewhere/ignored", "not under the prefix\n")
        for name, text in extra:
            z.writestr(name, text)
    return buf.getvalue()


@pytest.fixture
def proxy():
    """A module proxy serving one file, with a count of requests; yields (url, set_body, hits)."""
    state = {"body": b"", "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["hits"] += 1
            if not self.path.endswith(f"/golang.org/toolchain/@v/v0.0.1-go{fetch_go.GO_VERSION}.linux-amd64.zip"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/proxy", state
    server.shutdown()


def pin(monkeypatch, body):
    monkeypatch.setitem(fetch_go.SHA256, "amd64", hashlib.sha256(body).hexdigest())


def test_fetches_verifies_unpacks_once_and_prints_go(proxy, monkeypatch, tmp_path, capsys):
    url, state = proxy
    state["body"] = toolchain_zip()
    pin(monkeypatch, state["body"])
    argv = ["--dest", str(tmp_path / "go"), "--proxy", url, "--machine", "x86_64"]
    assert fetch_go.main(argv) == 0
    go = Path(capsys.readouterr().out.strip())
    assert go == tmp_path / "go" / f"go{fetch_go.GO_VERSION}.linux-amd64" / "bin" / "go"
    assert os.access(go, os.X_OK) and (go.parent.parent / "src" / "README").read_text() == "sources\n"
    assert not (go.parent.parent / "elsewhere").exists()
    assert [p.name for p in (tmp_path / "go").iterdir()] == [go.parent.parent.name]  # no temporary left
    assert fetch_go.main(argv) == 0 and state["hits"] == 1  # the second call downloads nothing
    assert Path(capsys.readouterr().out.strip()) == go


@pytest.mark.parametrize("case, code, message", [
    ("checksum", 2, "expected"),
    ("unsafe", 2, "unsafe path in the archive"),
    ("no go", 2, "no bin/go in the archive"),
    ("not a zip", 2, "not a zip archive"),
    ("network", 1, "cannot download"),
    ("machine", 2, "no Go toolchain pinned for machine 'riscv64'"),
])
def test_refuses_with_one_line_and_leaves_nothing(case, code, message, proxy, monkeypatch, tmp_path, capsys):
    url, state = proxy
    state["body"] = {"unsafe": toolchain_zip([(PREFIX + "../../escape", "x")]),
                     "not a zip": b"PK\x03\x04 not a zip"}.get(case, toolchain_zip())
    if case == "no go":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(PREFIX + "src/README", "sources\n")
        state["body"] = buf.getvalue()
    pin(monkeypatch, state["body"])
    if case == "checksum":
        monkeypatch.setitem(fetch_go.SHA256, "amd64", "0" * 64)
    argv = ["--dest", str(tmp_path / "go"), "--proxy", url if case != "network" else "http://127.0.0.1:9/none",
            "--machine", "riscv64" if case == "machine" else "x86_64"]
    assert fetch_go.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fetch-go.py: error:") and message in err, err
    assert not (tmp_path / "go").exists() or list((tmp_path / "go").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_the_pins_are_both_architectures():
    assert set(fetch_go.SHA256) == {"amd64", "arm64"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in fetch_go.SHA256.values())
