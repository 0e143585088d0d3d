"""Open Inference Protocol (KServe / Triton "v2") REST endpoints of the prediction server, as a Flask blueprint.

    GET  /v2                           server metadata
    GET  /v2/health/live               {"live": true}
    GET  /v2/health/ready              {"ready": bool} (503 until a model is loaded)
    GET  /v2/models/mnist              model metadata
    GET  /v2/models/mnist/ready        {"name": "mnist", "ready": bool} (503 until a model is loaded)
    POST /v2/models/mnist/infer        inference

The request, the response, the binary tensor data extension, the errors and the limits are in
docs/CONTRACTS.md, "Open Inference Protocol". In short: one input, either `input` (FP32 in [0, 1] or
UINT8 0-255, shape [n, 28, 28] or [n, 784], already MNIST-like: bright ink on a dark ground, centred)
or `image` (BYTES, shape [n]: encoded image files, preprocessed exactly as uploads to /api/predict);
outputs `probabilities` (FP32 [n, 10]) and `digit` (INT64 [n]); 1 <= n <= 32 (the upload API's file
limit), bodies up to 2 MB (app.py's MAX_BODY), images up to 40 megapixels. Errors: the status code and
the protocol's error object `{"error": "<reason>"}`.

`create_blueprint(predictor, ...)` gets the server's one `predictor.Predictor` from `app.create_app`, so
the v2 routes share the model, the hot reload, the gate, the batcher, the pipeline (preprocessing, the mean
over an upload's views, `prediction_json`'s digit) and the metrics with the server's own routes.
"""

import base64
import binascii
import json
import struct
import zlib

import numpy as np
from flask import Blueprint, Response, jsonify, request

from predictor import ModelNotReady, Predictor, UploadImageError

MODEL_NAME = "mnist"
SERVER_NAME = "mlk-mnist"
SERVER_VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
PIXELS = 28 * 28

INPUT_TENSOR = "input"  # FP32 / UINT8 [n, 28, 28] or [n, 784]
IMAGE_TENSOR = "image"  # BYTES [n]
OUTPUTS = ("probabilities", "digit")
OUTPUT_TYPES = {"probabilities": "FP32", "digit": "INT64"}

METADATA = {
    "name": MODEL_NAME,
    "versions": [],
    "platform": "tensorflow_keras",
    "inputs": [
        {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, 28, 28]},
        {"name": IMAGE_TENSOR, "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "digit", "datatype": "INT64", "shape": [-1]},
    ],
}


class ProtocolError(Exception):
    """A request the protocol answers with `status` and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message):
    return ProtocolError(400, message)


def one_line(text, limit=200):
    """A message (or an exception's text) as one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value, limit=40):
    """What a client sent, quoted for an error message: repr() (one line), at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def boolean_parameter(params, name, default, where):
    """A boolean parameter of the binary tensor data extension (binary_data, binary_data_output): a JSON
    boolean, or absent (default); anything else (the string "false", 0, ...) is a 400."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise bad(f"{where}\"{name}\" must be a boolean (true or false), got {shown(value)}")
    return value


# ------------------------------------------------------------------------------------ request body


def decompress(raw, encoding, limit):
    """The body as sent with Content-Encoding gzip / deflate / identity, at most `limit` bytes decoded."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(415, f"unsupported Content-Encoding {shown(encoding)} (gzip, deflate or none)")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = decoder.decompress(raw, limit + 1)
    except zlib.error as err:
        raise bad(f"body is not valid {encoding} data ({one_line(err)})") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise ProtocolError(413, f"request body too large once decompressed (limit {limit // (1024 * 1024)} MB)")
    if not decoder.eof:
        raise bad(f"body is not valid {encoding} data (it ends before the end of the compressed stream)")
    if decoder.unused_data:
        raise bad(f"body is not valid {encoding} data ({len(decoder.unused_data)} bytes after the compressed "
                  "stream)")
    return out


def split_body(raw, header_length):
    """(JSON header bytes, binary tail) per the binary tensor data extension's header."""
    if header_length is None:
        return raw, b""
    text = header_length.strip()
    size = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else -1
    if not 0 <= size <= len(raw):
        raise bad(f"{HEADER_LENGTH} must be an integer between 0 and the body size ({len(raw)}), "
                  f"got {shown(header_length)}")
    return raw[:size], raw[size:]


