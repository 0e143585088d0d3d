"""docs/openapi.yaml is the server's contract: every route of the app is in it and everything in it is a route
(adding a route without its entry fails here). tests/test_openapi_live.py runs schemathesis with it against
the live serving stack."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPENAPI = ROOT / "docs" / "openapi.yaml"
METHODS = {"get", "post", "put", "patch", "delete"}


def openapi_routes():
    """{(path, METHOD)} of docs/openapi.yaml, and the subset answered by nginx rather than the app."""
    doc = yaml.safe_load(OPENAPI.read_text())
    routes, by_nginx = set(), set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                routes.add((path, method.upper()))
                if operation.get("x-answered-by") == "nginx":
                    by_nginx.add((path, method.upper()))
    return routes, by_nginx


def app_routes():
    """{(path, METHOD)} of the app's URL map, with Flask's <type:name> written as OpenAPI's {name}."""
    from app import create_app

    app = create_app("/nonexistent/model.h5")
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_every_route_is_in_openapi_and_every_openapi_path_is_a_route():
    documented, by_nginx = openapi_routes()
    served = app_routes()
    assert served - documented == set(), "routes of the app with no entry in docs/openapi.yaml"
    assert documented - by_nginx - served == set(), "docs/openapi.yaml entries the app does not serve"
    assert by_nginx == {("/livez", "GET")}


def test_every_operation_documents_its_errors_as_one_line_json():
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.1")
    pattern = doc["components"]["schemas"]["Error"]["properties"]["error"]["pattern"]
    assert re.fullmatch(pattern, "a reason") and not re.fullmatch(pattern, "two\nlines")
