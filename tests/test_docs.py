"""The docs kept true by tests: docs/CONTRACTS.md's "Program interfaces" against each program's own
build_parser() (every flag, and every default the docs spell out), so adding a flag without its doc, or
changing a default the docs give, fails here."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = (REPO / "docs" / "CONTRACTS.md").read_text()


def interface_lines():
    section = CONTRACTS.split("## Program interfaces (flags)\n", 1)[1].split("\n\n", 1)[0]
    lines = {}
    for line in section.splitlines():
        m = re.match(r"- `(\w+/[\w-]+\.py) ([^`]*)`", line)
        assert m, f"not a program line in CONTRACTS.md: {line}"
        lines[m.group(1)] = m.group(2)
    return lines


def build_parser(program):
    path = REPO / program
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"doccheck_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.build_parser()


def options(parser):
    """{--flag: its argparse action} of the parser (and of its subcommands), without --help."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(options(sub))
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and action.help != argparse.SUPPRESS:
                found[flag] = action
    return found


def documented(text):
    """{--flag: the word after it, or None} as the docs line writes them."""
    words = re.findall(r"--[\w-]+(?:[ =][^\s\]\[|]+(?:\|[^\s\]\[]+)*)?", text)
    return {w.split()[0].split("=")[0]: (w.split(None, 1)[1] if " " in w else None) for w in words}


def test_every_program_is_documented():
    programs = {str(p.relative_to(REPO)) for stage in ("splitter", "trainer", "aggregator", "server")
                for p in (REPO / stage).glob("*.py") if "def build_parser" in p.read_text()}
    assert set(interface_lines()) == programs


@pytest.mark.parametrize("program", sorted(interface_lines()))
def test_documented_flags_and_defaults_are_the_programs(program):
    text = interface_lines()[program]
    parser_options = options(build_parser(program))
    docs = documented(text)
    assert set(docs) == set(parser_options), (f"{program}: only in the docs {set(docs) - set(parser_options)}, "
                                              f"only in the program {set(parser_options) - set(docs)}")
    for flag, word in docs.items():
        action = parser_options[flag]
        if word is None or action.default is None or word.isupper() or not re.match(r"^[\w.]+$", word):
            if action.choices and word and "|" in word:
                assert word.split("|") == list(action.choices), flag
            continue
        assert word == str(action.default), f"{program} {flag}: the docs say {word}, the program {action.default}"


def documented_routes():
    """{(METHOD, path)} from CONTRACTS.md's route tables, `/v2/models/mnist` read as `/v2/models/<name>`."""
    routes = set()
    for method, path in re.findall(r"^\| `(GET|POST) (/[^` ]*)`", CONTRACTS, flags=re.M):
        routes.add((method, path.replace("/v2/models/mnist", "/v2/models/<name>")))
    return routes


def test_every_route_of_the_app_is_documented_and_every_documented_route_exists():
    from app import create_app

    app = create_app(str(REPO / "no-model-here.h5"))
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/static/") or "<version>" in rule.rule:
            continue  # static files; model versions, which the OIP section says are not supported (404)
        served |= {(method, rule.rule) for method in rule.methods - {"HEAD", "OPTIONS"}}
    served.add(("GET", "/livez"))  # nginx's own answer (server/nginx.conf), not the app's
    assert "location = /livez {" in (REPO / "server" / "nginx.conf").read_text()
    assert "/v2/models/mnist/versions/" in CONTRACTS
    docs = documented_routes()
    assert served == docs, f"only served: {served - docs}; only in the docs: {docs - served}"


def test_the_base_image_the_contracts_name_is_the_dockerfiles():
    named = re.search(r"`ARG BASE_IMAGE=([^`]+)`", CONTRACTS).group(1)
    for stage in ("splitter", "trainer", "aggregator", "server"):
        pinned = re.search(r"^ARG BASE_IMAGE=(\S+)", (REPO / stage / "Dockerfile").read_text(), flags=re.M).group(1)
        assert pinned == named, f"{stage}/Dockerfile pins {pinned}, docs/CONTRACTS.md says {named}"
