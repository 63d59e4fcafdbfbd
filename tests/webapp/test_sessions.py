"""Signing out, and deactivation, end sessions on the server: a session cookie copied
before either no longer opens any page."""
from __future__ import annotations

from tests.appfixtures import add_user, login


def _cookie(client) -> str:
    return client.get_cookie("session").value


def _with_cookie(app, value: str):
    other = app.test_client()
    other.set_cookie("session", value)
    return other


def test_a_cookie_saved_before_sign_out_no_longer_opens_the_cases(app):
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    saved = _cookie(client)
    assert _with_cookie(app, saved).get("/cases").status_code == 200  # the copy works while signed in

    assert client.post("/logout").status_code == 302
    replay = _with_cookie(app, saved).get("/cases")
    assert replay.status_code == 302 and "/login" in replay.headers["Location"]

    login(client, "doc@example.org")  # signing in again works, with a new session
    assert client.get("/cases").status_code == 200
    assert _with_cookie(app, saved).get("/cases").status_code == 302


def test_deactivation_ends_the_users_sessions_and_they_stay_ended(app):
    from webapp.accounts import deactivate
    from webapp.extensions import db
    from webapp.models import User

    user_id = add_user(app, "doc@example.org")
    add_user(app, "admin@example.org", role="admin")
    doc, admin = app.test_client(), app.test_client()
    login(doc, "doc@example.org")
    login(admin, "admin@example.org")
    saved = _cookie(doc)
    admin_page = admin.get("/admin/users")
    assert admin_page.status_code == 200
    with app.app_context():
        deactivate(db.session.get(User, user_id))
    assert doc.get("/cases").status_code == 302
    # Switched back on (directly in the database: there is no "reactivate" yet), the old
    # session still does not come back: its version was raised when it was deactivated.
    with app.app_context():
        db.session.get(User, user_id).active = True
        db.session.commit()
    assert _with_cookie(app, saved).get("/cases").status_code == 302
    assert admin.get("/cases").status_code == 200  # other users are not affected
