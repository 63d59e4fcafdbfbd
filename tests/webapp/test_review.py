"""Review form, queue, blinded mode, history, roles and bad input, on the real database."""
from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import func, select

from tests.appfixtures import add_user, csrf_token, login
from tests.webapp.reviewdata import finished_case, model_version, review


@pytest.fixture
def people(app):
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    add_user(app, "rev2@example.org", "reviewer")
    add_user(app, "boss@example.org", "admin")
    return app


def _token(page: bytes) -> str:
    match = re.search(rb'name="opened" value="([^"]+)"', page)
    assert match, "no reading-time token in the page"
    return match.group(1).decode()


def _rows(app, model):
    from webapp.extensions import db

    with app.app_context():
        return db.session.scalars(select(model)).all()


def test_reviewer_agrees_then_revises_and_every_version_is_kept(people, client):
    from webapp.models import AuditEvent, Case, Review, ReviewRevision

    app = people
    version = model_version(app)
    case_id = finished_case(app, version, 0.8)
    login(client, "rev@example.org")
    page = client.get(f"/cases/{case_id}").data
    assert b"Expert review" in page and b"Do you agree with the model (cancer)?" in page
    response = client.post(f"/cases/{case_id}/review", data={
        "verdict": "agree", "confidence": "probable", "opened": _token(page)})
    assert response.status_code == 303
    page = client.get(f"/cases/{case_id}").data
    assert b"Your review (version 1)" in page and b"Revise my review" in page
    response = client.post(f"/cases/{case_id}/review", data={
        "verdict": "disagree", "label": "benign", "confidence": "certain", "comment": "cyst",
        "opened": _token(page)})
    assert response.status_code == 303
    (saved,) = _rows(app, Review)
    assert (saved.verdict, saved.label, saved.detailed_label, saved.revision) == ("disagree", "normal", "benign", 2)
    assert saved.model_label == "cancer" and saved.model_version_id == version
    assert saved.reading_seconds is not None and 0 <= saved.reading_seconds < 60
    revisions = sorted(_rows(app, ReviewRevision), key=lambda r: r.revision)
    assert [(r.revision, r.stage, r.verdict, r.label) for r in revisions] == [
        (1, "final", "agree", "cancer"), (2, "final", "disagree", "normal")]
    assert _rows(app, Case)[0].review_count == 1  # one reviewer, one review
    actions = [e.action for e in _rows(app, AuditEvent)]
    assert actions.count("review.submit") == 1 and actions.count("review.revise") == 1


def test_reading_time_is_measured_from_the_signed_opening_time(people):
    from webapp.extensions import db
    from webapp.models import Review

    app = people
    case_id = finished_case(app, model_version(app), 0.3)
    review(app, case_id, "rev@example.org", "agree", seconds_ago=42)
    late = finished_case(app, model_version(app, "m2", active=False), 0.3, seed=1)
    review(app, late, "rev@example.org", "agree", seconds_ago=5 * 3600)  # page left open
    with app.app_context():
        times = {r.case_id: r.reading_seconds for r in db.session.scalars(select(Review))}
    assert times[case_id] == pytest.approx(42, abs=2)
    assert times[late] is None


@pytest.mark.parametrize("form, message", [
    ({"verdict": "maybe", "confidence": "certain"}, b"choose agree or disagree"),
    ({"verdict": "disagree", "confidence": "certain"}, b"a disagreement needs your label"),
    ({"verdict": "disagree", "label": "malignant", "confidence": "certain"}, b"malignant counts as suspicious for malignancy, which is the model&#39;s verdict too"),
    ({"verdict": "agree", "label": "normal", "confidence": "certain"}, b"choose disagree"),
    ({"verdict": "disagree", "label": "cyst", "confidence": "certain"}, b"must be one of cancer, normal"),
    ({"verdict": "agree", "confidence": "very"}, b"choose a confidence"),
    ({"verdict": "agree", "confidence": "certain", "opened": "forged"}, b"lacks its opening time or it was altered"),
    ({"verdict": "agree", "confidence": "certain", "comment": "x" * 2001}, b"Comment"),
])
def test_bad_review_values_are_refused_and_nothing_is_written(people, client, form, message):
    from webapp.models import AuditEvent, Review, ReviewRevision

    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    login(client, "rev@example.org")
    data = {"opened": _token(client.get(f"/cases/{case_id}").data), **form}
    response = client.post(f"/cases/{case_id}/review", data=data)
    assert response.status_code == 400
    assert message in response.data and b"not" in response.data
    assert _rows(app, Review) == [] and _rows(app, ReviewRevision) == []
    assert not any(e.action.startswith("review") for e in _rows(app, AuditEvent))