def parse_request(raw, header_length):
    """-> (request dict, binary tail). The JSON must be an object with a list "inputs"."""
    head, tail = split_body(raw, header_length)
    try:
        body = json.loads(head)
    except RecursionError:
        raise bad("request is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"request is not valid JSON ({one_line(err)})") from None
    if not isinstance(body, dict):
        raise bad("request must be a JSON object with \"inputs\"")
    if "id" in body and not isinstance(body["id"], str):
        raise bad("\"id\" must be a string")
    inputs = body.get("inputs") if isinstance(body.get("inputs"), list) else []
    for where, params in [("request", body.get("parameters"))] + [
            (f"input {i + 1}", t.get("parameters")) for i, t in enumerate(inputs) if isinstance(t, dict)]:
        if params is not None and not isinstance(params, dict):
            raise bad(f"{where} \"parameters\" must be an object")
    return body, tail


def positive_shape(shape):
    """A tensor's shape: a list of integers each representable as an unsigned 64-bit integer (the spec)."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 64
                                              for d in shape):
        raise bad(f"\"shape\" must be a list of non-negative 64-bit integers, got {shown(shape)}")
    return shape


def batch_size(n, max_items):
    if n < 1:
        raise bad("the batch is empty (first dimension 0)")
    if n > max_items:
        raise bad(f"too many images in one request ({n}; limit {max_items})")
    return n


def flat_json_data(data, what):
    """JSON tensor data (flat or nested lists) -> a flat list."""
    if not isinstance(data, list):
        raise bad(f"{what}: \"data\" must be a list")
    out = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def read_input_tensor(tensor, tail, offset, max_items):
    """The `input` tensor -> float32 (n, 28, 28) in [0, 1], and the new offset into the binary tail."""
    datatype = tensor.get("datatype")
    if datatype not in ("FP32", "UINT8"):
        raise bad(f"input {INPUT_TENSOR!r}: datatype must be FP32 or UINT8, got {shown(datatype)}")
    shape = positive_shape(tensor.get("shape"))
    if shape[1:] not in ([28, 28], [PIXELS]):
        raise bad(f"input {INPUT_TENSOR!r}: shape must be [n, 28, 28] or [n, 784], got {shown(shape)}")
    n = batch_size(shape[0], max_items)
    count = n * PIXELS
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        itemsize = 4 if datatype == "FP32" else 1
        if not isinstance(size, int) or isinstance(size, bool) or size != count * itemsize:
            raise bad(f"input {INPUT_TENSOR!r}: binary_data_size must be {count * itemsize} for shape {shape} "
                      f"{datatype}, got {shown(size)}")
        if offset + size > len(tail):
            raise bad(f"input {INPUT_TENSOR!r}: binary data ends after {len(tail) - offset} of {size} bytes")
        values = np.frombuffer(tail, dtype="<f4" if datatype == "FP32" else np.uint8, count=count, offset=offset)
        offset += size
    else:
        if "data" not in tensor:
            raise bad(f"input {INPUT_TENSOR!r}: no \"data\" and no binary_data_size")
        flat = flat_json_data(tensor["data"], f"input {INPUT_TENSOR!r}")
        if len(flat) != count:
            raise bad(f"input {INPUT_TENSOR!r}: {len(flat)} values for shape {shape} ({count} expected)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise bad(f"input {INPUT_TENSOR!r}: data must be numbers")
        if any(isinstance(v, int) and not -256 <= v <= 256 for v in flat):  # 10**400: float64 overflows
            raise bad(f"input {INPUT_TENSOR!r}: {datatype} values must be in "
                      f"{'[0, 1]' if datatype == 'FP32' else '0-255'}")
        values = np.asarray(flat, dtype=np.float64)
    if datatype == "FP32":
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
            raise bad(f"input {INPUT_TENSOR!r}: FP32 values must be finite and in [0, 1] (MNIST form; "
                      "send 0-255 as UINT8)")
        images = values
    else:
        if values.dtype != np.uint8 and (np.any(values != np.round(values)) or values.min() < 0 or values.max() > 255):
            raise bad(f"input {INPUT_TENSOR!r}: UINT8 values must be integers 0-255")
        images = values.astype(np.float32) / 255.0
    return images.reshape(n, 28, 28), offset


def read_image_tensor(tensor, tail, offset, max_items):
    """The `image` tensor -> list of n encoded files (bytes), and the new offset into the binary tail."""
    datatype = tensor.get("datatype")
    if datatype != "BYTES":
        raise bad(f"input {IMAGE_TENSOR!r}: datatype must be BYTES, got {shown(datatype)}")
    shape = positive_shape(tensor.get("shape"))
    if len(shape) != 1:
        raise bad(f"input {IMAGE_TENSOR!r}: shape must be [n], got {shown(shape)}")
    n = batch_size(shape[0], max_items)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    blobs = []
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
            raise bad(f"input {IMAGE_TENSOR!r}: binary_data_size {shown(size)} does not fit the "
                      f"{len(tail) - offset} bytes of binary data left")
        end, pos = offset + size, offset
        while pos < end:  # elements: 4-byte little-endian length, then the bytes
            if pos + 4 > end:
                raise bad(f"input {IMAGE_TENSOR!r}: element {len(blobs) + 1} has a truncated length prefix")
            (length,) = struct.unpack_from("<I", tail, pos)
            if pos + 4 + length > end:
                raise bad(f"input {IMAGE_TENSOR!r}: element {len(blobs) + 1} is longer than the binary data")
            blobs.append(tail[pos + 4:pos + 4 + length])
            pos += 4 + length
        offset = end
    else:
        if "data" not in tensor:
            raise bad(f"input {IMAGE_TENSOR!r}: no \"data\" and no binary_data_size")
        content_type = (tensor.get("parameters") or {}).get("content_type")
        if content_type not in (None, "base64"):
            raise bad(f"input {IMAGE_TENSOR!r}: parameter \"content_type\" must be \"base64\" or absent, "
                      f"got {shown(content_type)}")
        for index, item in enumerate(flat_json_data(tensor["data"], f"input {IMAGE_TENSOR!r}")):
            if not isinstance(item, str):
                raise bad(f"input {IMAGE_TENSOR!r}: element {index + 1} must be a string")
            if content_type is None:  # the spec's JSON string: the element is its UTF-8 bytes (as Triton reads it)
                try:
                    blobs.append(item.encode("utf-8"))
                except UnicodeEncodeError:  # a lone surrogate ("\ud800") has no UTF-8 form
                    raise bad(f"input {IMAGE_TENSOR!r}: element {index + 1} is not valid Unicode text") from None
                continue
            try:
                blobs.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise bad(f"input {IMAGE_TENSOR!r}: element {index + 1} is not valid base64") from None
    if len(blobs) != n:
        raise bad(f"input {IMAGE_TENSOR!r}: {len(blobs)} elements for shape {shape}")
    return blobs, offset


def requested_outputs(body):
    """[(name, binary)] in the order the request asks for them (default: both outputs), each name once."""
    default_binary = boolean_parameter(body.get("parameters") or {}, "binary_data_output", False, "request ")
    wanted = body.get("outputs")
    if wanted is None:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(wanted, list) or not wanted:
        raise bad("\"outputs\" must be a non-empty list of {\"name\": ...}")
    result = []
    for item in wanted:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in OUTPUTS:
            raise bad(f"unknown output {shown(name)} (outputs: {', '.join(OUTPUTS)})")
        if any(name == seen for seen, _ in result):
            raise bad(f"output {name!r} is requested twice")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"output {name!r}: \"parameters\" must be an object")
        result.append((name, boolean_parameter(params, "binary_data", default_binary, f"output {name!r}: ")))
    return result


# ------------------------------------------------------------------------------------------ blueprint


def create_blueprint(predictor, max_items, max_body):
    """The /v2 routes. predictor: the server's predictor.Predictor (the model for the health answers, and every
    inference); max_items: the most images in one request; max_body: the most bytes of a decompressed body."""
    bp = Blueprint("v2", __name__, url_prefix="/v2")
    ready_model = predictor.ready_model

    @bp.errorhandler(ProtocolError)
    def protocol_error(err):
        return jsonify(error=one_line(err.message, 300)), err.status

    def check_model(name):
        if name != MODEL_NAME:
            raise ProtocolError(404, f"unknown model {shown(name)} (this server serves {MODEL_NAME!r})")

    @bp.get("")
    def server_metadata():
        return jsonify(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @bp.get("/health/live")
    def live():
        return jsonify(live=True)

    @bp.get("/health/ready")
    def ready():
        ok = ready_model() is not None
        return jsonify(ready=ok), 200 if ok else 503

    @bp.get("/models/<name>")
    def model_metadata(name):
        check_model(name)
        return jsonify(METADATA)

    @bp.get("/models/<name>/ready")
    def model_ready(name):
        check_model(name)
        ok = ready_model() is not None
        return jsonify(name=MODEL_NAME, ready=ok), 200 if ok else 503

    @bp.route("/models/<name>/versions/<version>", methods=["GET"])
    @bp.route("/models/<name>/versions/<version>/<path:rest>", methods=["GET", "POST"])
    def versioned(name, version, rest=None):
        check_model(name)
        raise ProtocolError(404, f"model versions are not supported: use /v2/models/{MODEL_NAME}/...")

    @bp.post("/models/<name>/infer")
    def infer(name):
        check_model(name)
        raw = decompress(request.get_data(cache=False), request.headers.get("Content-Encoding"), max_body)
        body, tail = parse_request(raw, request.headers.get(HEADER_LENGTH))
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise bad(f"\"inputs\" must be a list of exactly one tensor: {INPUT_TENSOR!r} (FP32/UINT8 "
                      f"[n, 28, 28] or [n, 784]) or {IMAGE_TENSOR!r} (BYTES [n])")
        tensor = inputs[0]
        outputs = requested_outputs(body)
        tensor_name = tensor.get("name")
        if tensor_name == INPUT_TENSOR:
            arrays, offset = read_input_tensor(tensor, tail, 0, max_items)
            images = Predictor.arrays(arrays)
        elif tensor_name == IMAGE_TENSOR:
            blobs, offset = read_image_tensor(tensor, tail, 0, max_items)
            try:  # preprocessed as uploads to /api/predict (a thick-stroked one: the mean of its two views)
                images = Predictor.images(blobs)
            except UploadImageError as err:  # 400; 413 over the request's pixel budget; 415 a format not read
                raise ProtocolError(err.status if err.status in (400, 413, 415) else 400,
                                    f"input {IMAGE_TENSOR!r} element {err.index + 1}: {err.reason}") from None
        else:
            raise bad(f"unknown input {shown(tensor_name)} (inputs: {INPUT_TENSOR!r}, {IMAGE_TENSOR!r})")
        if offset != len(tail):
            raise bad(f"{len(tail) - offset} bytes of binary data after the last input's binary_data_size")
        try:
            predicted = predictor.predict(images)
        except ModelNotReady as err:
            raise ProtocolError(503, str(err)) from None
        # The tensors of the results /api/predict would give: the unrounded probabilities, prediction_json's digits.
        probabilities = np.asarray(predicted.probabilities, dtype=np.float32)
        digits = np.array([result["digit"] for result in predicted.results], dtype=np.int64)
        return response(body, outputs, probabilities, digits, predicted.results[0]["model"])

    def response(body, outputs, probabilities, digits, model):
        values = {"probabilities": probabilities, "digit": digits}
        result = {"model_name": MODEL_NAME}
        if "id" in body:
            result["id"] = body["id"]
        result["parameters"] = {"model": model}
        result["outputs"] = []
        chunks = []
        for name, binary in outputs:
            array = values[name]
            entry = {"name": name, "datatype": OUTPUT_TYPES[name], "shape": list(array.shape)}
            if binary:
                data = array.astype("<f4" if name == "probabilities" else "<i8").tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                entry["data"] = [float(v) for v in array.ravel()] if name == "probabilities" else \
                    [int(v) for v in array.ravel()]
            result["outputs"].append(entry)
        head = json.dumps(result).encode()
        if not chunks:
            return Response(head, 200, mimetype="application/json")
        return Response(head + b"".join(chunks), 200, mimetype="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(head))})

    return bp
