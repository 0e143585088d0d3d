"""The Open Inference Protocol (v2) endpoints (server/v2.py): through a real v2 client library
(tritonclient.http, against the app served on a local port) for both input forms, batches, JSON and
binary tensor data and compression; through Flask's test client for every kind of bad input."""

import base64
import gzip
import io
import json
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import free_port, thick_seven_png

ROOT = Path(__file__).resolve().parents[1]
import app as server_app  # noqa: E402

SAMPLES = ROOT / "server" / "static" / "samples"
URL = "/v2/models/mnist/infer"



@pytest.fixture(scope="module")
def triton(app):
    """A tritonclient.http client talking to the app over a real local HTTP socket."""
    import tritonclient.http as httpclient
    from werkzeug.serving import make_server

    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", connection_timeout=30, network_timeout=60)
    try:
        yield client
    finally:
        client.close()
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def digits(mnist_test):
    """8 MNIST test digits (uint8 (8, 28, 28)) and their labels."""
    x, y = mnist_test
    return x[:8], y[:8]


def infer_input(name, array, datatype, binary=True):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def outputs(binary=True, names=("probabilities", "digit")):
    import tritonclient.http as httpclient

    return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]


# --------------------------------------------------------------------------- through tritonclient


def test_health_and_metadata_through_the_client(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("mnist")
    assert not triton.is_model_ready("other")
    server = triton.get_server_metadata()
    assert server["name"] == "mlk-mnist" and "binary_tensor_data" in server["extensions"]
    model = triton.get_model_metadata("mnist")
    assert model["name"] == "mnist"
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "input": ("FP32", [-1, 28, 28]), "image": ("BYTES", [-1])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]), "digit": ("INT64", [-1])}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype,shape", [("FP32", (28, 28)), ("UINT8", (784,))])
def test_infer_a_batch_of_mnist_arrays(triton, digits, datatype, shape, binary):
    x, y = digits
    array = (x.astype(np.float32) / 255.0 if datatype == "FP32" else x).reshape((len(x),) + shape)
    result = triton.infer("mnist", [infer_input("input", array, datatype, binary)], outputs=outputs(binary),
                          request_id="batch-1")
    probabilities = result.as_numpy("probabilities")
    predicted = result.as_numpy("digit")
    assert probabilities.dtype == np.float32 and probabilities.shape == (8, 10)
    assert predicted.dtype == np.int64 and predicted.shape == (8,)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert (predicted == probabilities.argmax(axis=1)).all()
    assert (predicted == y).sum() >= 7, (predicted, y)
    response = result.get_response()
    assert response["id"] == "batch-1" and response["model_name"] == "mnist"
    assert len(response["parameters"]["model"]) == 12


def test_fp32_and_uint8_forms_give_the_same_probabilities(triton, digits):
    x, _ = digits
    as_float = triton.infer("mnist", [infer_input("input", x.astype(np.float32) / 255.0, "FP32")])
    as_bytes = triton.infer("mnist", [infer_input("input", x.reshape(8, 784), "UINT8")])
    assert np.allclose(as_float.as_numpy("probabilities"), as_bytes.as_numpy("probabilities"), atol=1e-6)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_infer_encoded_images_same_as_the_upload_api(triton, client, compression):
    names = ["4.png", "6.png", "photo-3.jpg", "photo-7.jpg", "thick-7.png"]  # the last one is scored as two views
    blobs = np.array([(SAMPLES / n).read_bytes() for n in names[:-1]] + [thick_seven_png()], dtype=np.object_)
    result = triton.infer("mnist", [infer_input("image", blobs, "BYTES")], outputs=outputs(),
                          request_compression_algorithm=compression)
    assert result.as_numpy("digit").tolist() == [4, 6, 3, 7, 7]
    data = {"file": [(io.BytesIO(b), n) for b, n in zip(blobs, names)]}
    uploaded = client.post("/api/predict", data=data, content_type="multipart/form-data").get_json()["predictions"]
    assert np.allclose(result.as_numpy("probabilities"), [p["probabilities"] for p in uploaded], atol=2e-6)


