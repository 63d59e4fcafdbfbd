"""The API's case list (newest first, pages, the same visibility as the pages) and
withdrawn cases: never listed, and 410 Gone for those who may see them (404 for others)."""
from __future__ import annotations

import io

from tests.apiclient import bearer, check_response, make_token
from tests.appfixtures import add_user, image_bytes, login


def _upload(client, token, seed):
    response = client.post("/api/v1/cases", headers=bearer(token),
                           data={"images": [(io.BytesIO(image_bytes(seed=seed)), f"scan-{seed}.png")]})
    assert response.status_code == 201, response.data
    return response.get_json()["cases"][0]["id"]


def test_the_list_pages_newest_first_and_leaves_out_withdrawn_cases(app, client):
    add_user(app, "doc@example.org")
    add_user(app, "other@example.org")
    add_user(app, "rev@example.org", "reviewer")
    doc, other, rev = (make_token(app, e) for e in ("doc@example.org", "other@example.org", "rev@example.org"))
    document = client.get("/api/v1/openapi.json", headers=bearer(doc)).get_json()
    mine = [_upload(client, doc, seed) for seed in (1, 2, 3)]
    theirs = _upload(client, other, 4)
    login(client, "doc@example.org")
    assert client.post(f"/cases/{mine[1]}/withdraw", data={"confirm": "y"}).status_code in (302, 303)

    def ids(token, query=""):
        response = client.get(f"/api/v1/cases{query}", headers=bearer(token))
        check_response(document, "GET", "/api/v1/cases", response)
        assert response.status_code == 200, response.data
        return [c["id"] for c in response.get_json()["cases"]], response.get_json()["next"]

    assert ids(doc) == ([mine[2], mine[0]], None)
    assert ids(rev) == ([theirs, mine[2], mine[0]], None)
    assert ids(rev, "?status=done") == ([], None)
    first, next_url = ids(rev, "?limit=2")
    assert first == [theirs, mine[2]] and next_url
    assert ids(rev, next_url.removeprefix("/api/v1/cases")) == ([mine[0]], None)
    for bad in ("?limit=0", "?limit=101", "?limit=x", "?before=0", "?status=lost"):
        response = client.get(f"/api/v1/cases{bad}", headers=bearer(rev))
        check_response(document, "GET", "/api/v1/cases", response)
        assert response.status_code == 400, bad

    withdrawn = f"/api/v1/cases/{mine[1]}"
    for token in (doc, rev):
        for path in (withdrawn, withdrawn + "/image"):
            response = client.get(path, headers=bearer(token))
            check_response(document, "GET", path, response)
            assert response.status_code == 410 and "was withdrawn" in response.get_json()["message"]
    review = client.post(withdrawn + "/reviews", headers=bearer(rev), json={"verdict": "agree", "confidence": "certain"})
    check_response(document, "POST", withdrawn + "/reviews", review)
    assert review.status_code == 410
    # Someone who may not see the case learns nothing, withdrawn or not.
    assert client.get(withdrawn, headers=bearer(other)).status_code == 404
    assert client.get(f"/api/v1/cases/{mine[0]}", headers=bearer(other)).status_code == 404


def test_reading_a_case_through_the_api_is_audited_as_a_view(app, client):
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import AuditEvent

    add_user(app, "doc@example.org")
    token = make_token(app, "doc@example.org")
    case_id = _upload(client, token, 7)
    for _ in range(2):  # the second read falls in the same window: one event
        assert client.get(f"/api/v1/cases/{case_id}", headers=bearer(token)).status_code == 200
    with app.app_context():
        events = [(e.actor.email, e.target_id) for e in db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "case.viewed"))]
    assert events == [("doc@example.org", case_id)]
