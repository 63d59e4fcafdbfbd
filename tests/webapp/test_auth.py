"""Sign-in, roles on every route, CSRF, account administration and its audit trail."""
from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from tests.appfixtures import add_user, csrf_token, image_bytes, login


def test_sign_in_and_out(app, client):
    add_user(app, "Doc@Example.org")
    assert client.get("/cases").status_code == 302  # anonymous: to the sign-in page
    response = client.post("/login", data={"email": "doc@example.org ", "password": "quiet-harbour-lamp"})
    assert response.status_code == 302 and response.headers["Location"] == "/cases"
    assert b"Cases" in client.get("/cases").data
    assert client.post("/logout").status_code == 302
    assert client.get("/cases").status_code == 302


def test_wrong_password_is_refused_with_a_message(app, client):
    add_user(app, "doc@example.org")
    response = client.post("/login", data={"email": "doc@example.org", "password": "wrong-password"})
    assert response.status_code == 401
    assert b"wrong email or password" in response.data


def test_deactivated_user_cannot_sign_in_and_is_signed_out(app, client):
    from webapp.accounts import deactivate, find_user

    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with app.app_context():
        deactivate(find_user("doc@example.org"))
    assert client.get("/cases").status_code == 302  # the live session no longer counts
    response = client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp"})
    assert response.status_code == 401


def test_next_parameter_cannot_redirect_off_site(app, client):
    add_user(app, "doc@example.org")
    response = client.post("/login?next=https://evil.example/x",
                           data={"email": "doc@example.org", "password": "quiet-harbour-lamp"})
    assert response.headers["Location"] == "/cases"


@pytest.mark.parametrize("path", ["/admin/users", "/admin/models", "/admin/audit"])
def test_clinician_and_reviewer_cannot_reach_admin_pages(app, client, path):
    add_user(app, "doc@example.org", "clinician")
    add_user(app, "rev@example.org", "reviewer")
    login(client, "doc@example.org")
    response = client.get(path)
    assert response.status_code == 403
    assert b"role does not allow" in response.data
    client.post("/logout")
    login(client, "rev@example.org")
    assert client.get(path).status_code == 403


def test_admin_reaches_admin_pages(app, client):
    add_user(app, "admin@example.org", "admin")
    login(client, "admin@example.org")
    for path in ("/admin/users", "/admin/models", "/admin/audit"):
        assert client.get(path).status_code == 200


def test_clinician_cannot_create_users_by_posting(app, client):
    add_user(app, "doc@example.org", "clinician")
    login(client, "doc@example.org")
    response = client.post("/admin/users", data={"email": "x@example.org", "password": "long-enough-1", "role": "admin"})
    assert response.status_code == 403
    from webapp.accounts import find_user

    with app.app_context():
        assert find_user("x@example.org") is None


def test_reviewer_cannot_upload(app, client):
    add_user(app, "rev@example.org", "reviewer")
    login(client, "rev@example.org")
    assert client.get("/cases/upload").status_code == 403


def test_clinicians_see_only_their_own_cases(app, client):
    add_user(app, "a@example.org")
    add_user(app, "b@example.org")
    add_user(app, "rev@example.org", "reviewer")
    login(client, "a@example.org")
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    case_url = response.headers["Location"]
    client.post("/logout")
    login(client, "b@example.org")
    assert client.get(case_url).status_code == 404
    assert client.get(case_url + "/image").status_code == 404
    assert client.get(case_url + "/status").status_code == 404
    assert b"a.png" not in client.get("/cases").data
    client.post("/logout")
    login(client, "rev@example.org")
    assert client.get(case_url).status_code == 200
    assert client.get(case_url + "/image").data == image_bytes()