def test_v2_and_the_upload_api_are_one_pipeline(app, client, monkeypatch):
    """The same files to /api/predict and to v2 (binary tensors) go through the app's one Predictor and give the
    same numbers: v2's FP32 probabilities are /api/predict's before rounding to 6 decimals, its digits theirs."""
    predictor = app.extensions["mlk_predictor"]
    answered = []
    real = predictor.predict

    def spy(images):
        answered.append(real(images))
        return answered[-1]

    monkeypatch.setattr(predictor, "predict", spy)
    blobs = [(SAMPLES / "6.png").read_bytes(), thick_seven_png(), (SAMPLES / "photo-3.jpg").read_bytes()]
    uploaded = client.post("/api/predict", data={"file": [(io.BytesIO(b), f"{i}.png") for i, b in enumerate(blobs)]},
                           content_type="multipart/form-data").get_json()["predictions"]
    elements = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    data, headers = binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                                "parameters": {"binary_data_size": len(elements)}}],
                                    "parameters": {"binary_data_output": True}}, elements)
    response = client.post(URL, data=data, headers=headers, content_type="application/octet-stream")
    assert response.status_code == 200, response.get_data()
    raw = response.get_data()
    size = int(response.headers["Inference-Header-Content-Length"])
    head = json.loads(raw[:size])
    assert [(o["name"], o["shape"], o["parameters"]["binary_data_size"]) for o in head["outputs"]] == [
        ("probabilities", [3, 10], 120), ("digit", [3], 24)]
    probabilities = np.frombuffer(raw[size:size + 120], "<f4").reshape(3, 10)
    digits = np.frombuffer(raw[size + 120:], "<i8")

    assert len(answered) == 2  # one predict() per request, both through the app's Predictor
    assert np.array_equal(answered[0].probabilities, answered[1].probabilities)
    assert answered[0].model is answered[1].model
    assert digits.tolist() == [p["digit"] for p in uploaded] == [6, 7, 3]
    assert np.abs(probabilities - np.array([p["probabilities"] for p in uploaded])).max() <= 5e-7 + 1e-7
    assert head["parameters"]["model"] == uploaded[0]["model"]


def test_only_the_requested_output_and_json_bytes_as_base64(client):
    png = (SAMPLES / "6.png").read_bytes()
    body = {"id": "x1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {
        "content_type": "base64"}, "data": [base64.b64encode(png).decode()]}], "outputs": [{"name": "digit"}]}
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["id"] == "x1"
    assert answer["outputs"] == [{"name": "digit", "datatype": "INT64", "shape": [1], "data": [6]}]


def test_nested_json_data_is_accepted(client, digits):
    x, y = digits
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 28, 28], "data": x[:2].tolist()}]}
    answer = client.post(URL, json=body).get_json()
    assert answer["outputs"][1]["data"] == y[:2].tolist()


def test_protocol_error_through_the_client(triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        triton.infer("mnist", [infer_input("input", np.zeros((1, 28, 27), np.float32), "FP32")])
    assert raised.value.status() == "400" and "shape" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("digits", [infer_input("input", np.zeros((1, 28, 28), np.float32), "FP32")])
    assert raised.value.status() == "404" and "unknown model" in raised.value.message()


def test_v2_predictions_are_counted_in_metrics(client):
    def count():
        lines = client.get("/metrics", headers={server_app.INTERNAL_HEADER: "1"}).get_data(as_text=True).splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("mlk_predictions_total{"))

    before = count()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 784], "data": [0.0] * (3 * 784)}]}
    assert client.post(URL, json=body).status_code == 200
    assert count() == before + 3


# ---------------------------------------------------------------------------------- bad input


def fp32(shape, value=0.0, **extra):
    n = int(np.prod(shape))
    return {"inputs": [dict({"name": "input", "datatype": "FP32", "shape": list(shape), "data": [value] * n}, **extra)]}


def image_tensor(*blobs):
    """The BYTES input with each file base64-encoded in JSON (the content_type parameter says so)."""
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)], "parameters": {
        "content_type": "base64"}, "data": [base64.b64encode(b).decode() for b in blobs]}]}


def bomb_png():
    out = io.BytesIO()
    Image.new("1", (12000, 12000)).save(out, "PNG")
    return out.getvalue()


def binary_request(header, tail):
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


