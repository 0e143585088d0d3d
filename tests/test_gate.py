"""The promotion gate (server/gate.py, hooked into model.py's hot reload, flags in server.py): a worse
model dropped onto the served path is rejected (label-shuffled: ~0.1 accuracy), a better one promoted;
decisions, accuracies and sha256s in /api/model and /metrics; a rejected file is not retried until it
changes; without --gate-data every file is served as before. With --gate-state the admitted model is kept
on disk: a restarted worker or a second replica serves it, never a file the gate rejected."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
import app as server_app  # noqa: E402

INTERNAL = {server_app.INTERNAL_HEADER: "1"}


def internal_client(app):
    """A test client whose requests carry the internal header (as nginx's internal port sets it): /metrics and
    the gate's full record in /api/model (its data path, state, reasons)."""
    client = app.test_client()
    client.environ_base["HTTP_X_MLK_INTERNAL"] = "1"
    return client
import gate as gate_module  # noqa: E402
import server  # noqa: E402

GATE_IMAGES = 2000  # of the MNIST test set: enough to tell 0.1 from 0.9, and fast


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory, mnist_npz):
    """{"weak": trained on 300 digits (1 epoch), "shuffled": trained on 3000 digits with shuffled labels}."""
    work = tmp_path_factory.mktemp("gate-models")
    with np.load(mnist_npz) as npz:
        x, y = npz["x_train"], npz["y_train"]
    np.savez(work / "weak.npz", x=x[20000:20300], y=y[20000:20300])
    np.savez(work / "shuffled.npz", x=x[30000:33000], y=np.random.default_rng(1).permutation(y[30000:33000]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "trainer/trainer.py"), "--data", str(work / f"{name}.npz"),
                                     "--epoch", "1", "--batch", "32", "--threads", "1",
                                     "--savemodel", str(work / f"{name}.h5")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for name in ("weak", "shuffled")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"training {name}: {out.decode()[-2000:]}"
    return {name: work / f"{name}.h5" for name in procs}


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory, mnist_test):
    x, y = mnist_test
    path = tmp_path_factory.mktemp("gate-data") / "test.npz"
    np.savez(path, x=x[:GATE_IMAGES], y=y[:GATE_IMAGES])
    return path


