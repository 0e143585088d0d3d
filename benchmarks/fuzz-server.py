#!/usr/bin/env python3
"""Fuzz the prediction server with hypothesis: no input a client can send may reach the last-resort 500.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/fuzz-server.py [--cases 100000] [--seed N] [--model M.h5]

In this process, with a tiny model (tests/helpers.py tiny_model(0), saved in a temporary folder; --model to
use another) so that predictions are cheap, `--cases` generated inputs in all, shared among four targets:

    upload     create_app's test client: POST /api/predict and /upload with raw image/* bodies (valid images
               of every format read, mutated, or random bytes) and multipart bodies (file parts with and
               without filenames, other fields, odd boundaries, mutated), plus odd methods and paths
    multipart  fastpath.multipart_files and app.multipart_files on the same bodies directly (the fast path's
               answer, when it takes a body, must be werkzeug's)
    v2         the test client: POST /v2/models/mnist/infer with generated Open Inference Protocol requests
               (both inputs, JSON and binary tensor data, Inference-Header-Content-Length right or wrong,
               gzip/deflate whole, cut short or with trailing bytes, mutated JSON, deep nesting)
    v2-parse   v2's request parsing directly (decompress, parse_request, the tensor readers, requested_outputs)

A failure is an answer of 500 or more (the last-resort handler logged a traceback), an error answer that is
not {"error": one line}, or a parser raising anything but its own error. Prints cases/s, the statuses seen
and "0 uncaught exceptions", or the failing inputs (and exits 1). Exit 2 on bad arguments.
"""

import base64
import gzip
import io
import json
import logging
import os
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter

import _repo  # benchmarks/_repo.py: common/, the stage folders and tests/ on sys.path
from mlkcommon import Parser, int_at_least, parse_args

PROG = "fuzz-server.py"
WEIGHTS = {"upload": 0.35, "multipart": 0.2, "v2": 0.3, "v2-parse": 0.15}  # shares of --cases
SHOWN = 5  # failing inputs printed per target


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message}\n")
    parser.add_argument("--cases", type=int_at_least(len(WEIGHTS)), default=100_000,
                        help="generated inputs in all, shared among the targets (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0: the same cases each run)")
    parser.add_argument("--model", help="model .h5 to serve (default: a tiny untrained one, cheap to run)")
    return parser


# ------------------------------------------------------------------------------------------ inputs


def sample_images():
    """Small valid images of every format the server reads (and two it refuses), as bytes."""
    from PIL import Image

    out = []
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (10, 4, 16, 24))
    for image, fmt in [(digit, "PNG"), (digit.convert("RGB"), "JPEG"), (digit, "GIF"), (digit, "BMP"),
                       (digit.convert("RGBA"), "PNG"), (digit, "WEBP"), (digit, "TIFF"), (digit, "ICO"),
                       (Image.new("L", (300, 40), 255), "PNG")]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


def mutate(data, plan):
    """Bytes `data` with the mutations of `plan` applied: cut, a byte replaced, bytes inserted or deleted."""
    data = bytearray(data)
    for kind, where, byte, inserted, deleted in plan:
        at = where % (len(data) + 1)
        if kind == "cut":
            del data[at:]
        elif kind == "flip" and at < len(data):
            data[at] = byte
        elif kind == "insert":
            data[at:at] = inserted
        elif kind == "delete":
            del data[at:at + deleted]
    return bytes(data)


