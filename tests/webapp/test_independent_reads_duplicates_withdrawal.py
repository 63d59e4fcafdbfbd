"""Issue 11, first part: independent reads, duplicate uploads linked to their case, and
withdrawal of a mistaken case; through the test client on the real database."""
from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import select

from tests.appfixtures import add_user, csrf_token, image_bytes
from tests.webapp.reviewdata import add_people, finished_case, model_version, review, signed_in


@pytest.fixture
def people(app):
    return add_people(app)


_client = signed_in


def _cases(app):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        return db.session.scalars(select(Case).order_by(Case.id)).all()


def _upload(client, *files, **form):
    data = {"images": [(io.BytesIO(content), name) for name, content in files], **form}
    return client.post("/cases/upload", data=data)


# ------------------------------------------------------------------ independent reads

def test_a_reviewer_sees_other_reviews_only_after_saving_their_own(people):
    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    review(app, case_id, "rev@example.org", "disagree", "benign", comment="looks like a cyst")

    second = _client(app, "rev2@example.org")
    page = second.get(f"/cases/{case_id}").data
    assert b"Save review" in page
    assert b"rev@example.org" not in page and b"looks like a cyst" not in page
    assert b"Reviews of this case" not in page
    assert b"shown once your own review is saved" in page

    token = re.search(rb'name="opened" value="([^"]+)"', page).group(1).decode()
    response = second.post(f"/cases/{case_id}/review",
                           data={"verdict": "agree", "confidence": "probable", "opened": token})
    assert response.status_code == 303
    page = second.get(f"/cases/{case_id}").data
    assert b"Reviews of this case" in page and b"rev@example.org" in page and b"looks like a cyst" in page


def test_an_admin_sees_every_review_without_giving_one(people):
    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    review(app, case_id, "rev@example.org", "disagree", "benign", comment="looks like a cyst")
    page = _client(app, "boss@example.org").get(f"/cases/{case_id}").data
    assert b"Reviews of this case" in page and b"looks like a cyst" in page


# ------------------------------------------------------------------ duplicates

def test_the_same_image_again_links_to_the_existing_case(people):
    app = people
    client = _client(app, "doc@example.org")
    png = image_bytes(seed=7)
    assert _upload(client, ("first.png", png)).status_code == 303
    response = _upload(client, ("again.png", png), ("other.png", image_bytes(seed=8)))
    assert response.status_code == 303
    cases = _cases(app)
    assert [c.original_filename for c in cases] == ["first.png", "other.png"]
    page = client.get(response.headers["Location"]).data.decode()
    assert 'again.png is the same image as <a href="/cases/1">case 1</a>, so it was not stored again' in page
    assert "1 image(s) received and queued" in page

    # Only duplicates: nothing new is queued, and the page says so and goes to the case.
    response = _upload(client, ("third.png", png))
    assert response.status_code == 303 and response.headers["Location"] == "/cases/1"
    page = client.get("/cases/1").data.decode()
    assert "third.png is the same image as <a" in page and "received and queued" not in page
    assert len(_cases(app)) == 2


def test_upload_again_makes_a_second_case_on_request(people):
    app = people
    client = _client(app, "doc@example.org")
    png = image_bytes(seed=7)
    _upload(client, ("first.png", png))
    assert b'name="allow_duplicate"' in client.get("/cases/upload").data
    response = _upload(client, ("again.png", png), allow_duplicate="y")
    assert response.status_code == 303
    assert [c.original_filename for c in _cases(app)] == ["first.png", "again.png"]


def test_a_case_the_uploader_may_not_see_is_not_revealed_as_a_duplicate(people):
    app = people
    png = image_bytes(seed=7)
    _upload(_client(app, "doc@example.org"), ("mine.png", png))
    response = _upload(_client(app, "doc2@example.org"), ("theirs.png", png))
    assert response.status_code == 303 and response.headers["Location"] == "/cases/2"
    assert len(_cases(app)) == 2


