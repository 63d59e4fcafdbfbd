"""Upload: several files, bad files among good ones, limits, storage by content."""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

from sqlalchemy import func, select

from tests.appfixtures import add_user, image_bytes, login


def _cases(app):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        return db.session.scalars(select(Case).order_by(Case.id)).all()


def _upload(client, *files, note=None, allow_duplicate=None, **kwargs):
    data = {"images": [(io.BytesIO(content), name) for name, content in files]}
    if note is not None:
        data["note"] = note
    if allow_duplicate is not None:
        data["allow_duplicate"] = allow_duplicate
    return client.post("/cases/upload", data=data, **kwargs)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_several_files_become_queued_cases_stored_by_content(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    png, jpeg = image_bytes("PNG", seed=1), image_bytes("JPEG", size=(80, 60), seed=2)
    response = _upload(client, ("left.png", png), ("../scans/right.jpg", jpeg), note="follow-up")
    assert response.status_code == 303 and response.headers["Location"] == "/cases"
    cases = _cases(app)
    assert [(c.status, c.original_filename, c.image_format, c.width, c.height, c.note) for c in cases] == [
        ("queued", "left.png", "PNG", 64, 48, "follow-up"), ("queued", "right.jpg", "JPEG", 80, 60, "follow-up")]
    store = app.extensions["file_store"]
    for case, content in zip(cases, (png, jpeg)):
        assert case.image_sha256 == hashlib.sha256(content).hexdigest()
        assert store.path(case.image_key).read_bytes() == content
        assert "static" not in str(store.path(case.image_key))
    page = client.get("/cases", follow_redirects=True).data
    assert b"left.png" in page and b"right.jpg" in page


def test_one_file_goes_straight_to_its_case_page(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _upload(client, ("a.png", image_bytes()), follow_redirects=True)
    assert response.status_code == 200
    assert b"Case #1" in response.data and b"Waiting for a worker" in response.data


def test_bad_files_are_refused_with_reasons_and_the_good_ones_go_through(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    good = image_bytes(seed=3)
    truncated = image_bytes(size=(200, 200), seed=4)[:-400]
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(gif, format="GIF")
    response = _upload(client, ("good.png", good), ("notes.txt", b"not an image at all"),
                       ("broken.png", truncated), ("anim.gif", gif.getvalue()), ("empty.png", b""),
                       follow_redirects=True)
    assert response.status_code == 200
    text = response.data.decode()
    assert "notes.txt was not accepted: it is not an image file (PNG, JPEG or DICOM expected)" in text
    assert "broken.png was not accepted: the image is damaged or incomplete" in text
    assert "anim.gif was not accepted: it is a GIF image; only PNG and JPEG are accepted" in text
    assert "empty.png was not accepted: the file is empty" in text
    assert [c.original_filename for c in _cases(app)] == ["good.png"]


def test_only_bad_files_give_400_and_store_nothing(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _upload(client, ("broken.png", image_bytes()[:50]))
    assert response.status_code == 400
    assert b"broken.png was not accepted" in response.data
    assert _cases(app) == []


def test_no_file_chosen_is_a_400_with_a_message(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = client.post("/cases/upload", data={"note": "x"})
    assert response.status_code == 400 and b"Choose at least one PNG, JPEG or DICOM file" in response.data


def test_decompression_bomb_is_refused_before_decoding(make_app):
    app = make_app(MAX_IMAGE_PIXELS=1_000_000)
    client = app.test_client()
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _upload(client, ("bomb.png", _png_header_only(5_000, 5_000)), ("huge.png", _png_header_only(30_000, 30_000)),
                       ("ok.png", image_bytes()), follow_redirects=True)
    text = response.data.decode()
    assert "bomb.png was not accepted: the image has 5000×5000 pixels; the limit is 1,000,000 pixels" in text
    assert "huge.png was not accepted: the image has too many pixels (limit 1,000,000)" in text
    assert [c.original_filename for c in _cases(app)] == ["ok.png"]


def test_image_over_the_per_file_limit_is_refused(make_app):
    app = make_app(MAX_IMAGE_BYTES=10_000)
    client = app.test_client()
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    big = image_bytes(size=(200, 200), seed=5)
    response = _upload(client, ("big.png", big), ("small.png", image_bytes(size=(16, 16))), follow_redirects=True)
    assert "big.png was not accepted: the file is 0.1 MB; the limit is 0.0 MB per image" in response.data.decode()
    assert [c.original_filename for c in _cases(app)] == ["small.png"]


def test_oversize_request_is_413_with_a_clear_message_and_stores_nothing(make_app):
    app = make_app(MAX_CONTENT_LENGTH=50_000)
    client = app.test_client()
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _upload(client, ("a.png", image_bytes(size=(300, 300), seed=6)), ("b.png", image_bytes()))
    assert response.status_code == 413
    assert b"larger than the 0 MB limit for one submission, so nothing was stored" in response.data
    assert _cases(app) == []
    json_response = client.post("/cases/upload", data={"images": [(io.BytesIO(b"x" * 60_000), "a.png")]},
                                headers={"Accept": "application/json"})
    assert json_response.status_code == 413 and json_response.get_json()["error"] == "Upload too large"


def test_same_image_twice_is_stored_once(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    content = image_bytes(seed=7)
    _upload(client, ("a.png", content))
    # "Upload again" ticked: a second case (a plain repeat links to the first one instead).
    _upload(client, ("again.png", content), allow_duplicate="y")
    cases = _cases(app)
    assert len(cases) == 2 and cases[0].image_key == cases[1].image_key
    files = list((app.extensions["file_store"].root / "images").rglob("*.png"))
    assert len(files) == 1


def test_without_a_broker_the_case_waits_in_the_outbox_and_the_sweep_sends_it(make_app):
    from webapp.background import WAITING_FOR_QUEUE, sweep_cases

    app = make_app(CELERY_BROKER_URL="embedded")  # no embedded broker runs for this instance
    client = app.test_client()
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    response = _upload(client, ("a.png", image_bytes()), follow_redirects=True)
    assert b"sent to it automatically as soon as it is back" in response.data
    (case,) = _cases(app)
    assert (case.status, case.dispatched_at, case.error) == ("queued", None, WAITING_FOR_QUEUE)
    page = client.get("/cases/1").data
    assert b"Waiting for a worker" in page
    for internal in (b"manage.py", b"CELERY_BROKER_URL", b"Redis", b"no job queue"):
        assert internal not in page  # how the service is built is for the logs, not clinicians
    # The broker is back for a process that reaches it (a worker's sweep, or manage.py sweep).
    back = make_app(SQLALCHEMY_DATABASE_URI=app.config["SQLALCHEMY_DATABASE_URI"],
                    STORAGE_DIR=app.config["STORAGE_DIR"], TASK_QUEUE=app.config["TASK_QUEUE"])
    with back.app_context():
        result = sweep_cases(back)
        assert (result.sent, result.resent, result.waiting) == ([1], [], 0)
        assert sweep_cases(back).sent == []  # sent once: the next pass leaves it alone
    (case,) = _cases(app)
    assert case.status == "queued" and case.dispatched_at is not None and case.error is None


def test_audit_records_each_upload(app, client):
    from webapp.extensions import db
    from webapp.models import AuditEvent

    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    _upload(client, ("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2)))
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "case.upload")) == 2