def strategies():
    """The hypothesis strategies of each target's inputs (built once hypothesis is imported)."""
    from hypothesis import strategies as st

    images = sample_images()

    # A mutation: (kind, where, byte, inserted bytes, how many deleted), where taken modulo the length + 1.
    mutations = st.lists(st.tuples(st.sampled_from(["cut", "flip", "insert", "delete"]), st.integers(0, 1 << 20),
                                   st.integers(0, 255), st.binary(max_size=16), st.integers(1, 16)), max_size=3)
    maybe_mutations = st.one_of(st.just([]), mutations)

    image_bytes = st.one_of(st.tuples(st.sampled_from(images), mutations).map(lambda pair: mutate(*pair)),
                            st.binary(max_size=300), st.sampled_from(images), st.just(b""))
    token = st.text(st.characters(codec="latin-1", exclude_characters="\x00"), max_size=12)
    header_token = st.text(st.characters(codec="latin-1", exclude_characters="\x00\r\n"), max_size=12)  # as HTTP
    header_text = st.text(st.characters(codec="latin-1", exclude_characters="\x00\r\n"), max_size=4)  # has them

    @st.composite
    def multipart(draw):
        """(body, Content-Type): a multipart body of the plain shape, or that shape mutated."""
        boundary = draw(st.one_of(st.just("bnd"), st.text("abcXYZ019'()+_,-./:=?", min_size=1, max_size=72)))
        parts = []
        for _ in range(draw(st.integers(0, 4))):
            name = draw(st.one_of(st.just("file"), token))
            filename = draw(st.one_of(st.none(), st.just("d.png"), token))
            disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
            headers = [f"Content-Disposition: {disposition}"]
            if draw(st.booleans()):
                headers.append(f"Content-Type: {draw(st.sampled_from(['image/png', 'text/plain', 'x']))}")
            if draw(st.integers(0, 9)) == 0:
                headers.append(f"{draw(token)}: {draw(token)}")
            head = "\r\n".join(headers).encode("latin-1", "replace")
            parts.append(b"--" + boundary.encode("latin-1") + b"\r\n" + head + b"\r\n\r\n" + draw(image_bytes) + b"\r\n")
        body = mutate(b"".join(parts) + b"--" + boundary.encode("latin-1") + b"--\r\n", draw(maybe_mutations))
        quoted = draw(st.booleans())
        content_type = draw(st.sampled_from(["multipart/form-data", "Multipart/Form-Data", "multipart/mixed"]))
        content_type += f'; boundary="{boundary}"' if quoted else f"; boundary={boundary}"
        if draw(st.integers(0, 9)) == 0:
            content_type = draw(header_token)
        return body, content_type

    upload = st.one_of(
        st.tuples(st.sampled_from(["image/png", "image/jpeg", "image/x-odd", "IMAGE/PNG"]), image_bytes),
        multipart().map(lambda pair: (pair[1], pair[0])))
    request = st.tuples(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "ZZZAAA"]),
                        st.sampled_from(["/api/predict"] * 6 + ["/upload"] * 2 + ["/", "/metrics", "/nope/x"]),
                        upload)

    # --- the Open Inference Protocol
    json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.integers(), st.floats(),
                            st.text(max_size=8))
    json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                   st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4)), max_leaves=12)
    name = st.one_of(st.sampled_from(["input", "image"]), st.text(max_size=6), json_scalar)
    datatype = st.one_of(st.sampled_from(["FP32", "UINT8", "BYTES", "INT64", "FP16"]), json_scalar)
    shape = st.one_of(st.sampled_from([[1, 784], [2, 28, 28], [1, 28, 28], [1], [2], [0, 784], [33, 784]]),
                      st.lists(st.one_of(st.integers(-2, 40), st.integers(), json_scalar), max_size=4), json_value)
    number = st.one_of(st.integers(0, 255), st.floats(0, 1), st.integers(), st.floats(), st.booleans(),
                       st.text(max_size=3))

    data_value = st.one_of(number, st.text(max_size=20), st.binary(max_size=60).map(
        lambda b: base64.b64encode(b).decode()))
    encoded_images = st.lists(image_bytes.map(lambda b: base64.b64encode(b).decode()), max_size=3)
    numbers = st.lists(number, max_size=8)

    def tensor_data(draw, shape_):
        """JSON data for a tensor: the right count of one value (flat or nested), a few values, or anything."""
        count, dims = 1, None
        if isinstance(shape_, list) and shape_ and all(isinstance(d, int) and not isinstance(d, bool)
                                                       and 0 <= d <= 40 * 784 for d in shape_):
            dims = shape_
            for d in shape_:
                count *= d
        kind = draw(st.integers(0, 5))
        if kind <= 2 and dims and count <= 40 * 784:
            value = draw(data_value)
            flat = [value] * count
            row = count // dims[0] if dims[0] else 0
            if kind == 1 and len(dims) > 1 and row:
                return [flat[i:i + row] for i in range(0, count, row)]
            return flat
        if kind == 3:
            return draw(encoded_images)
        if kind == 4:
            return draw(numbers)
        return draw(json_value)

    parameters = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "binary_data_size": st.one_of(st.integers(-5, 4000), json_scalar),
        "content_type": st.one_of(st.just("base64"), json_scalar),
        "binary_data_output": st.one_of(st.booleans(), json_scalar),
        "binary_data": st.one_of(st.booleans(), json_scalar)}), json_value)

    @st.composite
    def tensor(draw):
        shape_ = draw(shape)
        out = {"name": draw(name), "datatype": draw(datatype), "shape": shape_}
        if draw(st.integers(0, 4)):
            out["data"] = tensor_data(draw, shape_)
        params = draw(parameters)
        if params is not None:
            out["parameters"] = params
        return out

    inputs = st.one_of(st.lists(tensor(), min_size=1, max_size=2), json_value)
    requested = st.one_of(st.lists(st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["probabilities", "digit"]), json_scalar)},
        optional={"parameters": parameters}), max_size=3), json_value)
    extra = st.one_of(st.text(max_size=8), parameters, json_value)

    def well_formed(draw):
        """(request dict, binary tail) the server answers 200 (mostly: the image may be mutated)."""
        n = draw(st.integers(1, 3))
        kind = draw(st.integers(0, 3))
        if kind == 0:  # numbers in JSON
            datatype = draw(st.sampled_from(["FP32", "UINT8"]))
            value = draw(st.floats(0, 1) if datatype == "FP32" else st.integers(0, 255))
            shape = draw(st.sampled_from([[n, 784], [n, 28, 28]]))
            return {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": [value] * (n * 784)}]}, b""
        if kind == 1:  # numbers as binary tensor data
            datatype = draw(st.sampled_from(["FP32", "UINT8"]))
            tail = (b"\x00\x00\x00\x3f" if datatype == "FP32" else b"\x80") * (n * 784)
            return {"inputs": [{"name": "input", "datatype": datatype, "shape": [n, 784],
                                "parameters": {"binary_data_size": len(tail)}}],
                    "parameters": {"binary_data_output": draw(st.booleans())}}, tail
        blobs = [draw(image_bytes) for _ in range(n)]
        if kind == 2:  # encoded images base64 in JSON
            return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "parameters": {
                "content_type": "base64"}, "data": [base64.b64encode(b).decode() for b in blobs]}]}, b""
        tail = b"".join(struct.pack("<I", len(b)) + b for b in blobs)  # encoded images as binary tensor data
        return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n],
                            "parameters": {"binary_data_size": len(tail)}}]}, tail

    @st.composite
    def v2_request(draw):
        """(body bytes, headers) of an inference request."""
        if draw(st.integers(0, 2)) == 0:
            body, tail = well_formed(draw)
            head = json.dumps(body).encode()
            headers = {"Inference-Header-Content-Length": str(len(head))} if tail else {}
            return head + tail, headers
        body = {}
        if draw(st.integers(0, 9)):
            body["inputs"] = draw(inputs)
        if draw(st.booleans()):
            body["outputs"] = draw(requested)
        for key in ("id", "parameters"):
            if draw(st.integers(0, 3)) == 0:
                body[key] = draw(extra)
        head = json.dumps(body).encode()
        shape_kind = draw(st.integers(0, 9))
        if shape_kind == 0:
            head = mutate(head, draw(mutations))
        elif shape_kind == 1:
            depth = draw(st.integers(1, 20_000))
            head = b"[" * depth + draw(st.sampled_from([b"", b"]" * depth, b"1"]))
        tail = b""
        headers = {}
        if draw(st.integers(0, 2)) == 0:
            blobs = [draw(image_bytes) for _ in range(draw(st.integers(0, 2)))]
            tail = [draw(st.binary(max_size=64)), b"".join(struct.pack("<I", len(b)) + b for b in blobs),
                    bytes(784), b"\x00\x00\x80\x3f" * 784][draw(st.integers(0, 3))]
            kind = draw(st.integers(0, 3))
            length = str(len(head)) if kind < 2 else str(len(head) + draw(st.integers(-3, 3))) if kind == 2 else \
                draw(header_text)
            headers["Inference-Header-Content-Length"] = length
        raw = head + tail
        encoding = draw(st.sampled_from([None] * 6 + ["gzip", "deflate", "identity", "br"]))
        if encoding in ("gzip", "deflate"):
            raw = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
            raw = mutate(raw, draw(maybe_mutations)) + draw(st.sampled_from([b""] * 3 + [b"x", b"\x1f\x8b"]))
        if encoding:
            headers["Content-Encoding"] = encoding
        return raw, headers

    return {"upload": request, "multipart": multipart(), "v2": v2_request(), "v2-parse": v2_request()}


