"""The case list: keyset pages, filters, sorts, and a constant number of queries."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import event

from tests.appfixtures import add_user, login


@pytest.fixture
def many_cases(app):
    """60 cases by two clinicians with known status, label, probability and review count."""
    from webapp.extensions import db
    from webapp.models import Case, utcnow

    a = add_user(app, "a@example.org")
    b = add_user(app, "b@example.org")
    add_user(app, "rev@example.org", "reviewer")
    start = utcnow()
    with app.app_context():
        for i in range(60):
            done = i % 3 != 0
            db.session.add(Case(
                uploader_id=a if i % 2 == 0 else b, created_at=start + timedelta(seconds=i // 2),  # ties on time
                status="done" if done else "queued", image_sha256="0" * 64,
                image_key=f"images/00/{'0' * 64}.png", image_format="PNG", original_filename=f"case-{i}.png",
                width=10, height=10, label=("cancer" if i % 4 == 1 else "normal") if done else None,
                probability=(i * 7 % 60) / 60 if done else None, review_count=1 if i % 5 == 0 else 0))
        db.session.commit()


def _ids(html: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb'href="/cases/(\d+)">#', html)]


def _links(html: bytes) -> dict[str, str]:
    return {rel: href.replace("&amp;", "&") for rel, href in
            re.findall(r'rel="(next|prev)" href="([^"]+)"', html.decode())}



@pytest.fixture
def reviewer_client(app, client, many_cases):
    login(client, "rev@example.org")
    return client


def test_keyset_pages_cover_every_case_once_in_order(app, reviewer_client):
    client = reviewer_client
    seen, pages, url = [], [], "/cases"
    while url:
        html = client.get(url).data
        pages.append(url)
        seen += _ids(html)
        url = _links(html).get("next")
    assert len(pages) == 3 and len(seen) == 60 and len(set(seen)) == 60
    assert seen == sorted(seen, reverse=True)  # newest first; ties on time broken by id
    html = client.get(pages[-1]).data
    back = _ids(client.get(_links(html)["prev"]).data)
    assert back == seen[25:50]


def test_filters_and_sorts(app, reviewer_client):
    client = reviewer_client
    queued = _ids(client.get("/cases?status=queued").data)
    assert queued and all((i - 1) % 3 == 0 for i in queued)
    cancer = _ids(client.get("/cases?label=cancer").data)
    assert cancer and all((i - 1) % 4 == 1 for i in cancer)
    reviewed = _ids(client.get("/cases?reviewed=yes").data)
    assert sorted(reviewed) == [i + 1 for i in range(60) if i % 5 == 0]
    assert sorted(_ids(client.get("/cases?reviewed=no").data)) == [i + 1 for i in range(60) if i % 5][-25:]
    from webapp.extensions import db
    from webapp.models import Case

    html = client.get("/cases?sort=probability_desc").data
    ids = _ids(html)
    with app.app_context():
        probabilities = [db.session.get(Case, i).probability for i in ids]
    assert None not in probabilities and probabilities == sorted(probabilities, reverse=True)
    assert b"only cases with a result are listed" in html
    nxt = _links(html)["next"]
    more = _ids(client.get(nxt).data)
    assert len(ids) + len(more) == 40 and not set(ids) & set(more)


def test_clinicians_list_only_their_own_cases(app, client, many_cases):
    login(client, "a@example.org")
    ids = []
    url = "/cases"
    while url:
        html = client.get(url).data
        ids += _ids(html)
        url = _links(html).get("next")
    assert sorted(ids) == [i + 1 for i in range(0, 60, 2)]
    assert b"a@example.org</td>" not in html  # no uploader column for clinicians


@pytest.mark.parametrize("query", ["status=lost", "label=maybe", "sort=random", "reviewed=perhaps", "after=garbage"])
def test_bad_list_parameters_are_400_with_a_message(reviewer_client, query):
    response = reviewer_client.get(f"/cases?{query}")
    assert response.status_code == 400
    assert b"unknown" in response.data or b"damaged" in response.data or b"must be" in response.data


def test_the_list_runs_a_fixed_number_of_queries(app, reviewer_client):
    from webapp.extensions import db

    statements = []
    with app.app_context():
        engine = db.engine

    def count(*_args):
        statements.append(1)

    event.listen(engine, "before_cursor_execute", count)
    try:
        reviewer_client.get("/cases")  # 25 rows with their uploaders
        first = len(statements)
        statements.clear()
        reviewer_client.get("/cases?per_page=5&status=done")
        second = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert first <= 3 and second <= 3  # user loader + one page query (+ nothing per row)
