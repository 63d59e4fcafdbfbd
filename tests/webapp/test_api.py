"""The JSON API (issue 12): tokens, the role rules of the pages, errors, and a whole case
from upload to review through the API with the real broker and worker."""
from __future__ import annotations

import io
import time

from sqlalchemy import select

from tests.apiclient import bearer, check_response, make_token
from tests.appfixtures import add_user, image_bytes, login, register_model, running_worker


def _upload(client, token, *files, note=None, **kwargs):
    data = {"images": [(io.BytesIO(content), name) for name, content in files]}
    if note is not None:
        data["note"] = note
    return client.post("/api/v1/cases", data=data, headers=bearer(token), **kwargs)


def _document(client, token):
    return client.get("/api/v1/openapi.json", headers=bearer(token)).get_json()


# ------------------------------------------------------------------ tokens

def test_cli_creates_a_token_shown_once_and_stored_only_as_its_hash(app, run_cli):
    import hashlib

    from webapp.extensions import db
    from webapp.models import ApiToken, AuditEvent

    add_user(app, "doc@example.org")
    result = run_cli("tokens", "create", "doc@example.org", "--name", "pacs bridge")
    assert result.exit_code == 0, result.output
    secret = result.output.strip().splitlines()[-1]
    assert secret.startswith("brv_") and len(secret) > 40
    client = app.test_client()
    me = client.get("/api/v1/me", headers=bearer(secret))
    assert me.status_code == 200 and me.get_json()["email"] == "doc@example.org"
    with app.app_context():
        (token,) = db.session.scalars(select(ApiToken)).all()
        assert token.token_hash == hashlib.sha256(secret.encode()).hexdigest()
        stored = " ".join(str(getattr(token, c.name)) for c in ApiToken.__table__.columns)
        assert secret not in stored and secret[10:] not in stored
        token_id = token.id
    listing = run_cli("tokens", "list")
    assert "pacs bridge" in listing.output and "doc@example.org" in listing.output
    assert secret not in listing.output
    assert run_cli("tokens", "revoke", token_id).exit_code == 0
    refused = client.get("/api/v1/me", headers=bearer(secret))
    assert refused.status_code == 401 and "invalid_token" in refused.headers["WWW-Authenticate"]
    assert "pacs bridge" not in run_cli("tokens", "list").output
    assert "pacs bridge" in run_cli("tokens", "list", "--all").output
    assert run_cli("tokens", "revoke", token_id).exit_code != 0  # twice: refused
    with app.app_context():
        actions = [e.action for e in db.session.scalars(select(AuditEvent).where(
            AuditEvent.target_type == "api_token").order_by(AuditEvent.id))]
    assert actions == ["api_token.create", "api_token.revoke"]


def test_no_token_a_wrong_one_a_session_cookie_or_a_dead_account_get_401(app, client):
    from webapp.accounts import deactivate, find_user

    add_user(app, "doc@example.org")
    add_user(app, "old@example.org")
    secret = make_token(app, "doc@example.org")
    old_secret = make_token(app, "old@example.org")
    short_lived = make_token(app, "doc@example.org", expires_days=1)
    document = _document(client, secret)
    answers = [client.get("/api/v1/me"),
               client.get("/api/v1/me", headers={"Authorization": "Basic " + secret}),
               client.get("/api/v1/me", headers=bearer("brv_" + "x" * 43))]
    with app.app_context():
        deactivate(find_user("old@example.org"))
    answers.append(client.get("/api/v1/me", headers=bearer(old_secret)))
    assert client.get("/api/v1/me", headers=bearer(short_lived)).status_code == 200
    with app.app_context():  # expiry, by moving the stored date (time itself is not ours to move)
        from webapp.api.tokens import hash_secret
        from webapp.extensions import db
        from webapp.models import ApiToken, utcnow

        row = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(short_lived)))
        row.expires_at = utcnow()
        db.session.commit()
    answers.append(client.get("/api/v1/me", headers=bearer(short_lived)))
    login(client, "doc@example.org")  # a signed-in browser session is no API credential
    answers.append(client.get("/api/v1/me"))
    for response in answers:
        assert response.status_code == 401 and response.is_json, response.data
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        check_response(document, "GET", "/api/v1/me", response)