def test_forms_without_csrf_token_are_refused(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    client = app.test_client()
    add_user(app, "doc@example.org")
    assert client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp"}).status_code == 400
    token = csrf_token(client.get("/login").data)
    response = client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp", "csrf_token": token})
    assert response.status_code == 302
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    assert response.status_code == 400 and b"security token" in response.data
    token = csrf_token(client.get("/cases/upload").data)
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")], "csrf_token": token})
    assert response.status_code == 303


def test_admin_manages_accounts_and_every_change_is_audited(app, client):
    from webapp.extensions import db
    from webapp.models import AuditEvent, User

    add_user(app, "admin@example.org", "admin")
    login(client, "admin@example.org")
    response = client.post("/admin/users", data={"email": "new@example.org", "password": "long-enough-1", "role": "clinician"})
    assert response.status_code == 303
    response = client.post("/admin/users", data={"email": "new@example.org", "password": "long-enough-1", "role": "clinician"})
    assert response.status_code == 400 and b"already exists" in response.data
    with app.app_context():
        new_id = db.session.scalar(select(User.id).where(User.email == "new@example.org"))
    assert client.post(f"/admin/users/{new_id}/role", data={"role": "reviewer"}).status_code == 303
    assert client.post(f"/admin/users/{new_id}/deactivate").status_code == 303
    with app.app_context():
        user = db.session.get(User, new_id)
        assert (user.role, user.active) == ("reviewer", False)
        actions = db.session.scalars(select(AuditEvent.action).where(AuditEvent.target_id == new_id,
                                                                    AuditEvent.target_type == "user")).all()
    assert actions == ["user.create", "user.set_role", "user.deactivate"]
    assert b"user.set_role" in client.get("/admin/audit").data


def test_the_last_admin_cannot_be_demoted(app, client):
    from webapp.accounts import find_user

    admin_id = add_user(app, "admin@example.org", "admin")
    login(client, "admin@example.org")
    response = client.post(f"/admin/users/{admin_id}/role", data={"role": "clinician"}, follow_redirects=True)
    assert b"last active admin" in response.data
    with app.app_context():
        assert find_user("admin@example.org").role == "admin"


def test_repeated_failed_sign_ins_pause_that_address_for_a_while(make_app):
    """The lockout of issue 4, reworked for issue 10 item 7: the same 401 as a wrong password
    (never a 429 that says the account exists), and only for the address that failed;
    tests/webapp/test_login_throttle.py covers the rest."""
    from datetime import timedelta

    from sqlalchemy import select, update

    from webapp.extensions import db
    from webapp.models import AuditEvent, SignInAttempt

    app = make_app(LOGIN_MAX_FAILURES=3, LOGIN_LOCKOUT_MINUTES=15)
    add_user(app, "doc@example.org")
    client = app.test_client()

    def attempt(password):
        return client.post("/login", data={"email": "doc@example.org", "password": password})

    assert [attempt("wrong-password").status_code for _ in range(3)] == [401, 401, 401]
    locked = attempt("quiet-harbour-lamp")  # even the right password, while paused
    assert locked.status_code == 401 and b"too many failed attempts" in locked.data
    assert client.get("/cases").status_code == 302  # not signed in
    with app.app_context():
        failures = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "login.failed")).all()
        assert len(failures) == 4 and all(e.details["email"] == "doc@example.org" for e in failures)
        # the lockout window passes
        db.session.execute(update(SignInAttempt).values(created_at=SignInAttempt.created_at - timedelta(minutes=16)))
        db.session.commit()
    assert attempt("quiet-harbour-lamp").status_code == 302
    client.post("/logout")
    # a successful sign-in starts the count again
    assert [attempt("wrong-password").status_code for _ in range(2)] == [401, 401]
    assert attempt("quiet-harbour-lamp").status_code == 302


def test_unknown_emails_are_audited_and_never_locked_out_by_name(app, client):
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import AuditEvent

    for _ in range(7):
        assert client.post("/login", data={"email": "nobody@example.org", "password": "x" * 12}).status_code == 401
    with app.app_context():
        events = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "login.failed")).all()
        assert len(events) == 7 and events[0].target_id is None