def test_the_api_keeps_opening_a_case_per_upload(people):
    from tests.apiclient import bearer, make_token

    app = people
    png = image_bytes(seed=7)
    _upload(_client(app, "doc@example.org"), ("first.png", png))
    client = app.test_client()
    response = client.post("/api/v1/cases", headers=bearer(make_token(app, "doc@example.org")),
                           data={"images": [(io.BytesIO(png), "again.png")]})
    assert response.status_code == 201
    assert len(_cases(app)) == 2


# ------------------------------------------------------------------ withdrawal

def _withdraw(client, case_id, confirm=True):
    data = {"confirm": "y"} if confirm else {}
    return client.post(f"/cases/{case_id}/withdraw", data=data)


def test_the_uploader_withdraws_a_case_hidden_everywhere_but_kept(people):
    from webapp.extensions import db
    from webapp.models import AuditEvent, Case
    from worker.feedback import select_feedback

    app = people
    version = model_version(app)
    kept = finished_case(app, version, 0.8, seed=1)
    gone = finished_case(app, version, 0.2, seed=2)
    for case_id in (kept, gone):
        review(app, case_id, "rev@example.org", "agree")
    doc = _client(app, "doc@example.org")
    page = doc.get(f"/cases/{gone}").data
    assert f'action="/cases/{gone}/withdraw"'.encode() in page

    assert _withdraw(doc, gone, confirm=False).status_code == 400
    response = _withdraw(doc, gone)
    assert response.status_code == 303 and response.headers["Location"] == "/cases"

    with app.app_context():
        case = db.session.get(Case, gone)
        assert case.withdrawn_at is not None and case.withdrawn_by.email == "doc@example.org"
        events = db.session.scalars(select(AuditEvent.action)).all()
        assert "case.withdraw" in events
        assert [item.case_id for item in select_feedback().items] == [kept]

    assert "Case 2 (scan-2.png) was withdrawn" in doc.get("/cases").data.decode()
    listing = doc.get("/cases").data.decode()  # the flash shown, the list itself
    assert "scan-1.png" in listing and "scan-2.png" not in listing
    queue = _client(app, "rev2@example.org").get("/reviews").data.decode()
    assert f"/cases/{kept}?queue=uncertain" in queue and f"/cases/{gone}?queue" not in queue
    # The uploader can still open it and read that it was withdrawn; no one may review it.
    assert b"This case was withdrawn" in doc.get(f"/cases/{gone}").data
    assert b"Save review" not in _client(app, "rev2@example.org").get(f"/cases/{gone}").data
    # Withdrawing twice does not change the first record.
    assert _withdraw(doc, gone).status_code == 303


def test_only_the_uploader_or_an_admin_may_withdraw(people):
    from webapp.extensions import db
    from webapp.models import Case

    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    assert _withdraw(_client(app, "rev@example.org"), case_id).status_code == 403
    assert _withdraw(_client(app, "doc2@example.org"), case_id).status_code == 404
    assert b"/withdraw" not in _client(app, "rev@example.org").get(f"/cases/{case_id}").data
    assert _withdraw(_client(app, "boss@example.org"), case_id).status_code == 303
    with app.app_context():
        assert db.session.get(Case, case_id).withdrawn_by.email == "boss@example.org"


def test_a_withdrawn_case_no_longer_catches_duplicates(people):
    app = people
    client = _client(app, "doc@example.org")
    png = image_bytes(seed=7)
    _upload(client, ("first.png", png))
    _withdraw(client, 1)
    response = _upload(client, ("again.png", png))
    assert response.headers["Location"] == "/cases/2"


def test_withdrawal_needs_the_csrf_token(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    add_user(app, "doc@example.org")
    case_id = finished_case(app, model_version(app), 0.8)
    client = app.test_client()
    page = client.get("/login").data
    client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp",
                                "csrf_token": csrf_token(page)})
    assert client.post(f"/cases/{case_id}/withdraw", data={"confirm": "y"}).status_code == 400
    page = client.get(f"/cases/{case_id}").data
    response = client.post(f"/cases/{case_id}/withdraw",
                           data={"confirm": "y", "csrf_token": csrf_token(page)})
    assert response.status_code == 303
