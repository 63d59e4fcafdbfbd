"""The OpenAPI document of /api/v1 is a valid OpenAPI 3.1 document and names every route
and method of the API blueprint, and nothing the blueprint does not serve."""
from __future__ import annotations

import re

from openapi_spec_validator import validate

from tests.apiclient import bearer, make_token
from tests.appfixtures import add_user


def _served(app) -> set[tuple[str, str]]:
    """(method, OpenAPI path template) for every rule of the api blueprint."""
    served = set()
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("api."):
            continue
        path = rule.rule.removeprefix("/api/v1")
        choices = re.search(r"<any\(([^)]*)\):\w+>", path)
        variants = ([re.sub(r"<any\([^)]*\):\w+>", c.strip(), path) for c in choices.group(1).split(",")]
                    if choices else [path])
        for variant in variants:
            template = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", variant)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                served.add((method.lower(), template))
    return served


def test_the_served_document_is_valid_openapi_and_matches_the_routes(app, client):
    add_user(app, "doc@example.org")
    document = client.get("/api/v1/openapi.json", headers=bearer(make_token(app, "doc@example.org"))).get_json()
    validate(document)
    from webapp.api.openapi import openapi_document

    assert document == openapi_document()  # what the schemathesis test loads
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == _served(app)
    assert len(documented) == 10
    for path, item in document["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            assert {"200", "201"} & codes and {"401", "503"} <= codes, (method, path)
            if "{case_id}" in path:
                assert "404" in codes, (method, path)
