"""The short run of benchmarks/fuzz-server.py (hypothesis against create_app's test client, the multipart
parsers and v2's request parsing, with a tiny model): a few thousand generated inputs, none of which may get
a 5xx, a traceback in the log, an answer that is not a one-line JSON error, or an exception out of a parser.
The full run (100 000 cases) and its figures: docs/benchmarks.md, "Fuzzing"."""

import pytest

from helpers import benchmark_module

CASES = 3000


def fuzz_module():
    return benchmark_module("fuzz-server.py")


@pytest.mark.slow
def test_a_short_fuzz_run_finds_no_uncaught_exception(capsys):
    code = fuzz_module().main(["--cases", str(CASES), "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1] == "0 uncaught exceptions"
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(lines) == {"upload", "multipart", "v2", "v2-parse"}
    # the inputs reach every kind of answer: predictions, refusals, wrong routes and methods, other formats
    for status in ("200:", "400:", "404:", "405:", "415:"):
        assert status in lines["upload"], (status, lines["upload"])
    for status in ("200:", "400:", "415:"):
        assert status in lines["v2"], (status, lines["v2"])
    assert "fast path took it" in lines["multipart"] and "parsed" in lines["v2-parse"]
    total = sum(int(line.split()[1]) for line in lines.values())
    assert total == CASES


def test_the_fuzzer_reports_a_failing_input(monkeypatch, capsys):
    """A parser that raises is reported with its input and exit code 1 (the check is not a no-op)."""
    module = fuzz_module()
    import fastpath

    def broken(body, boundary, max_files):
        raise RuntimeError("boom")

    monkeypatch.setattr(fastpath, "multipart_files", broken)
    fuzz = module.Fuzz.__new__(module.Fuzz)
    fuzz.fastpath, fuzz.failures = fastpath, {"multipart": []}
    fuzz.multipart((b"--b--\r\n", "multipart/form-data; boundary=b"))
    assert fuzz.failures["multipart"] == [("fastpath.multipart_files raised RuntimeError: boom",
                                           (b"--b--\r\n", "multipart/form-data; boundary=b"))]


def test_bad_arguments_exit_2(capsys):
    assert fuzz_module().main(["--cases", "0"]) == 2
    assert "fuzz-server.py: error:" in capsys.readouterr().err


def test_a_5xx_a_multi_line_error_or_a_logged_traceback_is_a_failure():
    """check_answer, the fuzzer's judge of the app's answers, is not a no-op either."""
    from collections import Counter

    from flask import Response

    fuzz = fuzz_module().Fuzz.__new__(fuzz_module().Fuzz)
    fuzz.statuses, fuzz.failures, fuzz.logged = {"upload": Counter()}, {"upload": []}, []
    data = ("POST", "/api/predict", "image/png", b"x")
    fuzz.check_answer("upload", Response('{"error": "fine"}', 400, mimetype="application/json"), data)
    assert fuzz.failures["upload"] == []
    fuzz.check_answer("upload", Response('{"error": "internal error"}', 500, mimetype="application/json"), data)
    fuzz.check_answer("upload", Response('{"error": "two\\nlines"}', 400, mimetype="application/json"), data)
    fuzz.check_answer("upload", Response("<p>oops</p>", 404, mimetype="text/html"), data)
    fuzz.logged.append(__import__("logging").makeLogRecord({"msg": "unexpected error"}))
    fuzz.check_answer("upload", Response('{"digit": 1}', 200, mimetype="application/json"), data)
    found = [what for what, _ in fuzz.failures["upload"]]
    assert len(found) == 4 and found[0].startswith("status 500") and "one-line JSON error" in found[1]
    assert "one-line JSON error" in found[2] and found[3] == "logged a traceback: unexpected error"
    assert fuzz.statuses["upload"] == Counter({400: 2, 500: 1, 404: 1, 200: 1})