def test_roles_are_those_of_the_pages(app, client):
    for email, role in (("doc@example.org", "clinician"), ("other@example.org", "clinician"),
                        ("rev@example.org", "reviewer"), ("boss@example.org", "admin")):
        add_user(app, email, role)
    doc, other, rev, boss = (make_token(app, e) for e in ("doc@example.org", "other@example.org",
                                                          "rev@example.org", "boss@example.org"))
    document = _document(client, doc)
    created = _upload(client, doc, ("a.png", image_bytes()), note="left breast, 2 o'clock")
    assert created.status_code == 201, created.data
    check_response(document, "POST", "/api/v1/cases", created)
    case = created.get_json()["cases"][0]
    assert created.headers["Location"] == f"/api/v1/cases/{case['id']}"
    assert case["status"] == "queued" and case["note"] == "left breast, 2 o'clock" and case["prediction"] is None
    url = f"/api/v1/cases/{case['id']}"
    checks = [
        (rev, "POST", "/api/v1/cases", 403),  # reviewers do not upload, as on the pages
        (other, "GET", url, 404),  # another clinician's case: not revealed
        (other, "GET", url + "/image", 404),
        (doc, "GET", url, 200), (rev, "GET", url, 200), (boss, "GET", url, 200),
        (doc, "GET", url + "/image", 200),
        (doc, "GET", url + "/heatmap", 404),  # not predicted yet
        (doc, "POST", url + "/reviews", 403),  # clinicians do not review
        (rev, "POST", url + "/reviews", 409),  # nothing to review yet
        (rev, "GET", "/api/v1/cases/2147483648", 404), (rev, "GET", "/api/v1/cases/99", 404),
    ]
    for secret, method, path, expected in checks:
        kwargs = {"json": {"verdict": "agree", "confidence": "certain"}} if path.endswith("reviews") else {}
        if method == "POST" and path.endswith("cases"):
            kwargs = {"data": {"images": [(io.BytesIO(image_bytes(seed=5)), "b.png")]}}
        response = client.open(path, method=method, headers=bearer(secret), **kwargs)
        assert response.status_code == expected, (method, path, response.status_code, response.data)
        if path != "/api/v1/cases/2147483648":
            check_response(document, method, path, response)
    image = client.get(url + "/image", headers=bearer(doc))
    assert image.data == image_bytes() and image.mimetype == "image/png"
    assert "no-store" in image.headers["Cache-Control"]


def test_model_versions_with_figures_for_admins_only(app, client, tiny_checkpoint):
    register_model(app, tiny_checkpoint, name="tiny-1")
    add_user(app, "doc@example.org")
    add_user(app, "boss@example.org", "admin")
    doc, boss = make_token(app, "doc@example.org"), make_token(app, "boss@example.org")
    document = _document(client, doc)
    for secret, admin in ((doc, False), (boss, True)):
        response = client.get("/api/v1/models", headers=bearer(secret))
        check_response(document, "GET", "/api/v1/models", response)
        (model,) = response.get_json()["models"]
        assert model["name"] == "tiny-1" and model["is_active"] and model["threshold"] == 0.5
        assert model["class_names"] == ["benign", "malignant", "normal"] and model["input_size"] == 32
        assert ("metrics" in model) is admin


def test_upload_errors_are_clear_json(make_app):
    app = make_app(MAX_CONTENT_LENGTH=200_000)
    client = app.test_client()
    add_user(app, "doc@example.org")
    doc = make_token(app, "doc@example.org")
    document = _document(client, doc)
    answers = {
        "no files": client.post("/api/v1/cases", data={"note": "x"}, headers=bearer(doc)),
        "not an image": _upload(client, doc, ("scan.png", b"not an image")),
        "control character": _upload(client, doc, ("a.png", image_bytes()), note="a\x00b"),
        "too large": _upload(client, doc, ("big.png", image_bytes(size=(400, 400)))),
    }
    expected = {"no files": 400, "not an image": 400, "control character": 400, "too large": 413}
    for what, response in answers.items():
        assert response.status_code == expected[what], (what, response.data)
        assert response.is_json and response.get_json()["message"], what
        check_response(document, "POST", "/api/v1/cases", response)
    assert answers["not an image"].get_json()["rejected"] == [
        {"filename": "scan.png", "reason": "it is not an image file (PNG, JPEG or DICOM expected)"}]
    mixed = _upload(client, doc, ("good.png", image_bytes()), ("bad.png", b"nope"))
    assert mixed.status_code == 201 and len(mixed.get_json()["cases"]) == 1
    assert mixed.get_json()["rejected"][0]["filename"] == "bad.png"
    bad_json = client.post("/api/v1/cases/1/reviews", data="not json", headers=bearer(doc))
    assert bad_json.status_code == 403  # the role is checked before the body is read


def test_the_api_needs_no_csrf_token_but_the_pages_still_do(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    client = app.test_client()
    add_user(app, "doc@example.org")
    doc = make_token(app, "doc@example.org")
    assert _upload(client, doc, ("a.png", image_bytes())).status_code == 201
    login_page = client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp"})
    assert login_page.status_code == 400  # no CSRF token: the form is still refused
    page_upload = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes(seed=2)), "b.png")]},
                              headers=bearer(doc))
    assert page_upload.status_code in (302, 400, 401)  # a token opens nothing outside the API
    assert "Set-Cookie" not in _upload(client, doc, ("c.png", image_bytes(seed=3))).headers


def test_database_down_is_a_503_with_retry_after(make_app):
    app = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg2://nobody@127.0.0.1:1/none",
                   SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"connect_timeout": 2}})
    response = app.test_client().get("/api/v1/models", headers=bearer("brv_" + "y" * 43))
    assert response.status_code == 503 and response.is_json, response.data
    assert response.headers["Retry-After"] == "30"
    from webapp.api.openapi import openapi_document

    check_response(openapi_document(), "GET", "/api/v1/models", response)


