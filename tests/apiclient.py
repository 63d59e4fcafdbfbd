"""Helpers for the API tests: tokens made the way `manage.py tokens create` makes them, and
responses checked against the OpenAPI document the app serves."""
from __future__ import annotations

import re

import jsonschema


def make_token(app, email: str, name: str = "test client", **kwargs) -> str:
    """A new token's secret for the account ``email`` (created by webapp.api.tokens)."""
    from webapp.accounts import find_user
    from webapp.api.tokens import create_token

    with app.app_context():
        _token, secret = create_token(find_user(email), name, **kwargs)
    return secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _template_for(document: dict, path: str) -> str:
    relative = path.removeprefix("/api/v1")
    for template in document["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", r"[^/]+", template) + "$"
        if re.match(pattern, relative):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


def check_response(document: dict, method: str, path: str, response) -> None:
    """Fail unless ``response`` is documented for (method, path): its status, media type
    and, for JSON, its body against the schema."""
    operation = document["paths"][_template_for(document, path)][method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {path}: status {response.status_code} is not documented"
    content = documented.get("content", {})
    assert response.mimetype in content, f"{method} {path}: {response.mimetype} not documented for {response.status_code}"
    if response.mimetype == "application/json":
        schema = {**content["application/json"]["schema"], "components": document["components"]}
        jsonschema.validate(response.get_json(), schema, cls=jsonschema.Draft202012Validator,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