def test_a_rejected_review_comes_back_filled_in_with_its_opening_time(people, client):
    app = people
    case_id = finished_case(app, model_version(app), 0.8)  # the model says cancer
    login(client, "rev@example.org")
    opened = _token(client.get(f"/cases/{case_id}").data)
    # disagreeing while giving the model's own label is refused by the review rules
    response = client.post(f"/cases/{case_id}/review", data={
        "verdict": "disagree", "label": "malignant", "confidence": "probable",
        "comment": "calipers hide the margin", "opened": opened})
    page = response.data.decode()
    assert response.status_code == 400 and "Review not saved" in page
    assert 'value="disagree" required\n          checked' in page
    assert '<option value="malignant" selected>' in page
    assert 'value="probable" required\n          checked' in page
    assert "calipers hide the margin</textarea>" in page
    assert _token(response.data) == opened  # reading time still counts from the first opening
    forged = client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "certain",
                                                           "opened": "forged"})
    assert forged.status_code == 400 and _token(forged.data) != "forged"


def test_token_from_another_case_is_refused(people, client):
    app = people
    version = model_version(app)
    first, second = finished_case(app, version, 0.8), finished_case(app, version, 0.2, seed=1)
    login(client, "rev@example.org")
    token = _token(client.get(f"/cases/{first}").data)
    response = client.post(f"/cases/{second}/review", data={"verdict": "agree", "confidence": "certain", "opened": token})
    assert response.status_code == 400 and b"another case or user" in response.data


def test_clinicians_cannot_review_and_see_no_form(people, client):
    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    login(client, "doc@example.org")
    assert b"Expert review" not in client.get(f"/cases/{case_id}").data
    assert client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "certain"}).status_code == 403
    assert client.get("/reviews").status_code == 403
    assert client.get("/admin/review-statistics").status_code == 403


def test_unknown_or_unfinished_case_cannot_be_reviewed(people, client):
    from webapp.extensions import db
    from webapp.models import Case

    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    login(client, "rev@example.org")
    token = _token(client.get(f"/cases/{case_id}").data)
    assert client.post("/cases/999/review", data={"verdict": "agree"}).status_code == 404
    with app.app_context():
        db.session.get(Case, case_id).status = "running"
        db.session.commit()
    response = client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "certain", "opened": token})
    assert response.status_code == 400 and b"no finished prediction" in response.data


