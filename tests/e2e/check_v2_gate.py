"""Container-run checks of the server's Open Inference Protocol endpoints and its promotion gate.

    python check_v2_gate.py BASE_URL --model /mnt/aggregated-model.h5 --test /mnt/data/test.npz \
        --train /mnt/data/0.npz --sample 6.png:6 [--expect-round N] [--min-accuracy 0.5] [--timeout 180]

Runs against a live server (BASE_URL, e.g. http://127.0.0.1:8080) started with `--gate-data` on the
same test set, from a place that can write the server's model file (--model; in the container run: a
container of the trainer image on the shared volume, which has numpy, h5py and Keras). Standard library
HTTP only (no client library in the images; tests/test_v2.py uses tritonclient).

1. v2: server/model metadata and health; a batch of test digits as FP32 [n, 28, 28] (JSON) and as
   UINT8 [n, 784] (binary tensor data), same answers, accuracy >= --min-accuracy; the sample image as
   BYTES (binary and base64 JSON); protocol errors (bad shape 400, 33 images 400, unknown model 404,
   2 MB+ body 413), each a JSON {"error": ...}.
2. Ledger (with --expect-round): /api/model names that round and its entry; the page shows the history.
3. Gate: a model trained from scratch on label-shuffled training data is dropped onto --model (temp
   file + rename, as the aggregator writes): it must be rejected (accuracy < 0.2), the served sha256 must
   not change and /readyz stay 200; then a model fine-tuned on the test set itself (so it certainly scores
   higher there) must be promoted; mlk_gate_rejections / mlk_gate_promotions in /metrics count them.
   The served model file is left replaced by that fine-tuned model.

Every check prints one line; the last line is `check_v2_gate: PASS` (exit 0) or the failure (exit 1).
Bad arguments: one line, exit 2.
"""

import argparse
import base64
import hashlib
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request

import numpy as np

HEADER = "Inference-Header-Content-Length"


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)
    print(f"ok: {message}", flush=True)


def http(method, url, body=None, headers=None, timeout=60):
    """-> (status, headers, body bytes); HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


INTERNAL = {}  # public base URL -> the same server's internal URL (--internal): /metrics and the full /api/model


def internal(base):
    """Where /metrics and the full /api/model answer: the server's internal port (server.py --internal-port)."""
    return INTERNAL.get(base, base)


def get_json(base, path):
    status, _, body = http("GET", base + path)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def infer(base, request, tail=b"", headers=None):
    head = json.dumps(request).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if tail:
        all_headers[HEADER] = str(len(head))
    status, response_headers, body = http("POST", base + "/v2/models/mnist/infer", head + tail, all_headers)
    return status, response_headers, body


