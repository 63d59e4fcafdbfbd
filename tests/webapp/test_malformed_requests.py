"""Issue 31, item 1: a multipart part without a ``name`` (``Content-Disposition: form-data``
only) is a malformed request: 400 with a message on every POST route, signed in or not, with
CSRF on or off; it used to be a 500 (the NUL check and Flask-WTF met ``key=None``)."""
from __future__ import annotations

import pytest

from tests.appfixtures import add_user, image_bytes, login

BOUNDARY = "malformed-boundary"
ROUTES = ["/login", "/logout", "/cases/upload", "/admin/users", "/account/password",
          "/api/v1/cases", "/api/v1/cases/1/reviews"]


def nameless_body(with_file: bool) -> bytes:
    """One part with no name at all, optionally a file part with no field name either."""
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n".encode()]
    if with_file:
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; filename=\"a.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + image_bytes() + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post(client, route: str, body: bytes, headers: dict | None = None):
    return client.post(route, data=body, headers=headers or {},
                       content_type=f"multipart/form-data; boundary={BOUNDARY}")


@pytest.mark.parametrize("csrf", [True, False])
@pytest.mark.parametrize("with_file", [False, True])
def test_a_nameless_part_is_a_400_for_anyone(make_app, csrf, with_file):
    app = make_app(WTF_CSRF_ENABLED=csrf)
    client = app.test_client()
    body = nameless_body(with_file)
    for route in ROUTES:
        response = post(client, route, body)
        assert response.status_code == 400, (route, response.status_code)
        assert b"without a name" in response.data, route


def test_a_nameless_part_is_a_400_when_signed_in_and_with_a_token(make_app):
    app = make_app()
    add_user(app, "admin@example.org", role="admin")
    client = app.test_client()
    login(client, "admin@example.org")
    for route in ROUTES:
        assert post(client, route, nameless_body(True)).status_code == 400, route
    # nothing was stored by the refused requests
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        assert db.session.query(Case).count() == 0
