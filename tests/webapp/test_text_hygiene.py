"""Issue 10, item 12: NUL, control and text-direction characters. A file name is cleaned
(it is display only); a note, email or other form field carrying them is refused with a
400 and a message, on SQLite and on PostgreSQL (where NUL used to give a 500)."""
from __future__ import annotations

import io

import pytest

from tests.appfixtures import add_user, image_bytes, login

BAD = ["\x00", "\x07", "\x1b[31m", "\u202e", "\u2066", "\x85"]


def _upload(client, name="a.png", note=""):
    return client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), name)], "note": note})


def _flows(app, client):
    add_user(app, "doc@example.org")
    for bad in BAD:
        response = client.post("/login", data={"email": f"doc{bad}@example.org", "password": "quiet-harbour-lamp"})
        assert response.status_code == 400 and b"not allowed" in response.data, repr(bad)
    login(client, "doc@example.org")
    for bad in BAD:
        response = _upload(client, note=f"left{bad}right")
        assert response.status_code == 400 and b"not allowed" in response.data, repr(bad)
        assert client.get(f"/cases?status=done{bad}").status_code == 400
    response = _upload(client, name="\u202egnp.exe\x00\x1b.png", note="two\nlines\tand a tab")
    assert response.status_code == 303
    page = client.get("/cases/1").data.decode()
    assert "gnp.exe.png" in page and "\u202e" not in page and "\x00" not in page
    assert "two\nlines\tand a tab" in page


def test_control_and_bidi_characters_on_sqlite(app, client):
    _flows(app, client)


def test_user_emails_with_control_characters_are_refused(app):
    from webapp.accounts import AccountError, create_user

    with app.app_context():
        for bad in BAD:
            with pytest.raises(AccountError, match="not an email address"):
                create_user(f"doc{bad}@example.org", "a long password here")


def test_control_and_bidi_characters_on_postgresql(make_app):
    from tests.appfixtures import postgres_available, scratch_postgres_database

    if not postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (user postgres)")
    import flask_migrate

    from webapp import MIGRATIONS_DIR

    with scratch_postgres_database("breast_review_test") as url:
        app = make_app(SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})
        with app.app_context():
            flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        client = app.test_client()
        _flows(app, client)
        # A path segment with NUL reaches a query on PostgreSQL: refused before that.
        assert client.get("/admin/models/v1%00").status_code == 400
        with app.app_context():
            from webapp.extensions import db

            db.engine.dispose()
