"""schemathesis, driven by docs/openapi.yaml, against the live serving stack (server/server.py: nginx in front
of gunicorn), with all its checks: no 5xx, and every answer (the app's and nginx's own) conforms to the file."""

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import helpers
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_slow_clients import start_server, stop_server

OPENAPI = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
# Bodies that must be image files: the schema cannot say "a file Pillow decodes", so schemathesis' random bytes
# are schema-valid yet rightly refused (400/413/415, checked against the schema like every answer); the
# success path of these routes is tested with real images in test_server.py and test_slow_clients.py.
IMAGE_BODIES = {("POST", "/api/predict"), ("POST", "/upload")}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi")
    model = folder / "model.h5"
    helpers.tiny_model(7).save(model)
    (folder / "model").mkdir()  # a trainer's live progress, so /api/progress answers 200 (docs/CONTRACTS.md)
    (folder / "model" / "0-model.progress.json").write_text(
        '{"format": "mlk-progress/1", "kind": "worker", "worker": "0-model.h5", "round": 1, "state": "done", '
        '"epoch": 1, "epochs": 1, "step": 10, "steps": 10, "loss": 0.5, "eta_seconds": 0, "updated_at": 1}')
    proc, port = start_server(model, folder / "server.log", "--progress-dir", str(folder))
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


schema = schemathesis.openapi.from_path(OPENAPI)


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_live_server_conforms_to_openapi(case, live_server):
    excluded = [positive_data_acceptance] if (case.method, case.path) in IMAGE_BODIES else []
    case.call_and_validate(base_url=live_server, timeout=30, excluded_checks=excluded)