BAD_REQUESTS = {
    # name: (body (dict -> JSON, bytes -> raw), extra headers, status, text in the error)
    "not json": (b"{nope", {}, 400, "not valid JSON"),
    "json array": ([1, 2], {}, 400, "JSON object"),
    "no inputs": ({"outputs": [{"name": "digit"}]}, {}, 400, "exactly one"),
    "two inputs": ({"inputs": fp32((1, 784))["inputs"] * 2}, {}, 400, "exactly one"),
    "unknown input": ({"inputs": [dict(fp32((1, 784))["inputs"][0], name="x")]}, {}, 400, "unknown input 'x'"),
    "int32 datatype": ({"inputs": [dict(fp32((1, 784))["inputs"][0], datatype="INT32")]}, {}, 400, "FP32 or UINT8"),
    "bytes on input": ({"inputs": [dict(fp32((1, 784))["inputs"][0], datatype="BYTES")]}, {}, 400, "FP32 or UINT8"),
    "fp32 on image": ({"inputs": [dict(image_tensor(b"x")["inputs"][0], datatype="FP32")]}, {}, 400, "BYTES"),
    "shape 28x27": (fp32((1, 28, 27)), {}, 400, "[n, 28, 28] or [n, 784]"),
    "shape without batch": (fp32((784,)), {}, 400, "[n, 28, 28] or [n, 784]"),
    "negative shape": (fp32((1, 784)) | {"inputs": [dict(fp32((1, 784))["inputs"][0], shape=[-1, 784])]}, {}, 400,
                       "non-negative"),
    "empty batch": ({"inputs": [dict(fp32((1, 784))["inputs"][0], shape=[0, 784], data=[])]}, {}, 400, "empty"),
    "33 images": (fp32((33, 784)), {}, 400, "too many images in one request (33; limit 32)"),
    "33 encoded images": (image_tensor(*[b"x"] * 33), {}, 400, "too many images"),
    "too few values": ({"inputs": [dict(fp32((2, 784))["inputs"][0], data=[0.0] * 784)]}, {}, 400,
                       "784 values for shape [2, 784]"),
    "no data": ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784]}]}, {}, 400, "no \"data\""),
    "string values": (fp32((1, 784), "a"), {}, 400, "must be numbers"),
    "boolean values": (fp32((1, 784), True), {}, 400, "must be numbers"),
    "fp32 above 1": (fp32((1, 784), 255.0), {}, 400, "in [0, 1]"),
    "fp32 negative": (fp32((1, 784), -0.5), {}, 400, "in [0, 1]"),
    "fp32 nan": (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": ['
                 + b", ".join([b"NaN"] * 784) + b"]}]}", {}, 400, "finite"),
    "uint8 256": ({"inputs": [dict(fp32((1, 784), 256)["inputs"][0], datatype="UINT8")]}, {}, 400, "0-255"),
    "uint8 fraction": ({"inputs": [dict(fp32((1, 784), 1.5)["inputs"][0], datatype="UINT8")]}, {}, 400, "0-255"),
    "id not a string": (fp32((1, 784)) | {"id": 5}, {}, 400, "\"id\" must be a string"),
    "unknown output": (fp32((1, 784)) | {"outputs": [{"name": "logits"}]}, {}, 400, "unknown output 'logits'"),
    "bad base64": ({"inputs": [dict(image_tensor(b"x")["inputs"][0], data=["%%%"])]}, {}, 400, "not valid base64"),
    "bytes element not a string": ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [3]}]},
                                   {}, 400, "element 1 must be a string"),
    "bytes count mismatch": ({"inputs": [dict(image_tensor(b"x")["inputs"][0], shape=[2])]}, {}, 400,
                             "1 elements for shape [2]"),
    "not an image": (image_tensor(b"hello, world"), {}, 400, "element 1: not an image"),
    "second image corrupt": (image_tensor((SAMPLES / "6.png").read_bytes(), b"\x89PNG\r\n\x1a\nxx"), {}, 400,
                             "element 2:"),
    "decompression bomb": (image_tensor(bomb_png()), {}, 400, "too large"),
    "binary size mismatch": (binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "parameters": {"binary_data_size": 100}}]},
        b"\0" * 100), None, 400, "binary_data_size must be 3136"),
    "binary data short": (binary_request(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "parameters": {"binary_data_size": 784}}]},
        b"\0" * 700), None, 400, "ends after 700 of 784 bytes"),
    "binary data left over": (binary_request(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "parameters": {"binary_data_size": 784}}]},
        b"\0" * 790), None, 400, "6 bytes of binary data after"),
    "binary bytes element truncated": (binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
        struct.pack("<I", 100) + b"abcd"), None, 400, "longer than the binary data"),
    "header length not a number": (fp32((1, 784)), {"Inference-Header-Content-Length": "x"}, 400,
                                   "Inference-Header-Content-Length"),
    "header length past the body": (fp32((1, 784)), {"Inference-Header-Content-Length": "99999999"}, 400,
                                    "Inference-Header-Content-Length"),
    "unsupported encoding": (fp32((1, 784)), {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    "corrupt gzip": (b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    "gzip bomb": (gzip.compress(b" " * (3 * 1024 * 1024)), {"Content-Encoding": "gzip"}, 413, "too large"),
    "body over 2 MB": (b" " * (2 * 1024 * 1024 + 10), {}, 413, "request body too large (limit 2 MB)"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_gets_a_protocol_error(client, kind):
    body, headers, status, text = BAD_REQUESTS[kind]
    if isinstance(body, tuple):  # binary_request(...)
        body, headers = body
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(URL, data=data, headers=headers, content_type="application/json")
    assert response.status_code == status, (kind, response.status_code, response.get_data(as_text=True))
    assert response.is_json and set(response.get_json()) == {"error"}
    assert text in response.get_json()["error"], response.get_json()["error"]


@pytest.mark.parametrize("method,path,status", [
    ("post", "/v2/models/digits/infer", 404), ("get", "/v2/models/digits", 404), ("get", "/v2/models/digits/ready", 404),
    ("post", "/v2/models/mnist/versions/1/infer", 404), ("get", "/v2/models/mnist/versions/1", 404),
    ("get", URL, 405), ("post", "/v2/health/live", 405)])
def test_unknown_model_version_and_method(client, method, path, status):
    response = getattr(client, method)(path, json=fp32((1, 784)))
    assert response.status_code == status and isinstance(response.get_json()["error"], str)


def test_no_model_yet_is_503_not_ready(tmp_path):
    app = server_app.create_app(str(tmp_path / "missing.h5"))
    client = app.test_client()
    assert client.get("/v2/health/live").get_json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.get_json() == {"ready": False}
    model_ready = client.get("/v2/models/mnist/ready")
    assert model_ready.status_code == 503 and model_ready.get_json() == {"name": "mnist", "ready": False}
    assert client.get("/v2/models/mnist").status_code == 200  # metadata does not need the model
    response = client.post(URL, json=fp32((1, 784)))
    assert response.status_code == 503 and "no model" in response.get_json()["error"]
    assert str(tmp_path) not in response.get_data(as_text=True)
    bad = client.post(URL, json=fp32((1, 28, 27)))  # input checked before the model, as /api/predict does
    assert bad.status_code == 400


# ------------------------------------------------------------ what a hostile client can send (issue 28)


def one_line_error(response, status=400):
    assert response.status_code == status, (response.status_code, response.get_data()[:300])
    assert response.is_json and set(response.get_json()) == {"error"}
    error = response.get_json()["error"]
    assert "\n" not in error and len(error) <= 300
    return error


def uint8_input(data):
    return {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "data": data}]}


def test_json_nested_too_deeply_is_a_400_not_a_recursion_error(client):
    for body in (b"[" * 5000, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        assert "nested too deeply" in one_line_error(client.post(URL, data=body, content_type="application/json"))


@pytest.mark.parametrize("value", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e400", b"-1e400"])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_numbers_beyond_float64_are_a_400_not_an_overflow_error(client, value, datatype):
    body = (b'{"inputs": [{"name": "input", "datatype": "%s", "shape": [1, 784], "data": [' % datatype.encode()
            + b", ".join([value] + [b"0"] * 783) + b"]}]}")
    error = one_line_error(client.post(URL, data=body, content_type="application/json"))
    assert "[0, 1]" in error or "0-255" in error


@pytest.mark.parametrize("parameters,where", [({"binary_data_output": "false"}, "request"),
                                              ({"binary_data_output": 1}, "request"),
                                              ({"binary_data_output": None}, "request")])
def test_binary_data_output_must_be_a_boolean(client, parameters, where):
    error = one_line_error(client.post(URL, json=uint8_input([0] * 784) | {"parameters": parameters}))
    assert "\"binary_data_output\" must be a boolean" in error and error.startswith(where)


def test_binary_data_must_be_a_boolean_and_false_means_json(client):
    outputs = [{"name": "digit", "parameters": {"binary_data": "true"}}]
    error = one_line_error(client.post(URL, json=uint8_input([0] * 784) | {"outputs": outputs}))
    assert error.startswith("output 'digit': \"binary_data\" must be a boolean")
    as_json = client.post(URL, json=uint8_input([0] * 784) | {"parameters": {"binary_data_output": True}, "outputs": [
        {"name": "digit", "parameters": {"binary_data": False}}]})
    assert as_json.status_code == 200 and as_json.is_json and as_json.get_json()["outputs"][0]["data"] == [
        as_json.get_json()["outputs"][0]["data"][0]]


def test_an_output_requested_twice_is_a_400(client):
    error = one_line_error(client.post(URL, json=uint8_input([0] * 784) | {"outputs": [{"name": "digit"},
                                                                                        {"name": "digit"}]}))
    assert error == "output 'digit' is requested twice"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_must_end_cleanly_with_nothing_after(client, encoding):
    import zlib

    raw = json.dumps(uint8_input([0] * 784)).encode()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    headers = {"Content-Encoding": encoding}
    assert client.post(URL, data=packed, headers=headers, content_type="application/json").status_code == 200
    cut = one_line_error(client.post(URL, data=packed[:-3], headers=headers, content_type="application/json"))
    assert "ends before the end of the compressed stream" in cut
    trailing = one_line_error(client.post(URL, data=packed + b"junk", headers=headers, content_type="application/json"))
    assert "4 bytes after the compressed stream" in trailing
    twice = one_line_error(client.post(URL, data=packed + packed, headers=headers, content_type="application/json"))
    assert "after the compressed stream" in twice


def test_a_json_bytes_element_is_its_strings_utf8_bytes(client, monkeypatch):
    """The Open Inference Protocol's JSON tensor data holds a BYTES element as a string: its bytes are the
    string's UTF-8 (as Triton reads it); base64 only when the input's "content_type" parameter says so."""
    import v2

    seen = []
    real = v2.Predictor.images
    monkeypatch.setattr(v2.Predictor, "images", staticmethod(lambda blobs: seen.append(blobs) or real(blobs)))
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["héllo", "aGk="]}]}
    error = one_line_error(client.post(URL, json=body))
    assert seen == [["héllo".encode(), b"aGk="]] and error.startswith("input 'image' element 1: not an image")
    seen.clear()
    body["inputs"][0]["parameters"] = {"content_type": "base64"}
    body["inputs"][0]["data"] = ["aGk=", "aGk="]
    one_line_error(client.post(URL, json=body))
    assert seen == [[b"hi", b"hi"]]
    body["inputs"][0]["parameters"] = {"content_type": "hex"}
    assert "\"content_type\" must be \"base64\" or absent" in one_line_error(client.post(URL, json=body))
    lone_surrogate = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}'
    assert "not valid Unicode" in one_line_error(client.post(URL, data=lone_surrogate, content_type="application/json"))


