"""Schemathesis against a live server of the API: generated requests for every operation
(a few examples each, so the whole run stays well under a minute), with no 5xx and every
response (status, media type, headers, body) as the OpenAPI document says.

The server is a real HTTP server in a thread, on a migrated database with users, tokens,
a registered model and an uploaded case, so that generated requests meet real rows."""
from __future__ import annotations

import io
import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)
from werkzeug.serving import make_server

from tests.apiclient import bearer, make_token
from webapp.api.openapi import openapi_document
from tests.appfixtures import add_user, image_bytes

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture
def live_api(make_app):
    """(base URL, admin token) of a real HTTP server with a case in the database."""
    app = make_app(MAX_CONTENT_LENGTH=2 * 1024 * 1024)
    add_user(app, "boss@example.org", "admin")
    add_user(app, "doc@example.org", "clinician")
    admin, doc = make_token(app, "boss@example.org"), make_token(app, "doc@example.org")
    client = app.test_client()
    response = client.post("/api/v1/cases", headers=bearer(doc),
                           data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    assert response.status_code == 201
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", admin
    finally:
        server.shutdown()


# The document as the route serves it (webapp.api.openapi builds it without a request);
# tests/webapp/test_api_contract.py checks that the served one is the same. Schemathesis's
# lazy fixture loader does not run under pytest 9, hence a schema loaded at import.
schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.mark.schemathesis
@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_generated_requests_get_documented_answers_and_no_5xx(case, live_api):
    base, admin = live_api
    case.call_and_validate(base_url=f"{base}/api/v1", headers=bearer(admin), checks=CHECKS, timeout=30)
