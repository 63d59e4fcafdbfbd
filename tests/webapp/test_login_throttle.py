"""Issue 10, item 7: signing in tells nothing about which accounts exist, and throttling
keys on the client address, so an attacker cannot lock a colleague out.

Every refusal (unknown email, wrong password, deactivated account, throttled) gives the same
status and the same page; each does the same password-hash work (documented timings in
docs/security.md, measured by benchmarks/login_timing.py)."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from tests.appfixtures import add_user

ATTACKER = "203.0.113.7"
COLLEAGUE = "198.51.100.20"


def _client(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def _sign_in(client, email: str, password: str):
    return client.post("/login", data={"email": email, "password": password})


def _page(response, email: str) -> bytes:
    # The form gives back the email that was typed; everything else must be identical.
    return response.data.replace(email.encode(), b"EMAIL")


def test_unknown_wrong_deactivated_and_throttled_get_the_same_answer(make_app):
    from webapp.accounts import deactivate, find_user

    app = make_app(LOGIN_MAX_FAILURES=3)
    add_user(app, "doc@example.org")
    add_user(app, "gone@example.org")
    with app.app_context():
        deactivate(find_user("gone@example.org"))
    client = _client(app, ATTACKER)

    unknown = _sign_in(client, "nobody@example.org", "whatever-password")
    wrong = _sign_in(client, "doc@example.org", "wrong-password!")
    deactivated = _sign_in(client, "gone@example.org", "quiet-harbour-lamp")
    for _ in range(2):
        _sign_in(client, "doc@example.org", "wrong-password!")
    throttled = _sign_in(client, "doc@example.org", "quiet-harbour-lamp")  # right password, too many failures
    answers = {(r.status_code, _page(r, email)) for r, email in (
        (unknown, "nobody@example.org"), (wrong, "doc@example.org"),
        (deactivated, "gone@example.org"), (throttled, "doc@example.org"))}
    assert len(answers) == 1, answers
    status, _ = answers.pop()
    assert status == 401  # never 429: that would say the account exists
    assert client.get("/cases").status_code == 302  # not signed in


def test_unknown_emails_are_throttled_like_known_ones(make_app):
    app = make_app(LOGIN_MAX_FAILURES=3)
    add_user(app, "doc@example.org")
    client = _client(app, ATTACKER)
    for email in ("doc@example.org", "nobody@example.org"):
        answers = [_page(_sign_in(client, email, "wrong-password!"), email) for _ in range(5)]
        assert len(set(answers)) == 1  # the fourth and fifth look like the first


def test_failures_from_one_address_do_not_lock_the_account_for_others(make_app):
    app = make_app(LOGIN_MAX_FAILURES=3)
    add_user(app, "admin@example.org", "admin")
    attacker, colleague = _client(app, ATTACKER), _client(app, COLLEAGUE)
    for _ in range(10):
        assert _sign_in(attacker, "admin@example.org", "wrong-password!").status_code == 401
    assert _sign_in(attacker, "admin@example.org", "quiet-harbour-lamp").status_code == 401  # throttled there
    assert _sign_in(colleague, "admin@example.org", "quiet-harbour-lamp").status_code == 302  # not here


def test_one_address_guessing_many_accounts_is_throttled_for_all_of_them(make_app):
    app = make_app(LOGIN_MAX_FAILURES=3, LOGIN_MAX_FAILURES_PER_ADDRESS=6)
    add_user(app, "doc@example.org")
    attacker, colleague = _client(app, ATTACKER), _client(app, COLLEAGUE)
    for i in range(6):
        _sign_in(attacker, f"user{i}@example.org", "wrong-password!")
    assert _sign_in(attacker, "doc@example.org", "quiet-harbour-lamp").status_code == 401
    assert _sign_in(colleague, "doc@example.org", "quiet-harbour-lamp").status_code == 302


def test_throttle_ends_after_the_window_or_a_success_and_every_attempt_is_audited(make_app):
    from webapp.extensions import db
    from webapp.models import AuditEvent, SignInAttempt

    app = make_app(LOGIN_MAX_FAILURES=3, LOGIN_LOCKOUT_MINUTES=15)
    add_user(app, "doc@example.org")
    client = _client(app, ATTACKER)
    for _ in range(3):
        _sign_in(client, "doc@example.org", "wrong-password!")
    assert _sign_in(client, "doc@example.org", "quiet-harbour-lamp").status_code == 401
    with app.app_context():
        events = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "login.failed")).all()
        assert [e.details["reason"] for e in events] == ["wrong password"] * 3 + ["throttled"]
        assert {e.details["address"] for e in events} == {ATTACKER}
        db.session.execute(update(SignInAttempt).values(created_at=SignInAttempt.created_at - timedelta(minutes=16)))
        db.session.commit()
    assert _sign_in(client, "doc@example.org", "quiet-harbour-lamp").status_code == 302
    client.post("/logout")
    for _ in range(2):  # a success starts the count again
        _sign_in(client, "doc@example.org", "wrong-password!")
    assert _sign_in(client, "doc@example.org", "quiet-harbour-lamp").status_code == 302


def test_an_admin_unlocks_an_account(make_app):
    app = make_app(LOGIN_MAX_FAILURES=3)
    doc_id = add_user(app, "doc@example.org")
    add_user(app, "admin@example.org", "admin")
    doc, admin = _client(app, ATTACKER), _client(app, COLLEAGUE)
    for _ in range(3):
        _sign_in(doc, "doc@example.org", "wrong-password!")
    assert _sign_in(doc, "doc@example.org", "quiet-harbour-lamp").status_code == 401
    assert _sign_in(admin, "admin@example.org", "quiet-harbour-lamp").status_code == 302
    page = admin.get("/admin/users").data
    assert b"Unlock" in page
    response = admin.post(f"/admin/users/{doc_id}/unlock", follow_redirects=True)
    assert b"may sign in again" in response.data
    assert _sign_in(doc, "doc@example.org", "quiet-harbour-lamp").status_code == 302


def test_proxy_addresses_are_used_only_when_configured(make_app):
    app = make_app(LOGIN_MAX_FAILURES=2, TRUSTED_PROXIES=1)
    add_user(app, "doc@example.org")
    proxy = _client(app, "127.0.0.1")
    for _ in range(3):
        proxy.post("/login", data={"email": "doc@example.org", "password": "wrong-password!"},
                   headers={"X-Forwarded-For": ATTACKER})
    right = {"email": "doc@example.org", "password": "quiet-harbour-lamp"}
    assert proxy.post("/login", data=right, headers={"X-Forwarded-For": ATTACKER}).status_code == 401
    assert proxy.post("/login", data=right, headers={"X-Forwarded-For": COLLEAGUE}).status_code == 302


def test_one_guesser_behind_a_hospital_nat_does_not_lock_out_colleagues_who_sign_in_there(make_app):
    """Issue 31, item 6: 21 failures from one address used to lock out every user behind it."""
    app = make_app(LOGIN_MAX_FAILURES=3, LOGIN_MAX_FAILURES_PER_ADDRESS=6)
    add_user(app, "doc@example.org")
    add_user(app, "new@example.org")
    nat = _client(app, ATTACKER)
    assert _sign_in(nat, "doc@example.org", "quiet-harbour-lamp").status_code == 302   # doc works here
    guesser = _client(app, ATTACKER)
    for i in range(10):
        _sign_in(guesser, f"user{i}@example.org", "wrong-password!")
    # doc, known at this address, still signs in; an account never used here is held back
    assert _sign_in(_client(app, ATTACKER), "doc@example.org", "quiet-harbour-lamp").status_code == 302
    assert _sign_in(_client(app, ATTACKER), "new@example.org", "quiet-harbour-lamp").status_code == 401
    # doc's own guesses from there still meet the per-account limit
    for _ in range(3):
        _sign_in(guesser, "doc@example.org", "wrong-password!")
    assert _sign_in(_client(app, ATTACKER), "doc@example.org", "quiet-harbour-lamp").status_code == 401