def test_json_bytes_through_tritonclient_are_utf8_text(triton):
    """tritonclient sends a BYTES tensor with binary_data=False as JSON strings: they arrive as those bytes (here
    text, not an image: the answer names the image, not base64)."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        triton.infer("mnist", [infer_input("image", np.array([b"not a picture"], dtype=np.object_), "BYTES",
                                           binary=False)])
    assert raised.value.status() == "400" and "element 1: not an image" in raised.value.message()


@pytest.mark.parametrize("body,text", [
    ({"inputs": 5}, "exactly one"), ({"inputs": "abc"}, "exactly one"), ({"inputs": [5]}, "exactly one"),
    ({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2 ** 64, 784], "data": []}]}, "64-bit"),
    ({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "data": 5}]}, "must be a list"),
    ({"inputs": [{"name": "x" * 100_000}]}, "unknown input 'xxx"),
    ({"inputs": [{"name": "input", "datatype": "x\ny" * 1000}]}, "datatype must be FP32 or UINT8"),
    ({"inputs": uint8_input([0] * 784)["inputs"], "outputs": [{"name": ["digit"]}]}, "unknown output"),
    ({"inputs": uint8_input([0] * 784)["inputs"], "parameters": []}, "must be an object"),
])
def test_odd_json_is_a_short_one_line_400(client, body, text):
    assert text in one_line_error(client.post(URL, json=body))


@pytest.mark.parametrize("length", ["١٢", "+5", "1_0", "9" * 30, "-0"])
def test_header_length_must_be_ascii_digits(client, length):
    response = client.post(URL, data=json.dumps(uint8_input([0] * 784)), content_type="application/json",
                           headers={"Inference-Header-Content-Length": length})
    assert "Inference-Header-Content-Length" in one_line_error(response)


def test_unknown_model_name_is_echoed_short_and_on_one_line(client):
    error = one_line_error(client.get("/v2/models/" + "a%0Ab" * 500), 404)
    assert error.startswith("unknown model 'a\\nb") and len(error) < 120