def drop(src, dst):
    """Replace dst by a copy of src the way the aggregator does (temp file, then rename)."""
    tmp = Path(str(dst) + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def metric(client, name):
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_shuffled_model_rejected_better_model_promoted(tmp_path, models, mnist_model, gate_data):
    served = tmp_path / "aggregated-model.h5"
    shutil.copyfile(models["weak"], served)
    app = server_app.create_app(str(served), check_interval=0, gate_data=str(gate_data))
    client = internal_client(app)

    info = client.get("/api/model").get_json()
    assert info["sha256"] == sha256(models["weak"])
    gate = info["gate"]
    assert gate["epsilon"] == gate_module.DEFAULT_EPSILON and gate["data"] == str(gate_data)
    assert gate["last_decision"]["decision"] == "initial" and gate["promotions"] == 0 and gate["rejections"] == 0
    weak_accuracy = gate["served_accuracy"]
    assert 0.15 < weak_accuracy < 0.95

    # a label-shuffled model: scores ~0.1, rejected; the weak model keeps serving, ready all along
    drop(models["shuffled"], served)
    for path in ("/readyz", "/v2/health/ready", "/v2/models/mnist/ready"):  # answer at once: never load or judge
        assert client.get(path).status_code == 200
    assert app.extensions["mlk_gate"].last_decision["decision"] == "initial"
    info = client.get("/api/model").get_json()
    assert info["sha256"] == sha256(models["weak"])
    decision = info["gate"]["last_decision"]
    assert decision["decision"] == "rejected"
    assert decision["candidate"]["sha256"] == sha256(models["shuffled"]) and decision["candidate"]["accuracy"] < 0.2
    assert decision["current"] == {"sha256": sha256(models["weak"]), "accuracy": weak_accuracy}
    assert info["gate"]["rejections"] == 1 and info["gate"]["promotions"] == 0
    # a visitor (no internal header) gets the decision in summary: no evaluation-set path, state or reason
    public = app.test_client().get("/api/model")
    gate = public.get_json()["gate"]
    assert str(tmp_path) not in public.get_data(as_text=True) and "reason" not in gate["last_decision"]
    assert not {"data", "state", "state_error"} & set(gate) and gate["rejections"] == 1
    assert gate["last_decision"] == {key: decision[key] for key in ("at", "decision", "candidate", "current", "seconds")}
    assert client.get("/readyz").status_code == 200 and client.get("/v2/health/ready").status_code == 200
    assert metric(client, "mlk_gate_rejections") == 1 and metric(client, "mlk_gate_promotions") == 0
    assert metric(client, "mlk_gate_candidate_accuracy") == decision["candidate"]["accuracy"]
    assert metric(client, "mlk_gate_served_accuracy") == weak_accuracy
    predicted = client.post("/api/predict", data=(ROOT / "server/static/samples/6.png").read_bytes(),
                            content_type="image/png").get_json()
    assert predicted["model"] == sha256(models["weak"])[:12]

    # not retried while the file stays the same ...
    for _ in range(3):
        assert client.get("/api/model").get_json()["gate"]["rejections"] == 1
    # ... and judged again once it changes (even to the same bytes: a new file)
    drop(models["shuffled"], served)
    assert client.get("/api/model").get_json()["gate"]["rejections"] == 2

    # a better model: promoted
    drop(mnist_model, served)
    info = client.get("/api/model").get_json()
    assert info["sha256"] == sha256(mnist_model)
    decision = info["gate"]["last_decision"]
    assert decision["decision"] == "promoted" and decision["candidate"]["accuracy"] > 0.9
    assert decision["current"]["sha256"] == sha256(models["weak"])
    assert info["gate"]["promotions"] == 1 and info["gate"]["served_accuracy"] == decision["candidate"]["accuracy"]
    assert metric(client, "mlk_gate_promotions") == 1 and metric(client, "mlk_gate_rejections") == 2


def test_epsilon_decides(tmp_path, models, gate_data):
    served = tmp_path / "aggregated-model.h5"
    shutil.copyfile(models["weak"], served)
    client = internal_client(server_app.create_app(str(served), check_interval=0, gate_data=str(gate_data), gate_epsilon=1.0))
    client.get("/api/model")
    drop(models["shuffled"], served)
    info = client.get("/api/model").get_json()
    assert info["sha256"] == sha256(models["shuffled"]) and info["gate"]["last_decision"]["decision"] == "promoted"


def test_without_gate_data_every_file_is_served(tmp_path, models):
    served = tmp_path / "aggregated-model.h5"
    shutil.copyfile(models["weak"], served)
    client = internal_client(server_app.create_app(str(served), check_interval=0))
    assert client.get("/api/model").get_json()["gate"] is None
    drop(models["shuffled"], served)
    assert client.get("/api/model").get_json()["sha256"] == sha256(models["shuffled"])
    assert metric(client, "mlk_gate_rejections") is None


def test_missing_gate_data_promotes_ungated_and_says_so(tmp_path, models):
    served = tmp_path / "aggregated-model.h5"
    shutil.copyfile(models["weak"], served)
    client = internal_client(server_app.create_app(str(served), check_interval=0, gate_data=str(tmp_path / "none.npz")))
    first = client.get("/api/model").get_json()["gate"]["last_decision"]
    assert first["decision"] == "initial" and "ungated" in first["reason"] and first["candidate"]["accuracy"] is None
    drop(models["shuffled"], served)
    info = client.get("/api/model").get_json()
    assert info["sha256"] == sha256(models["shuffled"])
    assert info["gate"]["last_decision"]["decision"] == "promoted" and "does not exist" in info["gate"]["last_decision"]["reason"]


# ------------------------------------------------------------------------------- gate.py alone


class FakeModel:
    """Predicts the label for the first `right` images of the evaluation set, a wrong class after."""

    def __init__(self, name, right, labels):
        self.sha256 = name
        self._right, self._labels, self._seen = right, labels, 0

    def predict(self, images):
        labels = self._labels[self._seen:self._seen + len(images)]
        out = np.zeros((len(images), 10))
        for i, label in enumerate(labels):
            out[i, label if self._seen + i < self._right else (label + 1) % 10] = 1
        self._seen = (self._seen + len(images)) % len(self._labels)
        return out


def test_decision_boundary_is_candidate_at_least_current_minus_epsilon(tmp_path):
    labels = np.arange(2000) % 10
    np.savez(tmp_path / "eval.npz", x=np.zeros((2000, 28, 28), np.uint8), y=labels.astype(np.uint8))
    gate = gate_module.Gate(str(tmp_path / "eval.npz"), epsilon=0.01)
    current = FakeModel("current", 1800, labels)  # 0.90
    assert gate.admit(current, None) and gate.last_decision["decision"] == "initial"
    assert gate.admit(FakeModel("equal-minus-epsilon", 1780, labels), current)  # 0.89 >= 0.90 - 0.01
    assert not gate.admit(FakeModel("below", 1778, labels), current)  # 0.889 < 0.89
    assert gate.last_decision["candidate"] == {"sha256": "below", "accuracy": 0.889}
    assert gate.last_decision["current"] == {"sha256": "current", "accuracy": 0.9}
    assert (gate.promotions, gate.rejections) == (1, 1)


@pytest.mark.parametrize("content,message", [
    ({"x": np.zeros((5, 28, 28), np.uint8)}, "expected keys x and y"),
    ({"x": np.zeros((5, 28, 27), np.uint8), "y": np.zeros(5, np.uint8)}, "expected (n>0, 28, 28)"),
    ({"x": np.zeros((5, 28, 28), np.float32), "y": np.zeros(5, np.uint8)}, "expected uint8"),
    ({"x": np.zeros((5, 28, 28), np.uint8), "y": np.zeros(4, np.uint8)}, "expected (5,)"),
    ({"x": np.zeros((5, 28, 28), np.uint8), "y": np.full(5, 12, np.uint8)}, "labels 0-9"),
    (b"not a zip", "cannot read"),
])
def test_bad_evaluation_set_is_a_gate_data_error(tmp_path, content, message):
    path = tmp_path / "eval.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(gate_module.GateDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gate_module.load_eval_set(str(path))


@pytest.mark.parametrize("argv,message", [
    (["--model", "m.h5", "--gate-epsilon", "-0.1"], "--gate-epsilon must be between 0 and 1"),
    (["--model", "m.h5", "--gate-epsilon", "x"], "--gate-epsilon"),
    (["--model", "m.h5", "--gate-data", "/"], "--gate-data / is a directory"),
])
def test_cli_gate_flags_bad_values_exit_2(argv, message, capsys):
    assert server.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# ------------------------------------------------------- --gate-state: one decision for every worker and replica


def state_app(served, state, gate_data):
    return server_app.create_app(str(served), check_interval=0, gate_data=str(gate_data), gate_state=str(state))


def record_of(state):
    return json.loads((state / "admitted.json").read_text())


def leftovers(state):
    """Temporary files (hidden names) left in the state directory or its models/."""
    return [p.name for folder in (state, state / "models") if folder.is_dir() for p in folder.iterdir()
            if p.name.startswith(".")]


def predicted_model(client):
    return client.post("/api/predict", data=(ROOT / "server/static/samples/6.png").read_bytes(),
                       content_type="image/png").get_json()["model"]


def test_a_rejected_candidate_stays_rejected_after_a_restart(tmp_path, models, gate_data, caplog):
    served, state = tmp_path / "aggregated-model.h5", tmp_path / "gate"
    shutil.copyfile(models["weak"], served)
    client = internal_client(state_app(served, state, gate_data))
    gate = client.get("/api/model").get_json()["gate"]
    assert gate["last_decision"]["decision"] == "initial"
    assert (gate["state"], gate["restored"], gate["state_error"]) == (str(state), False, None)
    weak = sha256(models["weak"])
    assert record_of(state) == {"format": "mlk-gate/1", "sha256": weak, "accuracy": gate["served_accuracy"],
                                "data": str(gate_data), "epsilon": gate_module.DEFAULT_EPSILON,
                                "at": record_of(state)["at"], "model": f"models/{weak}.h5"}
    assert sha256(state / "models" / f"{weak}.h5") == weak
    drop(models["shuffled"], served)
    assert client.get("/api/model").get_json()["gate"]["last_decision"]["decision"] == "rejected"
    assert record_of(state)["sha256"] == weak  # a rejection is not recorded

    # a restarted worker (or a new pod): the file on disk is the rejected one; it serves the admitted model
    caplog.clear()
    restarted = internal_client(state_app(served, state, gate_data))
    info = restarted.get("/api/model").get_json()
    assert info["sha256"] == weak and info["path"] == str(state / "models" / f"{weak}.h5")
    assert info["gate"]["restored"] is True and info["gate"]["rejections"] == 1 and info["gate"]["promotions"] == 0
    decision = info["gate"]["last_decision"]
    assert decision["decision"] == "rejected" and decision["candidate"]["sha256"] == sha256(models["shuffled"])
    assert decision["current"]["sha256"] == weak
    assert predicted_model(restarted) == weak[:12]
    assert f"gate: restored candidate {weak}" in caplog.text and "model restored:" in caplog.text

    # restarted again with the admitted bytes back in the file: restored, the file adopted, nothing to decide
    drop(models["weak"], served)
    again = internal_client(state_app(served, state, gate_data))
    info = again.get("/api/model").get_json()
    assert info["sha256"] == weak and info["path"] == str(served)
    assert info["gate"]["last_decision"]["decision"] == "restored" and info["gate"]["restored"] is True
    assert info["gate"]["last_decision"]["candidate"]["accuracy"] == record_of(state)["accuracy"]
    assert leftovers(state) == []


def test_two_replicas_on_one_state_serve_the_same_model(tmp_path, models, mnist_model, gate_data):
    import h5py

    served, state = tmp_path / "aggregated-model.h5", tmp_path / "gate"
    shutil.copyfile(models["weak"], served)
    a = internal_client(state_app(served, state, gate_data))
    b = internal_client(state_app(served, state, gate_data))  # started second: restores what a recorded
    good, shuffled = sha256(mnist_model), sha256(models["shuffled"])
    assert b.get("/api/model").get_json()["gate"]["last_decision"]["decision"] == "restored"

    # a promotes a better model while b does not look; then a bad one arrives, and b sees only that
    drop(mnist_model, served)
    assert a.get("/api/model").get_json()["gate"]["last_decision"]["decision"] == "promoted"
    drop(models["shuffled"], served)
    info = b.get("/api/model").get_json()
    assert info["sha256"] == good and info["gate"]["restored"] is True  # compared with what a recorded
    decision = info["gate"]["last_decision"]
    assert decision["decision"] == "rejected" and decision["current"]["sha256"] == good
    assert decision["candidate"]["sha256"] == shuffled and "recorded by another worker/replica" in decision["reason"]
    info = a.get("/api/model").get_json()
    assert info["sha256"] == good and info["gate"]["last_decision"]["decision"] == "rejected"
    assert predicted_model(a) == predicted_model(b) == good[:12]

    # after a promotion: the second to look admits what the first recorded, without scoring it
    same_weights = tmp_path / "same-weights.h5"
    shutil.copyfile(mnist_model, same_weights)
    with h5py.File(same_weights, "a") as f:
        f.attrs["mlk_round"] = 2  # other bytes, the same predictions: scores as the served one, promoted
    drop(same_weights, served)
    first = a.get("/api/model").get_json()
    assert first["gate"]["last_decision"]["decision"] == "promoted" and first["sha256"] == sha256(same_weights)
    second = b.get("/api/model").get_json()
    decision = second["gate"]["last_decision"]
    assert decision["decision"] == "promoted" and "recorded by another worker/replica" in decision["reason"]
    assert decision["candidate"]["accuracy"] is None  # not scored again
    assert second["sha256"] == first["sha256"] and predicted_model(a) == predicted_model(b) == sha256(same_weights)[:12]
    assert record_of(state)["sha256"] == sha256(same_weights)
    assert leftovers(state) == []


@pytest.mark.parametrize("damage,message", [
    ("not json", "is not JSON"),
    ("copy missing", "cannot be read"),
    ("copy other bytes", "whose sha256 is"),
])
def test_an_unusable_state_is_one_warning_and_decisions_as_without_it(tmp_path, models, gate_data, caplog, damage,
                                                                      message):
    served, state = tmp_path / "aggregated-model.h5", tmp_path / "gate"
    shutil.copyfile(models["shuffled"], served)
    weak = sha256(models["weak"])
    (state / "models").mkdir(parents=True)
    shutil.copyfile(models["weak"], state / "models" / f"{weak}.h5")
    (state / "admitted.json").write_text(json.dumps({"format": "mlk-gate/1", "sha256": weak, "accuracy": 0.5, "data": "x",
                                                     "epsilon": 0.005, "at": "x", "model": f"models/{weak}.h5"}))
    if damage == "not json":
        (state / "admitted.json").write_text('{"format": "mlk-gate/1", ')
    elif damage == "copy missing":
        (state / "models" / f"{weak}.h5").unlink()
    else:
        shutil.copyfile(models["shuffled"], state / "models" / f"{weak}.h5")
    client = internal_client(state_app(served, state, gate_data))
    response = client.get("/api/model")
    assert response.status_code == 200
    info = response.get_json()
    assert info["sha256"] == sha256(models["shuffled"])  # the file, "initial", as without --gate-state
    assert info["gate"]["last_decision"]["decision"] == "initial" and info["gate"]["restored"] is False
    warnings = [r.getMessage() for r in caplog.records if "ignoring the gate's state" in r.getMessage()]
    assert len(warnings) == 1 and message in warnings[0]
    assert record_of(state)["sha256"] == sha256(models["shuffled"])  # the admission wrote a good record


class HexModel(FakeModel):
    """A FakeModel whose sha256 is that of its `content`, as the state's records need; counts its predictions."""

    def __init__(self, content, right, labels):
        super().__init__(hashlib.sha256(content).hexdigest(), right, labels)
        self.content, self.calls = content, 0

    def predict(self, images):
        self.calls += 1
        return super().predict(images)


@pytest.fixture
def fake_eval(tmp_path):
    labels = np.arange(2000) % 10
    np.savez(tmp_path / "eval.npz", x=np.zeros((2000, 28, 28), np.uint8), y=labels.astype(np.uint8))
    return str(tmp_path / "eval.npz"), labels


def test_workers_sharing_a_state_follow_its_record(tmp_path, fake_eval):
    path, labels = fake_eval
    one, two = (gate_module.Gate(path, state=str(tmp_path / "gate")) for _ in range(2))
    current, better = HexModel(b"current", 1800, labels), HexModel(b"better", 1900, labels)
    assert one.choose(current, None, current.content) is current and one.last_decision["decision"] == "initial"
    assert two.choose(current, None) is current and two.last_decision["decision"] == "restored"
    assert one.choose(better, current, better.content) is better and one.last_decision["decision"] == "promoted"
    calls = better.calls
    assert two.choose(better, current) is better and better.calls == calls  # admitted from the record, not scored
    assert two.last_decision["decision"] == "promoted" and (two.promotions, two.rejections) == (1, 0)
    assert record_of(tmp_path / "gate")["sha256"] == better.sha256
    assert (tmp_path / "gate" / "models" / f"{better.sha256}.h5").read_bytes() == b"better"


def test_an_unwritable_state_keeps_the_decision_and_says_so(tmp_path, fake_eval, caplog):
    path, labels = fake_eval
    state = tmp_path / "gate"
    state.mkdir()
    (state / "models").write_text("a file where the folder should be")  # writes fail as on a read-only mount
    gate = gate_module.Gate(path, state=str(state))
    first, second = HexModel(b"first", 1800, labels), HexModel(b"second", 1900, labels)
    assert gate.choose(first, None, first.content) is first and gate.state_error is not None
    assert gate.choose(second, first, second.content) is second and gate.last_decision["decision"] == "promoted"
    info = gate.info(second)
    assert info["state"] == str(state) and "cannot save the decision" in info["state_error"]
    assert caplog.text.count("cannot save the decision") == 1  # once, not per decision
    assert not (state / "admitted.json").exists()
    (state / "models").unlink()  # writable again: the next admission is saved and the error cleared
    third = HexModel(b"third", 1900, labels)
    assert gate.choose(third, second, third.content) is third
    assert gate.info(third)["state_error"] is None and record_of(state)["sha256"] == third.sha256


def test_the_record_is_replaced_whole_and_old_copies_are_pruned(tmp_path, monkeypatch):
    state = gate_module.GateState(str(tmp_path / "gate"))
    contents = [f"model {i}".encode() for i in range(5)]
    shas = [hashlib.sha256(c).hexdigest() for c in contents]
    for i, (content, sha) in enumerate(zip(contents, shas)):
        state.save(content, sha, 0.9, "eval.npz", 0.005)
        os.utime(state.copy_path(sha), ns=(i * 10**9, i * 10**9))  # strictly older than the next copy
    models_dir = tmp_path / "gate" / "models"
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(f"{sha}.h5" for sha in shas[-gate_module.KEEP:])
    assert state.read()["sha256"] == shas[-1] and leftovers(tmp_path / "gate") == []

    # the copy the record names is kept however old it is
    os.utime(state.copy_path(shas[-1]), ns=(0, 0))
    newer = [f"other {i}".encode() for i in range(3)]
    for content in newer:
        (models_dir / f"{hashlib.sha256(content).hexdigest()}.h5").write_bytes(content)
    state.prune("0" * 64)
    left = {p.name for p in models_dir.iterdir()}
    assert left == {f"{hashlib.sha256(c).hexdigest()}.h5" for c in newer} | {f"{shas[-1]}.h5"}

    # a write that fails half-way leaves the old record whole and no temporary file
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("admitted.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        state.save(b"late", hashlib.sha256(b"late").hexdigest(), 0.9, "eval.npz", 0.005)
    assert state.read()["sha256"] == shas[-1] and leftovers(tmp_path / "gate") == []


@pytest.mark.parametrize("text,message", [
    ("[]", "not a mlk-gate/1 record"),
    ('{"format": "mlk-gate/2"}', "not a mlk-gate/1 record"),
    ('{"format": "mlk-gate/1", "sha256": "abc", "model": "models/abc.h5"}', "64 hex digits"),
    ('{"format": "mlk-gate/1", "sha256": "' + "a" * 64 + '", "model": "../x.h5"}', "64 hex digits"),
    ('{"format": "mlk-gate/1", "sha256": "' + "a" * 64 + '", "model": "models/' + "a" * 64 + '.h5"}', "cannot be read"),
])
def test_malformed_records_are_a_gate_state_error(tmp_path, text, message):
    (tmp_path / "admitted.json").write_text(text)
    with pytest.raises(gate_module.GateStateError, match=message):
        gate_module.GateState(str(tmp_path)).read()
    assert gate_module.GateState(str(tmp_path / "none")).read() is None


def test_cli_gate_state_needs_gate_data_and_a_writable_directory(tmp_path, capsys):
    assert server.main(["--model", "m.h5", "--gate-state", str(tmp_path / "gate")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gate-state needs --gate-data" in err
    assert not (tmp_path / "gate").exists()
    (tmp_path / "file").write_text("not a directory")
    argv = ["--model", "m.h5", "--gate-data", "t.npz", "--gate-state", str(tmp_path / "file" / "gate")]
    assert server.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gate-state: cannot write to" in err
    assert gate_module.check_state_dir(str(tmp_path / "gate")) is None  # created, and nothing left behind
    assert [p.name for p in (tmp_path / "gate").iterdir()] == ["models"] and leftovers(tmp_path / "gate") == []
    assert server.build_parser().parse_args(["--model", "m.h5"]).gate_state is None


@pytest.mark.slow
def test_server_workers_restore_the_admitted_model_not_the_rejected_file(tmp_path, models, gate_data):
    """server.py with 2 workers and --gate-state, started while the file on disk is one the gate rejected
    (the state prepared by an app in this process, as a previous pod would have): every worker serves the
    admitted model."""

    import requests


    served, state = tmp_path / "aggregated-model.h5", tmp_path / "gate"
    shutil.copyfile(models["weak"], served)
    client = internal_client(state_app(served, state, gate_data))
    drop(models["shuffled"], served)
    assert client.get("/api/model").get_json()["gate"]["last_decision"]["decision"] == "rejected"
    log = tmp_path / "server.log"
    proc, url, _ = start_real_server(served, log, "--gate-data", str(gate_data), "--gate-state", str(state))
    try:
        for _ in range(10):  # nginx spreads them over both workers
            info = requests.get(url + "/api/model", timeout=10).json()
            assert info["sha256"] == sha256(models["weak"]), info
            assert info["gate"]["restored"] is True and "state" not in info["gate"]  # a visitor's answer
            assert info["gate"]["last_decision"]["decision"] == "rejected"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert log.read_text().count("gate: restored candidate") == 2  # once per worker


def start_real_server(model, log, *flags):
    """server.py (nginx + 2 gunicorn workers) on a free port and a free internal port, its output in `log`;
    (process, url, internal url) once /readyz says ready (180 s at most)."""
    import time

    import requests

    from helpers import free_port

    port = free_port()
    internal_port = free_port()
    while internal_port == port:
        internal_port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HDF5_USE_FILE_LOCKING="FALSE")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "server/server.py"), "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), "--internal-port", str(internal_port),
                                 "--workers", "2", *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server.py not ready: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, f"http://127.0.0.1:{internal_port}"
        except requests.RequestException:
            pass
        time.sleep(0.3)


# ------------------------------------------------ the container run's checker, against server.py here


@pytest.mark.slow
def test_check_v2_gate_passes_against_the_real_server(tmp_path, mnist_model, mnist_npz, mnist_test):
    """tests/e2e/check_v2_gate.py (what the container run calls) against server.py with 2 workers and
    --gate-data, the volume's layout in tmp_path: it must pass, and the served file end up replaced."""
    import json



    (tmp_path / "data").mkdir()
    (tmp_path / "rounds").mkdir()
    served = tmp_path / "aggregated-model.h5"
    shutil.copyfile(mnist_model, served)
    x, y = mnist_test
    np.savez(tmp_path / "data" / "test.npz", x=x[:GATE_IMAGES], y=y[:GATE_IMAGES])
    with np.load(mnist_npz) as npz:
        np.savez(tmp_path / "data" / "0.npz", x=npz["x_train"][:3000], y=npz["y_train"][:3000])
    (tmp_path / "rounds" / "ledger.json").write_text(json.dumps({"format": "mlk-ledger/1", "rounds": [
        {"round": 1, "aggregate": {"file": "rounds/r1.h5", "sha256": sha256(served)}, "test_accuracy": 0.98}]}))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HDF5_USE_FILE_LOCKING="FALSE")
    log = tmp_path / "server.log"
    proc, url, internal_url = start_real_server(served, log, "--gate-data", str(tmp_path / "data" / "test.npz"))
    try:
        check = subprocess.run([sys.executable, str(ROOT / "tests/e2e/check_v2_gate.py"), url, "--internal", internal_url,
                                "--model", str(served),
                                "--test", str(tmp_path / "data" / "test.npz"), "--train", str(tmp_path / "data" / "0.npz"),
                                "--sample", f"{ROOT / 'server/static/samples/6.png'}:6", "--expect-round", "1"],
                               capture_output=True, text=True, env=env, timeout=900)
        assert check.returncode == 0 and check.stdout.splitlines()[-1] == "check_v2_gate: PASS", \
            check.stdout[-3000:] + check.stderr[-2000:]
        assert "rejected" in check.stdout and "promoted" in check.stdout
        assert sha256(served) != sha256(mnist_model)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    assert "gate: rejected candidate" in text and "gate: promoted candidate" in text
