"""The server while training runs (issue 32): --progress-dir's files as /api/progress, the page's live card,
/readyz "training" only while a run is live and no model file exists; predictions 503 until a model is served."""

import json
import os
import shutil
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

import app as server_app  # noqa: E402
import progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def conforms(doc):
    """doc as /api/progress's 200 schema in docs/openapi.yaml describes it (its $refs resolved in the file)."""
    schema = SPEC["paths"]["/api/progress"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    root = {**schema, "components": SPEC["components"]}
    jsonschema.Draft202012Validator(root).validate(doc)
    return doc


def progress_of(client):
    return conforms(client.get("/api/progress").get_json())


def write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def worker(root, i, state="training", rnd=1, step=5, steps=20, age=0.0, loss=0.5):
    write(root / "model" / f"{i}-model.progress.json",
          {"format": "mlk-progress/1", "kind": "worker", "worker": f"{i}-model.h5", "round": rnd, "state": state,
           "epoch": 1, "epochs": 2, "step": step, "steps": steps, "loss": loss, "eta_seconds": 3.0,
           "elapsed_seconds": 1.0, "updated_at": time.time() - age})


def round_state(root, state, rnd=1, age=0.0, **fields):
    write(root / "aggregated-model.progress.json",
          {"format": "mlk-progress/1", "kind": "round", "round": rnd, "state": state, "expected": 3, "min_workers": 2,
           "present": 2, "updated_at": time.time() - age, **fields})


def client_for(root, progress_dir=True):
    return server_app.create_app(str(root / "aggregated-model.h5"), check_interval=0,
                                 progress_dir=str(root) if progress_dir else None).test_client()


def test_no_progress_dir_no_live_card_and_404(tmp_path):
    client = client_for(tmp_path, progress_dir=False)
    answer = client.get("/api/progress")
    assert answer.status_code == 404 and "progress-dir" in answer.get_json()["error"]
    assert 'id="live-card"' not in client.get("/").get_data(as_text=True)
    assert client.get("/readyz").status_code == 503  # as before


def test_before_the_first_aggregate_the_page_says_training_and_readyz_answers_training(tmp_path):
    client = client_for(tmp_path)
    # nothing written yet: not a run under way, so not ready
    assert client.get("/readyz").status_code == 503
    assert progress_of(client)["phase"] == "waiting"
    worker(tmp_path, 0)
    worker(tmp_path, 1, step=10)
    html = client.get("/").get_data(as_text=True)
    assert 'id="live-card"' in html and '<p id="live-status" class="live-status">training</p>' in html
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json() == {"status": "training", "model": None}
    sample = (ROOT / "samples" / "6.png").read_bytes()
    assert client.post("/api/predict", data=sample, content_type="image/png").status_code == 503  # no model yet
    live = client.get("/api/progress")
    assert live.headers["Cache-Control"] == "no-store"
    doc = conforms(live.get_json())
    assert doc["format"] == "mlk-live/1" and doc["phase"] == "training" and doc["training"] is True
    assert doc["round"] == 1 and doc["served"] is None and doc["curve"] == []
    assert [(w["worker"], w["state"], w["step"], w["steps"]) for w in doc["workers"]] == [
        ("0-model.h5", "training", 5, 20), ("1-model.h5", "training", 10, 20)]
    # a model file that exists but cannot be loaded: not ready, even while training (a rollout must not
    # replace a serving pod by one without its model)
    (tmp_path / "aggregated-model.h5").write_bytes(b"not a model")
    assert client.get("/readyz").status_code == 503
    os.unlink(tmp_path / "aggregated-model.h5")
    # trainers that stopped writing over a minute ago: no run under way any more
    worker(tmp_path, 0, age=progress.STALE_SECONDS + 5)
    worker(tmp_path, 1, state="done", step=20)
    assert client.get("/readyz").status_code == 503
    assert [w["state"] for w in progress_of(client)["workers"]] == ["lost", "done"]


def test_round_states_late_lost_flagged_and_the_curve(tmp_path):
    worker(tmp_path, 0, state="done", step=20)
    worker(tmp_path, 1, step=12)  # still writing when the round closed without it: late
    worker(tmp_path, 2, step=3, age=200)  # stopped long before: lost
    round_state(tmp_path, "waiting", present=1)
    client = client_for(tmp_path)
    doc = progress_of(client)
    assert doc["round_state"]["state"] == "waiting" and doc["round_state"]["present"] == 1
    assert client.get("/readyz").get_json()["status"] == "training"
    round_state(tmp_path, "aggregated", missing=["1-model.h5", "2-model.h5"], flagged=[], dropped=[])
    states = {w["worker"]: w["state"] for w in progress_of(client)["workers"]}
    assert states == {"0-model.h5": "done", "1-model.h5": "late", "2-model.h5": "lost"}
    ledger = {"format": "mlk-ledger/1", "rounds": [
        {"round": 1, "test_accuracy": 0.97, "round_seconds": 30.5,
         "workers": [{"file": "0-model.h5", "outlier": True}]}]}
    write(tmp_path / "rounds" / "ledger.json", ledger)
    doc = progress_of(client)
    assert doc["round_state"]["state"] == "scored"  # its ledger entry has a test accuracy
    assert doc["curve"] == [{"round": 1, "test_accuracy": 0.97, "round_seconds": 30.5}]
    assert {w["worker"]: w["state"] for w in doc["workers"]}["0-model.h5"] == "flagged"


@pytest.mark.parametrize("junk", [b"", b"{", b"[1, 2]", b'{"kind": "worker", "round": "x", "step": 1e999}',
                                  b"\xff\xfe", b"[" * 100000])
def test_damaged_progress_files_are_skipped_or_sanitised_never_an_error(tmp_path, junk):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "0-model.progress.json").write_bytes(junk)
    (tmp_path / "aggregated-model.progress.json").write_bytes(junk)
    (tmp_path / "rounds").mkdir()
    (tmp_path / "rounds" / "ledger.json").write_bytes(junk)
    answer = client_for(tmp_path).get("/api/progress")
    assert answer.status_code == 200
    doc = conforms(answer.get_json())
    for w in doc["workers"]:
        assert w["round"] is None and w["step"] is None  # not numbers: null
    assert doc["curve"] == [] and doc["round_state"] is None


def test_a_served_model_is_named_with_its_round(tmp_path, mnist_model):
    shutil.copyfile(mnist_model, tmp_path / "aggregated-model.h5")
    worker(tmp_path, 0, rnd=2)
    client = client_for(tmp_path)
    doc = progress_of(client)
    assert doc["phase"] == "serving" and doc["training"] is True and doc["round"] == 2
    assert doc["served"]["round"] == 1 and len(doc["served"]["model"]) == 12
    assert client.get("/readyz").get_json()["status"] == "ready"