# ------------------------------------------------------------------------------------------ checks


class Fuzz:
    """The targets, their checks, and what they saw."""

    def __init__(self, model_path):
        import app as server_app
        import fastpath
        import v2

        self.app_module, self.fastpath, self.v2 = server_app, fastpath, v2
        self.app = server_app.create_app(model_path)
        self.client = self.app.test_client()
        self.statuses = {target: Counter() for target in WEIGHTS}
        self.cases = Counter()
        self.failures = {target: [] for target in WEIGHTS}
        self.logged = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.logged.append(record) if record.exc_info else None
        logger = logging.getLogger("mlk.server")  # its tracebacks to self.logged, nothing to the terminal
        self.restore = (logger.level, logger.propagate)
        logger.addHandler(self.handler)
        logger.setLevel(logging.ERROR)
        logger.propagate = False

    def close(self):
        logger = logging.getLogger("mlk.server")
        logger.removeHandler(self.handler)
        logger.level, logger.propagate = self.restore

    def fail(self, target, what, data):
        failures = self.failures[target]
        failures.append((what, data))

    def check_answer(self, target, response, data):
        """An answer to a client: under 500, and an error one is {"error": one line}."""
        status = response.status_code
        self.statuses[target][status] += 1
        if status >= 500:
            self.fail(target, f"status {status}: {response.get_data()[:200]!r}", data)
        elif status >= 400 and not (response.mimetype == "text/html" and data[1] == "/upload"):
            payload = response.get_json(silent=True)
            error = payload.get("error") if isinstance(payload, dict) else None
            if not isinstance(error, str) or "\n" in error or "\r" in error:
                self.fail(target, f"status {status}: not a one-line JSON error: {response.get_data()[:200]!r}", data)
        if self.logged:
            self.fail(target, f"logged a traceback: {self.logged[-1].getMessage()}", data)
            self.logged.clear()

    def upload(self, case):
        method, path, (content_type, body) = case
        response = self.client.open(path, method=method, data=body, content_type=content_type)
        self.check_answer("upload", response, (method, path, content_type, body))

    def multipart(self, case):
        body, content_type = case
        from werkzeug.http import parse_options_header

        mimetype, options = parse_options_header(content_type)
        boundary = options.get("boundary")
        try:
            fast = self.fastpath.multipart_files(body, boundary, max_files=32)
        except Exception as err:  # noqa: BLE001 - what the fuzzing looks for
            self.fail("multipart", f"fastpath.multipart_files raised {type(err).__name__}: {err}", case)
            return
        try:
            slow = self.app_module.multipart_files(body, boundary)
        except self.app_module.ImageError:
            slow = "ImageError"
        except Exception as err:  # noqa: BLE001
            self.fail("multipart", f"app.multipart_files raised {type(err).__name__}: {err}", case)
            return
        self.statuses["multipart"]["fast path took it" if fast is not None else "Flask's"] += 1
        if fast is not None and fast != slow:
            self.fail("multipart", f"the fast path read {fast!r:.120} where werkzeug read {slow!r:.120}", case)

    def v2_answer(self, case):
        raw, headers = case
        response = self.client.post("/v2/models/mnist/infer", data=raw, headers=headers,
                                    content_type="application/json")
        self.check_answer("v2", response, (raw, "/v2", headers))

    def v2_parse(self, case):
        raw, headers = case
        v2 = self.v2
        try:
            body = v2.decompress(raw, headers.get("Content-Encoding"), 2 * 1024 * 1024)
            request, tail = v2.parse_request(body, headers.get(v2.HEADER_LENGTH))
            v2.requested_outputs(request)
            inputs = request.get("inputs")
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
                reader = v2.read_image_tensor if inputs[0].get("name") == "image" else v2.read_input_tensor
                reader(inputs[0], tail, 0, 32)
            self.statuses["v2-parse"]["parsed"] += 1
        except v2.ProtocolError as err:
            self.statuses["v2-parse"][err.status] += 1
            if "\n" in err.message:
                self.fail("v2-parse", f"a multi-line message: {err.message[:200]!r}", case)
        except Exception as err:  # noqa: BLE001 - what the fuzzing looks for
            self.fail("v2-parse", f"raised {type(err).__name__}: {err}", case)


