"""The hot path of POST /api/predict: a WSGI layer in front of the Flask app that answers the plain requests
without Flask's routing, request and response objects (about a third of a request's CPU, measured:
docs/serving.md).

`FastPath(flask_wsgi, answer, record, max_body, max_files)` takes a POST /api/predict whose body is a raw
image/* body or a multipart/form-data body of the plain shape browsers, curl and requests send
(`multipart_files`), hands the images to `answer` -- the same function Flask's route calls, so the same
predictions, errors and metrics -- and writes its (status, payload) as the same status line, headers and
JSON bytes Flask's jsonify would. Any request it does not take whole goes to `flask_wsgi` with its body
untouched, so every other answer (413, a malformed body, ...) is still Flask's own.
"""

import io
import json
import logging
import time

from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

PATH = "/api/predict"

STATUS_LINES = {200: "200 OK", 400: "400 BAD REQUEST", 413: "413 REQUEST ENTITY TOO LARGE",
                415: "415 UNSUPPORTED MEDIA TYPE", 500: "500 INTERNAL SERVER ERROR",
                503: "503 SERVICE UNAVAILABLE"}  # as werkzeug spells them

log = logging.getLogger("mlk.server")


class FastPath:
    """The WSGI app: POST /api/predict with a plain body here, everything else to flask_wsgi.

    answer(list of bytes) -> (status, JSON payload): the route's own answer (status one of STATUS_LINES: 400 a
    bad image, 413 over the request's pixel budget, 415 an image format not read, 503 no model);
    record(status, seconds): count the request in the route's metrics, as Flask's after_request would;
    max_body: the largest Content-Length taken (Flask's MAX_CONTENT_LENGTH); max_files: the most `file` parts.
    """

    def __init__(self, flask_wsgi, answer, record, max_body, max_files):
        self.flask_wsgi = flask_wsgi
        self.answer = answer
        self.record = record
        self.max_body = max_body
        self.max_files = max_files

    def __call__(self, environ, start_response):
        flask_wsgi = self.flask_wsgi
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return flask_wsgi(environ, start_response)
        started = time.perf_counter()
        length = environ.get("CONTENT_LENGTH")
        if not length or not (length.isascii() and length.isdigit()) or int(length) > self.max_body:
            return flask_wsgi(environ, start_response)  # chunked, malformed or too large: Flask's answers
        mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
        mimetype = mimetype.lower()
        if not (mimetype.startswith("image/") or mimetype == "multipart/form-data"):
            return flask_wsgi(environ, start_response)
        body = environ["wsgi.input"].read(int(length))
        blobs = None
        if len(body) == int(length):
            blobs = [body] if mimetype.startswith("image/") else multipart_files(body, options.get("boundary"),
                                                                                 self.max_files)
        if blobs is None:
            environ["wsgi.input"] = io.BytesIO(body)
            return flask_wsgi(environ, start_response)
        try:
            status, payload = self.answer(blobs)
        except Exception:  # noqa: BLE001 - as Flask's last-resort handler: log, JSON 500, worker alive
            log.exception("unexpected error")
            status, payload = 500, {"error": "internal error"}
        self.record(status, time.perf_counter() - started)
        return json_answer(start_response, status, payload)


def json_answer(start_response, status, payload):
    """The payload as Flask's jsonify writes it (sorted keys, compact, ASCII, a final newline)."""
    data = (json.dumps(payload, ensure_ascii=True, sort_keys=True, separators=(",", ":")) + "\n").encode()
    line = STATUS_LINES.get(status) or f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"
    start_response(line, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def multipart_files(body, boundary, max_files):
    """The `file` parts of a multipart/form-data body as bytes, as werkzeug would give them to the route;
    None when the body is anything but the plain shape browsers, curl and requests send (then werkzeug
    parses it): a preamble-free `--boundary CRLF`, parts with only Content-Disposition (form-data,
    name "file", with a filename or without: curl -F file=<x.png) and Content-Type headers, CRLF line
    breaks, a closing delimiter, at most max_files parts."""
    if not boundary or not 1 <= len(boundary) <= 70:
        return None
    try:
        delimiter = b"\r\n--" + boundary.encode("ascii")
    except UnicodeEncodeError:
        return None
    if not body.startswith(delimiter[2:] + b"\r\n"):
        return None
    if body.count(delimiter[2:]) != body.count(delimiter) + 1:
        return None  # "--boundary" inside a part after LF or CR alone: werkzeug's delimiter too (found by fuzzing)
    blobs, position = [], len(delimiter)  # just past the first delimiter's CRLF
    while True:
        headers_end = body.find(b"\r\n\r\n", position)
        end = body.find(delimiter, position)
        if headers_end < 0 or end < 0 or headers_end > end or len(blobs) >= max_files:
            return None
        if not is_file_part(body[position:headers_end]):
            return None
        blobs.append(body[headers_end + 4:end])
        after = body[end + len(delimiter):end + len(delimiter) + 2]
        if after == b"\r\n":
            position = end + len(delimiter) + 2
        elif after == b"--":
            return blobs if body[end + len(delimiter) + 2:] in (b"", b"\r\n") else None
        else:
            return None


def is_file_part(head):
    """Part headers (bytes) naming a `file` form field (with a filename or not) and nothing else werkzeug reads."""
    disposition = None
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or b"\n" in line or b"\r" in line or line[:1] in (b" ", b"\t"):
            return False
        try:
            line.decode()  # werkzeug refuses a header line that is not UTF-8 (found by fuzzing)
        except UnicodeDecodeError:
            return False
        name = name.strip(b" \t").lower()
        if name == b"content-disposition" and disposition is None:
            try:
                disposition = parse_options_header(value.decode().strip(" \t"))
            except UnicodeDecodeError:
                return False
        elif name != b"content-type":
            return False
    return disposition is not None and disposition[0].lower() == "form-data" and disposition[1].get("name") == "file"
