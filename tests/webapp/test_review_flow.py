"""Issue 11, the review flow: "Save & next" through the queue in the order it was opened
in, "next without saving", the progress count, and the blind read on the way; through
the Flask test client on the real database."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from tests.appfixtures import add_user, csrf_token, login
from tests.webapp.reviewdata import finished_case, model_version, review


@pytest.fixture
def people(app):
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    add_user(app, "rev2@example.org", "reviewer")
    return app


@pytest.fixture
def queue_cases(people):
    """Four finished cases; |probability - threshold| 0.5, 0.05, 0.3, 0.01, so the
    "most uncertain first" order is ids[3], ids[1], ids[2], ids[0]."""
    version = model_version(people, threshold=0.4)
    return [finished_case(people, version, p, threshold=0.4, seed=i) for i, p in enumerate((0.9, 0.45, 0.1, 0.39))]


def _token(page: bytes) -> str:
    return re.search(rb'name="opened" value="([^"]+)"', page).group(1).decode()


def _progress(page: bytes) -> str:
    match = re.search(rb"<strong>(\d+ of \d+ left)</strong>", page)
    assert match, "no progress count on the page"
    return match.group(1).decode()


def _save_next(client, case_id: int, queue: str, **fields):
    page = client.get(f"/cases/{case_id}?queue={queue}").data
    assert f'name="queue" value="{queue}"'.encode() in page
    data = {"verdict": "agree", "confidence": "certain", "opened": _token(page), "queue": queue, "save_next": "1",
            **fields}
    return page, client.post(f"/cases/{case_id}/review", data=data)


def _review_count(app) -> int:
    from webapp.extensions import db
    from webapp.models import Review

    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Review).where(Review.verdict.is_not(None)))


def test_save_and_next_walks_the_queue_in_its_order_then_says_it_is_done(people, client, queue_cases):
    ids = queue_cases
    login(client, "rev@example.org")
    queue = client.get("/reviews").data
    assert _progress(queue) == "4 of 4 left"
    # The queue's links open the case page at its top, with the queue order.
    assert f'href="/cases/{ids[3]}?queue=uncertain"'.encode() in queue and b"#review" not in queue
    assert re.search(rb'id="start-reading"\s+href="/cases/(\d+)\?queue=uncertain"', queue).group(1) == str(ids[3]).encode()

    visited, current, lefts = [], ids[3], []
    while True:
        page, response = _save_next(client, current, "uncertain")
        lefts.append(_progress(page))
        visited.append(current)
        assert response.status_code == 303
        location = response.headers["Location"]
        if not location.startswith("/cases/"):
            break
        current = int(re.fullmatch(r"/cases/(\d+)\?queue=uncertain", location).group(1))
    assert visited == [ids[3], ids[1], ids[2], ids[0]]
    assert lefts == ["4 of 4 left", "3 of 4 left", "2 of 4 left", "1 of 4 left"]
    assert location == "/reviews?sort=uncertain"
    done = client.get(location).data
    assert b"Queue done: every finished case has your review." in done and _progress(done) == "0 of 4 left"
    assert _review_count(people) == 4


@pytest.mark.parametrize("order", ["oldest", "newest"])
def test_save_and_next_keeps_the_date_orders(people, client, queue_cases, order):
    ids = queue_cases if order == "oldest" else queue_cases[::-1]
    login(client, "rev@example.org")
    _, response = _save_next(client, ids[0], order)
    assert response.headers["Location"] == f"/cases/{ids[1]}?queue={order}"
    _, response = _save_next(client, ids[1], order)
    assert response.headers["Location"] == f"/cases/{ids[2]}?queue={order}"


def test_plain_save_stays_on_the_case_and_keeps_the_queue_order(people, client, queue_cases):
    login(client, "rev@example.org")
    page = client.get(f"/cases/{queue_cases[0]}?queue=oldest").data
    response = client.post(f"/cases/{queue_cases[0]}/review", data={
        "verdict": "agree", "confidence": "certain", "opened": _token(page), "queue": "oldest"})
    assert response.status_code == 303 and response.headers["Location"] == f"/cases/{queue_cases[0]}?queue=oldest"
    assert _progress(client.get(f"/cases/{queue_cases[1]}?queue=oldest").data) == "3 of 4 left"
    # Reached without the queue (a bookmark, the case list): no count; Save & next uses the default order.
    page = client.get(f"/cases/{queue_cases[1]}").data
    assert b"left</strong>" not in page and b'name="queue" value=""' in page


def test_next_without_saving_skips_and_comes_back_round(people, client, queue_cases):
    ids = queue_cases
    login(client, "rev@example.org")
    page = client.get(f"/cases/{ids[3]}?queue=uncertain").data
    assert f'href="/reviews/next?after={ids[3]}&amp;queue=uncertain"'.encode() in page
    response = client.get(f"/reviews/next?after={ids[3]}&queue=uncertain")
    assert response.status_code == 303 and response.headers["Location"] == f"/cases/{ids[1]}?queue=uncertain"
    # Saving the second case goes on to the third, not back to the skipped first ...
    _, response = _save_next(client, ids[1], "uncertain")
    assert response.headers["Location"] == f"/cases/{ids[2]}?queue=uncertain"
    _, response = _save_next(client, ids[2], "uncertain")
    assert response.headers["Location"] == f"/cases/{ids[0]}?queue=uncertain"
    # ... and after the last one the queue starts again from the top: the skipped case.
    _, response = _save_next(client, ids[0], "uncertain")
    assert response.headers["Location"] == f"/cases/{ids[3]}?queue=uncertain"
    # Skipping the only case left says so, and nothing was saved by skipping.
    response = client.get(f"/reviews/next?after={ids[3]}&queue=uncertain")
    assert response.headers["Location"] == "/reviews?sort=uncertain"
    assert b"No other case is waiting in your queue." in client.get(response.headers["Location"]).data
    assert _review_count(people) == 3


def test_other_readers_and_withdrawn_cases_do_not_count_in_the_progress(people, client, queue_cases):
    from webapp.extensions import db
    from webapp.models import Case, utcnow

    review(people, queue_cases[0], "rev2@example.org", "agree")
    with people.app_context():
        db.session.get(Case, queue_cases[1]).withdrawn_at = utcnow()
        db.session.commit()
    login(client, "rev@example.org")
    assert _progress(client.get("/reviews").data) == "3 of 3 left"
    page, response = _save_next(client, queue_cases[3], "uncertain")
    assert response.headers["Location"] == f"/cases/{queue_cases[2]}?queue=uncertain"  # the withdrawn one skipped
    assert _progress(client.get("/reviews").data) == "2 of 3 left"


def test_a_rejected_save_and_next_stays_with_the_queue_order_and_saves_nothing(people, client, queue_cases):
    login(client, "rev@example.org")
    # The model says cancer (0.9 >= 0.4); "agree" with a benign label contradicts it.
    _, response = _save_next(client, queue_cases[0], "oldest", label="benign")
    assert response.status_code == 400 and b"choose disagree" in response.data
    assert b'name="queue" value="oldest"' in response.data and b'value="benign" selected' in response.data
    assert _review_count(people) == 0


def test_bad_queue_orders_and_case_numbers_are_refused_clearly(people, client, queue_cases):
    login(client, "rev@example.org")
    response = client.get(f"/cases/{queue_cases[0]}?queue=sideways")
    assert response.status_code == 400 and b"unknown order" in response.data
    assert client.get(f"/reviews/next?after={queue_cases[0]}&queue=sideways").status_code == 400
    assert client.get("/reviews/next?after=x").status_code == 400
    page = client.get(f"/cases/{queue_cases[0]}").data
    response = client.post(f"/cases/{queue_cases[0]}/review", data={
        "verdict": "agree", "confidence": "certain", "opened": _token(page), "queue": "sideways", "save_next": "1"})
    assert response.status_code == 400 and _review_count(people) == 0


def test_clinicians_get_no_queue(people, client, queue_cases):
    login(client, "doc@example.org")
    page = client.get(f"/cases/{queue_cases[0]}").data
    assert b"left</strong>" not in page and b"Save &amp; next" not in page
    assert client.get(f"/reviews/next?after={queue_cases[0]}").status_code == 403


def test_the_blind_read_keeps_the_queue_order_for_save_and_next(people, client, queue_cases):
    ids = queue_cases
    login(client, "rev@example.org")
    client.post("/reviews/settings", data={"blinded": "y"})
    page = client.get(f"/cases/{ids[3]}?queue=uncertain").data
    assert b"Save my label" in page and b"Model output" not in page
    assert b'name="queue" value="uncertain"' in page
    response = client.post(f"/cases/{ids[3]}/review/blind", data={
        "label": "benign", "confidence": "unsure", "opened": _token(page), "queue": "uncertain"})
    assert response.status_code == 303 and response.headers["Location"] == f"/cases/{ids[3]}?queue=uncertain"
    # The confirmation: "benign" counts as normal; the model says normal (0.39 < 0.4).
    _, response = _save_next(client, ids[3], "uncertain", label="benign")
    assert response.headers["Location"] == f"/cases/{ids[1]}?queue=uncertain"
    assert b"Save my label" in client.get(response.headers["Location"]).data  # blind again


def test_save_and_next_needs_the_csrf_token(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    version = model_version(app)
    first, second = finished_case(app, version, 0.8, seed=1), finished_case(app, version, 0.85, seed=2)
    client = app.test_client()
    page = client.get("/login").data
    client.post("/login", data={"email": "rev@example.org", "password": "quiet-harbour-lamp", "csrf_token": csrf_token(page)})
    page = client.get(f"/cases/{first}?queue=oldest").data
    data = {"verdict": "agree", "confidence": "certain", "opened": _token(page), "queue": "oldest", "save_next": "1"}
    assert client.post(f"/cases/{first}/review", data=data).status_code == 400
    response = client.post(f"/cases/{first}/review", data={**data, "csrf_token": csrf_token(page)})
    assert response.status_code == 303 and response.headers["Location"] == f"/cases/{second}?queue=oldest"
