"""Issue 10 items 4-5: upload caps, a full disk and a locked database give a true 503
(Retry-After) and leave no orphan files or rows; big images are decoded bounded."""
from __future__ import annotations

import io
import sqlite3
import subprocess

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from tests.appfixtures import add_user, image_bytes, login, register_model


def _upload(client, *files):
    return client.post("/cases/upload", data={"images": [(io.BytesIO(c), n) for n, c in files]})


def _rows_and_files(app):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        keys = sorted(db.session.scalars(select(Case.image_key)).all())
    root = app.extensions["file_store"].root / "images"
    files = sorted(str(p.relative_to(app.extensions["file_store"].root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []
    return keys, files


def _noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_too_many_files_is_413_and_stores_nothing(make_app):
    app = make_app(MAX_FILES_PER_UPLOAD=2)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    response = _upload(client, *[(f"{i}.png", image_bytes(seed=i)) for i in range(3)])
    assert response.status_code == 413
    assert "3 files were sent at once; the limit is 2 per upload" in response.data.decode()
    assert _rows_and_files(app) == ([], [])


def test_uploads_per_minute_are_capped_with_429_and_retry_after(make_app):
    app = make_app(UPLOADS_PER_USER_PER_MINUTE=3)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    assert _upload(client, ("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2))).status_code == 303
    response = _upload(client, ("c.png", image_bytes(seed=3)), ("d.png", image_bytes(seed=4)))
    assert response.status_code == 429 and response.headers["Retry-After"] == "60"
    assert "limit is 3 per minute" in response.data.decode()
    assert len(_rows_and_files(app)[0]) == 2


def test_full_disk_is_503_with_true_per_file_outcome_and_no_orphans(make_app, tmp_path):
    storage = tmp_path / "tiny"
    storage.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(storage)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        app = make_app(STORAGE_DIR=str(storage), RETRY_AFTER_S=45)
        add_user(app, "doc@example.org")
        client = app.test_client()
        login(client, "doc@example.org")
        response = _upload(client, ("small.png", image_bytes(seed=1)), ("big.png", _noise_png(600, 2)),
                           ("last.png", image_bytes(seed=3)))
        text = response.data.decode()
        assert response.status_code == 503 and response.headers["Retry-After"] == "45"
        assert "the image storage is full or not writable" in text
        assert "Saved: small.png (case 1)." in text and "Not saved: big.png, last.png." in text
        keys, files = _rows_and_files(app)
        assert keys == files and len(keys) == 1  # one case, its file, nothing else
        assert not [p for p in storage.rglob(".incoming-*")]
    finally:
        subprocess.run(["umount", str(storage)], check=False)


def test_locked_database_is_503_and_leaves_no_file(make_app):
    app = make_app(SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 0.2}})
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    path = app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        response = _upload(client, ("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2)))
    finally:
        other.execute("ROLLBACK")
        other.close()
    text = response.data.decode()
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert "Not saved: a.png, b.png." in text and "Saved:" not in text
    assert _rows_and_files(app) == ([], [])


def test_workers_recycle_by_memory(make_app):
    app = make_app(WORKER_MAX_MEMORY_MB=1200)
    assert app.extensions["celery"].conf.worker_max_memory_per_child == 1200 * 1024


def test_a_big_image_is_predicted_at_a_bounded_size(make_app, tiny_checkpoint):
    from webapp.extensions import db
    from webapp.models import Case
    from worker.prediction import predict_case

    app = make_app(WORKER_IMAGE_MAX_SIDE=512)
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    assert _upload(client, ("wide.png", image_bytes(size=(3000, 1000), seed=5))).status_code == 303
    with app.app_context():
        assert predict_case(1) == "done"
        case = db.session.get(Case, 1)
        heatmap = app.extensions["file_store"].path(case.latest_prediction.heatmap_key)
        with Image.open(heatmap) as img:
            assert max(img.size) <= 512 and img.size[0] > img.size[1]