def outputs_of(headers, body):
    """An inference response (JSON or with binary tensor data) -> {name: numpy array}."""
    size = headers.get(HEADER)
    head, tail = (body, b"") if size is None else (body[:int(size)], body[int(size):])
    answer = json.loads(head)
    result, offset = {}, 0
    for out in answer["outputs"]:
        dtype = {"FP32": "<f4", "INT64": "<i8"}[out["datatype"]]
        binary = (out.get("parameters") or {}).get("binary_data_size")
        if binary is not None:
            array = np.frombuffer(tail, dtype=dtype, count=binary // np.dtype(dtype).itemsize, offset=offset)
            offset += binary
        else:
            array = np.asarray(out["data"], dtype=dtype)
        result[out["name"]] = array.reshape(out["shape"])
    return answer, result


def check_v2(base, x, y, sample, sample_digit, min_accuracy):
    status, meta = get_json(base, "/v2")
    check(status == 200 and meta and meta.get("name") and "extensions" in meta, f"GET /v2 -> {status} {meta}")
    for path, expected in [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                           ("/v2/models/mnist/ready", {"name": "mnist", "ready": True})]:
        status, body = get_json(base, path)
        check(status == 200 and body == expected, f"GET {path} -> {status} {body}")
    status, model = get_json(base, "/v2/models/mnist")
    check(status == 200 and {t["name"] for t in model["inputs"]} == {"input", "image"}
          and {t["name"] for t in model["outputs"]} == {"probabilities", "digit"}, f"GET /v2/models/mnist -> {status}")

    n = len(x)
    request = {"id": "e2e", "inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 28, 28],
                                        "data": (x.astype(np.float32) / 255.0).ravel().tolist()}]}
    status, headers, body = infer(base, request)
    check(status == 200, f"infer FP32 [{n}, 28, 28] JSON -> {status} {body[:200]!r}")
    answer, as_float = outputs_of(headers, body)
    accuracy = float((as_float["digit"] == y).mean())
    check(answer.get("id") == "e2e" and as_float["probabilities"].shape == (n, 10)
          and (as_float["digit"] == as_float["probabilities"].argmax(axis=1)).all(),
          f"FP32 answer: probabilities [{n}, 10], digit = argmax, id echoed")
    check(accuracy >= min_accuracy, f"FP32 batch accuracy {accuracy:.3f} >= {min_accuracy}")

    request = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [n, 784],
                           "parameters": {"binary_data_size": n * 784}}],
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                           {"name": "digit", "parameters": {"binary_data": True}}]}
    status, headers, body = infer(base, request, x.astype(np.uint8).tobytes())
    check(status == 200 and headers.get(HEADER), f"infer UINT8 [{n}, 784] binary -> {status}")
    _, as_bytes = outputs_of(headers, body)
    check((as_bytes["digit"] == as_float["digit"]).all()
          and np.allclose(as_bytes["probabilities"], as_float["probabilities"], atol=1e-5),
          "UINT8 binary answers = FP32 JSON answers")

    blob = open(sample, "rb").read()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "parameters": {"binary_data_size": 2 * (4 + len(blob))}}]}
    status, headers, body = infer(base, request, (struct.pack("<I", len(blob)) + blob) * 2)
    digits = outputs_of(headers, body)[1]["digit"].tolist() if status == 200 else None
    check(digits == [sample_digit] * 2, f"infer BYTES [2] binary ({os.path.basename(sample)} twice) -> {status} {digits}")
    # JSON BYTES elements are strings (their UTF-8 bytes); a binary file goes base64 with content_type "base64"
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(blob).decode()],
                           "parameters": {"content_type": "base64"}}]}
    status, headers, body = infer(base, request)
    digits = outputs_of(headers, body)[1]["digit"].tolist() if status == 200 else None
    check(digits == [sample_digit], f"infer BYTES [1] base64 JSON -> {status} {digits}")

    bad = [("shape [1, 28, 27]", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 28, 27],
                                               "data": [0.0] * 756}]}, 400, "/v2/models/mnist/infer"),
           ("33 images", {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [33, 784],
                                      "data": [0] * (33 * 784)}]}, 400, "/v2/models/mnist/infer"),
           ("unknown model", {"inputs": []}, 404, "/v2/models/other/infer")]
    for what, request, expected, path in bad:
        status, _, body = http("POST", base + path, json.dumps(request).encode(), {"Content-Type": "application/json"})
        error = json.loads(body).get("error") if body.startswith(b"{") else None
        check(status == expected and isinstance(error, str), f"{what} -> {status} {error}")
    status, _, body = http("POST", base + "/v2/models/mnist/infer", b" " * (2 * 1024 * 1024 + 10),
                           {"Content-Type": "application/json"})
    check(status == 413 and "error" in json.loads(body), f"2 MB + 10 bytes -> {status} {body[:80]!r}")


def check_ledger(base, expect_round):
    status, info = get_json(internal(base), "/api/model")
    ledger = (info or {}).get("ledger") or {}
    entry = ledger.get("entry") or {}
    check(status == 200 and ledger.get("round") == expect_round
          and (entry.get("aggregate") or {}).get("sha256") == info.get("sha256"),
          f"/api/model: served round {ledger.get('round')}, its ledger entry's aggregate sha256 = the served file's")
    check(info.get("runtime") == "litert", f"/api/model: the model runs in {info.get('runtime')} (LiteRT, converted "
          "in the read-only container)")
    status, _, page = http("GET", base + "/")
    check(status == 200 and b'id="history-card"' in page and f"Serving round {expect_round}".encode() in page,
          "the page shows the history and the served round")


