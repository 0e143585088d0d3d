"""The round ledger on the server (issues 11 and 13): /api/model and the page show the served model's
round and its ledger entry (matched by the aggregate's sha256) with its accuracy; /api/history and
/history.png serve ROOT/rounds/ledger.json and the plot; an absent or malformed ledger shows nothing
and is never an error (a malformed one is logged once)."""

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import app as server_app  # noqa: E402


def entry(n, sha, accuracy=None):
    return {"round": n, "aggregate": {"file": f"rounds/r{n}.h5", "sha256": sha},
            "start": {"file": f"rounds/r{n - 1}.h5", "sha256": "0" * 64},
            "expected_workers": 3, "min_workers": 2, "missing": 1,
            "workers": [{"file": "0-model.h5", "kept": f"rounds/r{n}/0-model.h5", "sha256": "1" * 64, "samples": 20000,
                         "outlier": False, "dropped": False, "accuracy": 0.98},
                        {"file": "1-model.h5", "kept": f"rounds/r{n}/1-model.h5", "sha256": "2" * 64, "samples": 20000,
                         "outlier": True, "dropped": True, "accuracy": 0.11}],
            "outlier_rule": "cosine to the others' mean update below 0.5", "samples": 40000,
            "started_at": "2026-11-29T18:00:00Z", "aggregated_at": "2026-11-29T18:00:40Z", "round_seconds": 40.2,
            "aggregate_seconds": 0.4, "test_accuracy": accuracy, "test_loss": None if accuracy is None else 0.04,
            "evaluated_at": None}


def write_ledger(root, rounds):
    rounds_dir = root / "rounds"
    rounds_dir.mkdir(exist_ok=True)
    tmp = rounds_dir / ".ledger.json.tmp"
    tmp.write_text(json.dumps({"format": "mlk-ledger/1", "rounds": rounds}))
    os.replace(tmp, rounds_dir / "ledger.json")


def write_plot(root):
    out = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(out, "PNG")
    (root / "rounds" / "history.png").write_bytes(out.getvalue())
    return out.getvalue()


@pytest.fixture()
def served(tmp_path, mnist_model):
    """(ROOT, sha256): ROOT/aggregated-model.h5, the model the server serves."""
    shutil.copyfile(mnist_model, tmp_path / "aggregated-model.h5")
    return tmp_path, hashlib.sha256(mnist_model.read_bytes()).hexdigest()


def client_for(root):
    return server_app.create_app(str(root / "aggregated-model.h5"), check_interval=0).test_client()


def test_api_model_and_page_show_the_served_round(served):
    root, sha = served
    write_ledger(root, [entry(1, "a" * 64, 0.95), entry(2, sha, 0.987), entry(3, "b" * 64)])
    png = write_plot(root)
    client = client_for(root)
    info = client.get("/api/model").get_json()
    assert info["ledger"]["round"] == 2
    assert info["ledger"]["entry"] == entry(2, sha, 0.987)
    assert info["ledger"]["history"] == "/api/history" and info["ledger"]["plot"] == "/history.png"
    assert info["ledger"]["aggregation"] == "fedavg"  # the entry records no rule: the default
    history = client.get("/api/history").get_json()
    assert history["format"] == "mlk-ledger/1" and [r["round"] for r in history["rounds"]] == [1, 2, 3]
    plot = client.get("/history.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png" and plot.data == png

    html = client.get("/").get_data(as_text=True)
    assert 'id="history-card"' in html and "Serving round 2: test accuracy 0.9870" in html
    assert ('<span id="served-workers">0-model.h5 (accuracy 0.9800); 1-model.h5 (accuracy 0.1100, outlier, '
            'dropped)</span>') in html
    rows = html.split('<table class="history" id="history">')[1].split("</table>")[0].split("<tr")[2:]
    assert len(rows) == 3
    assert rows[1].startswith(' class="served"') and "<td>2</td><td>1 of 3</td><td>40000</td><td>0.9870</td><td>40.2</td>" in rows[1]
    assert "served" not in rows[0] and "served" not in rows[2]
    assert "<td>3</td><td>1 of 3</td><td>40000</td><td></td>" in rows[2]  # not evaluated yet: blank
    assert 'href="/api/history"' in html and 'src="/history.png"' in html


def test_served_model_not_in_the_ledger(served):
    root, _ = served
    write_ledger(root, [entry(1, "a" * 64, 0.95)])
    client = client_for(root)
    info = client.get("/api/model").get_json()
    assert info["ledger"] == {"round": None, "entry": None, "aggregation": None, "history": "/api/history",
                              "plot": None}
    html = client.get("/").get_data(as_text=True)
    assert 'id="history-card"' in html and "Serving round" not in html and 'class="served"' not in html
    assert client.get("/history.png").status_code == 404


def test_no_ledger_shows_nothing(served):
    root, _ = served
    client = client_for(root)
    info = client.get("/api/model").get_json()
    assert info["ledger"] == {"round": None, "entry": None, "aggregation": None, "history": None, "plot": None}
    assert info["sha256"] and info["round"] == 1  # the model's own attributes as before
    missing = client.get("/api/history")
    assert missing.status_code == 404 and "no training history" in missing.get_json()["error"]
    assert client.get("/history.png").status_code == 404 and client.get("/history.png").is_json
    page = client.get("/")
    assert page.status_code == 200 and 'id="history-card"' not in page.get_data(as_text=True)


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", json.dumps({"format": "other/1", "rounds": []}).encode(),
    json.dumps({"format": "mlk-ledger/1", "rounds": {"1": {}}}).encode(),
    json.dumps({"format": "mlk-ledger/1", "rounds": [{"round": "one"}]}).encode(),
    b"\xff\xfe binary",
], ids=["truncated", "array", "other format", "rounds not a list", "round not an int", "not utf-8"])
def test_malformed_ledger_is_logged_once_and_shows_nothing(served, content, caplog):
    root, _ = served
    (root / "rounds").mkdir()
    (root / "rounds" / "ledger.json").write_bytes(content)
    write_plot(root)
    client = client_for(root)
    with caplog.at_level(logging.ERROR, logger="mlk.server"):
        for _ in range(3):
            assert client.get("/api/model").get_json()["ledger"] == {
                "round": None, "entry": None, "aggregation": None, "history": None, "plot": None}
            assert client.get("/").status_code == 200
            assert client.get("/api/history").status_code == 404
    assert len([r for r in caplog.records if "ignoring the round ledger" in r.getMessage()]) == 1