def counted(fuzz, name, target):
    """target(case), counted as one case of `name`."""
    def one(case):
        fuzz.cases[name] += 1
        target(case)

    return one


def run(fuzz, cases, seed):
    """Each target for its share of `cases` generated inputs -> seconds taken."""
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings

    targets = {"upload": fuzz.upload, "multipart": fuzz.multipart, "v2": fuzz.v2_answer, "v2-parse": fuzz.v2_parse}
    strategies_ = strategies()
    started = time.perf_counter()
    for name, weight in WEIGHTS.items():
        test = settings(max_examples=max(1, round(cases * weight)), database=None, deadline=None,
                        phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
            given(strategies_[name])(counted(fuzz, name, targets[name])))
        hypothesis_seed(seed)(test)()
    return time.perf_counter() - started


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from helpers import tiny_model

            model = os.path.join(tmp, "model.h5")
            tiny_model(0).save(model)
        fuzz = Fuzz(model)
        try:
            seconds = run(fuzz, args.cases, args.seed)
        finally:
            fuzz.close()
    total = sum(fuzz.cases.values())
    print(f"{total} cases in {seconds:.1f} s: {total / seconds:.0f} cases/s (seed {args.seed})")
    for name in WEIGHTS:
        seen = ", ".join(f"{status}: {count}" for status, count in sorted(fuzz.statuses[name].items(), key=str))
        print(f"  {name:9} {fuzz.cases[name]:7} cases; {seen}")
    failures = sum(len(f) for f in fuzz.failures.values())
    if not failures:
        print("0 uncaught exceptions")
        return 0
    print(f"{failures} failing inputs:")
    for name, found in fuzz.failures.items():
        for what, data in found[:SHOWN]:
            print(f"  {name}: {what}\n    input: {data!r:.600}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