def test_csrf_is_required(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    case_id = finished_case(app, model_version(app), 0.8)
    client = app.test_client()
    page = client.get("/login").data
    client.post("/login", data={"email": "rev@example.org", "password": "quiet-harbour-lamp", "csrf_token": csrf_token(page)})
    page = client.get(f"/cases/{case_id}").data
    data = {"verdict": "agree", "confidence": "certain", "opened": _token(page)}
    assert client.post(f"/cases/{case_id}/review", data=data).status_code == 400
    assert client.post(f"/cases/{case_id}/review", data={**data, "csrf_token": csrf_token(page)}).status_code == 303


def test_queue_lists_unreviewed_cases_most_uncertain_first_or_by_date(people, client):
    app = people
    version = model_version(app, threshold=0.4)
    # |p - 0.4|: 0.5, 0.05, 0.3, 0.01
    ids = [finished_case(app, version, p, threshold=0.4, seed=i) for i, p in enumerate((0.9, 0.45, 0.1, 0.39))]
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():  # a case still running is not in the queue
        db.session.get(Case, finished_case(app, version, 0.4, threshold=0.4, seed=9)).status = "running"
        db.session.commit()
    review(app, ids[1], "rev@example.org", "agree")
    review(app, ids[3], "rev2@example.org", "agree")  # someone else's review does not count
    login(client, "rev@example.org")

    def order(sort=""):
        page = client.get(f"/reviews?sort={sort}" if sort else "/reviews").data.decode()
        # the links open the case page at the top, carrying the queue order for "Save & next"
        return [int(n) for n in re.findall(r'/cases/\d+\?queue=\w+">#(\d+) ', page)]

    assert order() == [ids[3], ids[2], ids[0]]
    assert order("oldest") == [ids[0], ids[2], ids[3]]
    assert order("newest") == [ids[3], ids[2], ids[0]]
    assert client.get("/reviews?sort=sideways").status_code == 400
    assert client.get("/reviews?page=x").status_code == 400


def test_blinded_review_hides_the_model_then_keeps_both_answers(people, client):
    from webapp.models import Review, ReviewRevision

    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    login(client, "rev@example.org")
    response = client.post("/reviews/settings", data={"blinded": "y"})
    assert response.status_code == 303
    page = client.get(f"/cases/{case_id}").data
    assert b"Model output" not in page and b"Blinded review" in page and b'id="heatmap"' not in page
    assert client.get(f"/cases/{case_id}/heatmap").status_code == 403
    assert client.get(f"/cases/{case_id}/status").get_json()["probability"] is None
    assert b"Model label" not in client.get("/reviews").data
    # confirming before the blind label is refused
    refused = client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "certain", "opened": _token(page)})
    assert refused.status_code == 400 and b"give your own label" in refused.data
    response = client.post(f"/cases/{case_id}/review/blind", data={"label": "normal", "confidence": "unsure",
                                                                   "opened": _token(page)})
    assert response.status_code == 303
    page = client.get(f"/cases/{case_id}").data
    assert b"Model output" in page and b"Your blind label" in page
    assert client.post(f"/cases/{case_id}/review/blind", data={"label": "normal", "confidence": "unsure",
                                                                "opened": _token(page)}).status_code == 400
    client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "probable", "opened": _token(page)})
    (saved,) = _rows(app, Review)
    assert (saved.blinded, saved.blinded_label, saved.blinded_confidence) == (True, "normal", "unsure")
    assert (saved.verdict, saved.label, saved.confidence) == ("agree", "cancer", "probable")
    assert saved.reading_seconds is not None and saved.reading_seconds >= saved.blinded_seconds
    stages = [r.stage for r in sorted(_rows(app, ReviewRevision), key=lambda r: r.revision)]
    assert stages == ["blinded", "final"]


def test_blinded_case_list_hides_the_model_output_until_the_blind_read(people, client):
    app = people
    version = model_version(app)
    hidden_id = finished_case(app, version, 0.83)
    login(client, "rev@example.org")
    client.post("/reviews/settings", data={"blinded": "y"})
    page = client.get("/cases").data.decode()
    row = page[page.index(f">#{hidden_id}<"):].split("</tr>")[0]
    assert "hidden until your blind read" in row and "83.0 %" not in row and "cancer" not in row
    assert 'name="label"' not in page and "probability" not in page.split('name="sort"')[1].split("</select>")[0]
    # filtering or sorting by the model's output would leak it
    assert client.get("/cases?label=cancer").status_code == 400
    assert client.get("/cases?sort=probability_desc").status_code == 400
    page = client.get(f"/cases/{hidden_id}").data
    client.post(f"/cases/{hidden_id}/review/blind", data={"label": "normal", "confidence": "unsure",
                                                          "opened": _token(page)})
    row = client.get("/cases").data.decode()
    row = row[row.index(f">#{hidden_id}<"):].split("</tr>")[0]
    assert "83.0 %" in row and "hidden until" not in row


def test_site_wide_blinded_mode(make_app):
    app = make_app(REVIEW_BLINDED=True)
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    case_id = finished_case(app, model_version(app), 0.8)
    client = app.test_client()
    login(client, "rev@example.org")
    page = client.get(f"/cases/{case_id}").data
    assert b"Model output" not in page and b"Save my label" in page


def test_admins_review_too_and_the_case_lists_everyone(people, client):
    from webapp.extensions import db
    from webapp.models import Case, Review

    app = people
    case_id = finished_case(app, model_version(app), 0.8)
    review(app, case_id, "rev@example.org", "disagree", "normal", comment="looks benign")
    login(client, "boss@example.org")
    page = client.get(f"/cases/{case_id}").data
    client.post(f"/cases/{case_id}/review", data={"verdict": "agree", "confidence": "certain", "opened": _token(page)})
    page = client.get(f"/cases/{case_id}").data.decode()
    assert "rev@example.org" in page and "looks benign" in page and "boss@example.org" in page
    with app.app_context():
        assert db.session.get(Case, case_id).review_count == 2
        assert db.session.scalar(select(func.count()).select_from(Review)) == 2
    assert client.get("/cases?reviewed=yes").status_code == 200