# --------------------------------------------------------------------------------------------- gate


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def metric(base, name):
    _, _, body = http("GET", internal(base) + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def drop(model, target):
    """Save a Keras model as target the way the aggregator writes: a temp name beside it, then rename."""
    tmp = os.path.join(os.path.dirname(target), ".check-v2-gate.h5")
    model.save(tmp)
    os.replace(tmp, target)
    return sha256(target)


def poll_decision(base, candidate, timeout):
    """/api/model answers until one has decided about `candidate` (and /readyz stays 200): that answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = http("GET", base + "/readyz")
        if ready != 200:
            raise CheckFailed(f"/readyz {ready} while a candidate is judged")
        status, info = get_json(internal(base), "/api/model")
        decision = ((info or {}).get("gate") or {}).get("last_decision") or {}
        if status == 200 and (decision.get("candidate") or {}).get("sha256") == candidate:
            return info
        time.sleep(0.5)
    raise CheckFailed(f"no gate decision about {candidate[:12]} in /api/model within {timeout} s")


def check_gate(base, model_path, x_train, y_train, x_test, y_test, timeout):
    import keras

    status, info = get_json(internal(base), "/api/model")
    check(status == 200 and info.get("gate") is not None, "/api/model has a gate (the server runs with --gate-data)")
    served = info["sha256"]
    check(served == sha256(model_path), f"serving {served[:12]} = {model_path}")
    rejections = metric(base, "mlk_gate_rejections") or 0
    promotions = metric(base, "mlk_gate_promotions") or 0

    current = keras.models.load_model(model_path, compile=False)
    shuffled = keras.models.clone_model(current)  # same architecture, fresh weights
    shuffled.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    labels = np.random.default_rng(0).permutation(y_train)
    shuffled.fit(x_train[..., None].astype(np.float32) / 255.0, labels, epochs=1, batch_size=32, verbose=0)
    candidate = drop(shuffled, model_path)
    info = poll_decision(base, candidate, timeout)
    decision = info["gate"]["last_decision"]
    check(decision["decision"] == "rejected" and decision["candidate"]["accuracy"] < 0.2
          and decision["current"]["sha256"] == served,
          f"label-shuffled {candidate[:12]} rejected: accuracy {decision['candidate']['accuracy']} < "
          f"{decision['current']['accuracy']} - {decision['epsilon']}")
    answers = [get_json(internal(base), "/api/model") for _ in range(10)]  # every worker keeps the current model
    check(all(status == 200 and info["sha256"] == served for status, info in answers),
          f"10 more /api/model answers all serve {served[:12]}")
    check(metric(base, "mlk_gate_rejections") >= rejections + 1,
          f"mlk_gate_rejections {metric(base, 'mlk_gate_rejections')} (was {rejections})")

    better = current  # the served weights, trained further on the test set itself
    better.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    better.fit(x_test[..., None].astype(np.float32) / 255.0, y_test.astype(np.int64), epochs=2, batch_size=32, verbose=0)
    candidate = drop(better, model_path)
    info = poll_decision(base, candidate, timeout)
    decision = info["gate"]["last_decision"]
    check(decision["decision"] == "promoted" and decision["current"]["sha256"] == served,
          f"fine-tuned {candidate[:12]} promoted: accuracy {decision['candidate']['accuracy']} >= "
          f"{decision['current']['accuracy']} - {decision['epsilon']}")
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 10 and time.monotonic() < deadline:  # until every worker serves it
        status, info = get_json(internal(base), "/api/model")
        streak = streak + 1 if status == 200 and info["sha256"] == candidate else 0
        time.sleep(0.2)
    check(streak >= 10, f"10 /api/model answers in a row serve {candidate[:12]}")
    check(metric(base, "mlk_gate_promotions") >= promotions + 1,
          f"mlk_gate_promotions {metric(base, 'mlk_gate_promotions')} (was {promotions})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="check_v2_gate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--internal", help="the server's internal base URL (/metrics, the full /api/model; "
                        "server.py --internal-port), e.g. http://127.0.0.1:9090 (default: the base URL)")
    parser.add_argument("--model", required=True, help="the served model file (written by the gate check)")
    parser.add_argument("--test", required=True, help="the gate's test set .npz (x, y)")
    parser.add_argument("--train", required=True, help="a training shard .npz (x, y) for the label-shuffled model")
    parser.add_argument("--sample", required=True, help="IMAGE:DIGIT, an image file and the digit it shows")
    parser.add_argument("--expect-round", type=int, help="the ledger round the served model should be")
    parser.add_argument("--min-accuracy", type=float, default=0.5, help="on 32 test digits (default 0.5)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for each gate decision")
    parser.add_argument("--skip-gate", action="store_true", help="only the v2 (and ledger) checks")

    def error(message):
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    image, _, digit = args.sample.rpartition(":")
    if not image or not digit.isdigit():
        error(f"--sample must be IMAGE:DIGIT, got {args.sample!r}")
    for path in (args.model, args.test, args.train, image):
        if not os.path.isfile(path):
            error(f"{path}: no such file")
    base = args.base.rstrip("/")
    if args.internal:
        INTERNAL[base] = args.internal.rstrip("/")
    try:
        with np.load(args.test) as npz:
            x_test, y_test = npz["x"], npz["y"]
        with np.load(args.train) as npz:
            x_train, y_train = npz["x"][:3000], npz["y"][:3000]
        check_v2(base, x_test[:32], y_test[:32], image, int(digit), args.min_accuracy)
        if args.expect_round is not None:
            check_ledger(base, args.expect_round)
        if not args.skip_gate:
            check_gate(base, args.model, x_train, y_train, x_test, y_test, args.timeout)
    except (CheckFailed, OSError, ValueError, KeyError, TypeError) as err:
        print(f"check_v2_gate: FAIL - {type(err).__name__ + ': ' if not isinstance(err, CheckFailed) else ''}{err}")
        return 1
    print("check_v2_gate: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