def _wait(client, secret, case_id, timeout=90.0):
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/v1/cases/{case_id}", headers=bearer(secret)).get_json()
        if body["finished"] or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_upload_predict_download_and_review_through_the_api(app, client, tiny_checkpoint):
    from PIL import Image

    from webapp.extensions import db
    from webapp.models import AuditEvent, Prediction, Review

    register_model(app, tiny_checkpoint, name="tiny-1")
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    doc, rev = make_token(app, "doc@example.org"), make_token(app, "rev@example.org")
    document = _document(client, doc)
    with running_worker(app):
        created = _upload(client, doc, ("scan.png", image_bytes(size=(120, 90))))
        case_id = created.get_json()["cases"][0]["id"]
        assert created.get_json()["cases"][0]["sent_to_worker"] is True
        body = _wait(client, doc, case_id)
    assert body["status"] == "done", body
    response = client.get(f"/api/v1/cases/{case_id}", headers=bearer(doc))
    check_response(document, "GET", f"/api/v1/cases/{case_id}", response)
    prediction = response.get_json()["prediction"]
    with app.app_context():
        row = db.session.scalar(select(Prediction).where(Prediction.case_id == case_id))
        assert prediction["probability"] == row.probability and prediction["label"] == row.label
        assert prediction["threshold"] == row.threshold == 0.5
        # The tiny test model has one output: no classes (a three-class model fills both).
        assert prediction["predicted_class"] == row.predicted_class
        assert prediction["class_probabilities"] == row.class_probabilities
        assert prediction["faithfulness"] == row.faithfulness and prediction["border_share"] == row.border_share
    assert prediction["model_version"] == "tiny-1"
    assert prediction["verdict"] == {"cancer": "Suspicious for malignancy", "normal": "Not suspicious"}[row.label]
    assert response.get_json()["review_token"] is None  # clinicians do not review
    for kind in ("heatmap", "overlay"):
        image = client.get(prediction[f"{kind}_url"], headers=bearer(doc))
        check_response(document, "GET", prediction[f"{kind}_url"], image)
        assert image.mimetype == "image/png" and Image.open(io.BytesIO(image.data)).size == (120, 90)

    as_reviewer = client.get(f"/api/v1/cases/{case_id}", headers=bearer(rev)).get_json()
    token = as_reviewer["review_token"]
    assert token
    wrong_side = "normal" if row.label == "cancer" else "cancer"
    reviews = f"/api/v1/cases/{case_id}/reviews"
    answers = [
        client.post(reviews, json={"verdict": "agree", "confidence": "certain", "comment": "clear margins",
                                   "review_token": token}, headers=bearer(rev)),
        client.post(reviews, json={"verdict": "disagree", "label": wrong_side, "confidence": "probable"},
                    headers=bearer(rev)),
        client.post(reviews, json={"verdict": "maybe", "confidence": "certain"}, headers=bearer(rev)),
        client.post(reviews, json={"verdict": "agree", "confidence": "certain", "comment": "a\x00"},
                    headers=bearer(rev)),
        client.post(reviews, json=["agree"], headers=bearer(rev)),
        client.post(reviews, json={"verdict": "agree", "confidence": 3}, headers=bearer(rev)),
    ]
    assert [a.status_code for a in answers] == [201, 200, 400, 400, 400, 400], [a.data for a in answers]
    for answer in answers:
        check_response(document, "POST", reviews, answer)
    first, revised = answers[0].get_json(), answers[1].get_json()
    assert first["verdict"] == "agree" and first["label"] == row.label and first["revision"] == 1
    assert first["reading_seconds"] is not None and first["reading_seconds"] >= 0
    assert revised["verdict"] == "disagree" and revised["label"] == wrong_side and revised["revision"] == 2
    assert "agree or disagree" in answers[2].get_json()["message"]
    with app.app_context():
        review = db.session.scalar(select(Review).where(Review.case_id == case_id))
        assert review.verdict == "disagree" and [r.verdict for r in review.revisions] == ["agree", "disagree"]
        assert review.case.review_count == 1
        actions = [e.action for e in db.session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions.count("case.upload") == 1 and "review.submit" in actions and "review.revise" in actions


def test_the_migration_creates_exactly_the_token_table(app):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from webapp.extensions import db

    with app.app_context(), db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert [d for d in diff if "api_token" in repr(d)] == []


def test_a_full_disk_is_named_as_such_not_as_an_unreachable_database():
    """Issue 31, item 6: the API's storage-full 503 said "database cannot be reached"."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from webapp.api.routes import unavailable_reason

    full = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    gone = OperationalError("SELECT", {}, Exception("could not connect to server: Connection refused"))
    assert unavailable_reason(full).startswith("The server's disk is full")
    assert "busy" in unavailable_reason(locked)
    assert "cannot be reached" in unavailable_reason(gone)