def test_odd_values_in_a_valid_ledger_do_not_break_the_page(served):
    root, sha = served
    odd = entry(1, sha, "high")
    odd.update(workers="three", samples=None, round_seconds=[1], aggregate={"sha256": sha, "file": 5},
               expected_workers="3")
    write_ledger(root, [odd, {"round": 2}])
    client = client_for(root)
    assert client.get("/api/model").get_json()["ledger"]["round"] == 1
    html = client.get("/").get_data(as_text=True)
    assert "<td>1</td><td>0</td><td></td><td></td><td></td>" in html and "<td>2</td>" in html
    assert "Serving round 1." in html and "served-workers" not in html


def test_ledger_rewritten_is_read_again(served):
    root, sha = served
    write_ledger(root, [entry(1, "a" * 64)])
    client = client_for(root)
    assert client.get("/api/model").get_json()["ledger"]["round"] is None
    write_ledger(root, [entry(1, "a" * 64), entry(2, sha, 0.99)])
    info = client.get("/api/model").get_json()
    assert info["ledger"]["round"] == 2 and info["ledger"]["entry"]["test_accuracy"] == 0.99


def test_a_ledger_with_nan_infinity_or_huge_numbers_breaks_nothing(served):
    """Python's json reads NaN, Infinity and 400-digit integers: the page, /upload, /api/history and /api/model
    still answer (those values as null: standard JSON), where "%.4f" of them was a 500."""
    root, sha = served
    rounds_dir = root / "rounds"
    rounds_dir.mkdir()
    huge = "9" * 400
    (rounds_dir / "ledger.json").write_text(
        '{"format": "mlk-ledger/1", "rounds": [{"round": 1, "aggregate": {"sha256": "%s"}, "samples": NaN, '
        '"test_accuracy": NaN, "round_seconds": Infinity, "expected_workers": %s, "workers": [{"file": "0-model.h5", '
        '"accuracy": -Infinity}]}, {"round": 2, "samples": %s, "test_accuracy": %s, "round_seconds": 1e999}]}'
        % (sha, huge, huge, huge))
    client = client_for(root)
    page = client.get("/")
    assert page.status_code == 200 and "Serving round 1" in page.get_data(as_text=True)
    upload = client.post("/upload", data=(ROOT / "server/static/samples/6.png").read_bytes(), content_type="image/png")
    assert upload.status_code == 200
    history = client.get("/api/history")
    assert history.status_code == 200
    text = history.get_data(as_text=True)
    assert "NaN" not in text and "Infinity" not in text and huge not in text
    first, second = json.loads(text)["rounds"]
    assert first["samples"] is None and first["test_accuracy"] is None and first["workers"][0]["accuracy"] is None
    assert second["samples"] is None and second["round_seconds"] is None
    info = client.get("/api/model")
    assert info.status_code == 200 and info.get_json()["ledger"]["round"] == 1 and "NaN" not in info.get_data(as_text=True)


def test_history_errors_name_no_path(served):
    root, _ = served
    client = client_for(root)
    for path in ("/api/history", "/history.png"):
        error = client.get(path).get_json()["error"]
        assert str(root) not in error and "/" not in error.replace("/api/", "")


def test_each_rounds_aggregation_rule_shows_in_api_model_and_on_the_page(served):
    """The ledger's "aggregation" and "server_optimizer" records (aggregator --aggregation, --server-optimizer) read
    as one short string per round; a hostile value in them shows as "?" or not at all."""
    root, sha = served
    rounds = [entry(1, "a" * 64, 0.95), entry(2, "c" * 64, 0.96), entry(3, sha, 0.97), entry(4, "b" * 64)]
    rounds[1]["aggregation"] = {"rule": "trimmed-mean", "beta": 0.2, "trimmed": 1}
    rounds[2]["aggregation"] = {"rule": "krum", "f": 1, "m": 2, "selected": ["0-model.h5", "2-model.h5"]}
    rounds[2]["server_optimizer"] = {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9, "state": {}}
    rounds[3]["aggregation"] = {"rule": "<script>", "beta": "x"}
    write_ledger(root, rounds)
    client = client_for(root)
    info = client.get("/api/model").get_json()
    assert info["ledger"]["round"] == 3
    assert info["ledger"]["aggregation"] == "krum (f 1, m 2) + fedavgm (server_lr 1, momentum 0.9)"
    html = client.get("/").get_data(as_text=True)
    assert "<th>aggregation</th>" in html
    rows = html.split('<table class="history" id="history">')[1].split("</table>")[0].split("<tr")[2:]
    cells = [row.split("<td>")[-1].split("</td>")[0] for row in rows]
    assert cells == ["fedavg", "trimmed-mean (beta 0.2)", "krum (f 1, m 2) + fedavgm (server_lr 1, momentum 0.9)", "?"]
    assert "<script>" not in html.split('id="history"')[1].split("</table>")[0]
