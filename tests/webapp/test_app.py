"""The factory, configuration, migrations and the no-torch rule of the web process."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from webapp.config import PROJECT_ROOT, load_config


def test_web_process_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "from webapp import create_app\n"
        f"app = create_app({{'INSTANCE_PATH': {str(tmp_path)!r}, 'CELERY_BROKER_URL': 'memory://'}})\n"
        "with app.app_context():\n"
        "    from webapp.extensions import db\n"
        "    db.create_all()\n"
        "r = app.test_client().get('/login')\n"
        "assert r.status_code == 200, r.status_code\n"
        "r = app.test_client().get('/cases')\n"
        "assert r.status_code == 302, r.status_code\n"
        "import webapp.cli, webapp.intake, webapp.registry\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'ml.', 'torchvision')) or m == 'ml')\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_config_reads_the_environment():
    offenders = []
    for package in ("webapp", "worker"):
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            if path.name == "config.py" and path.parent.name == "webapp":
                continue
            if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
                offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert offenders == []


def test_secret_key_is_generated_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    first = load_config({"INSTANCE_PATH": str(tmp_path)})["SECRET_KEY"]
    second = load_config({"INSTANCE_PATH": str(tmp_path)})["SECRET_KEY"]
    assert len(first) == 64 and first == second
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0  # readable by the owner only


def test_environment_configures_database_and_broker(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u@db.example/clinic")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://redis.example:6379/0")
    monkeypatch.setenv("MAX_UPLOAD_MB", "5")
    cfg = load_config({"INSTANCE_PATH": str(tmp_path)})
    assert cfg["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg2://u@db.example/clinic"
    assert cfg["CELERY_BROKER_URL"] == "redis://redis.example:6379/0"
    assert cfg["MAX_CONTENT_LENGTH"] == 5 * 1024 * 1024
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("CELERY_BROKER_URL")
    cfg = load_config({"INSTANCE_PATH": str(tmp_path)})
    assert cfg["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path / 'app.db'}"
    assert cfg["CELERY_BROKER_URL"] == "embedded"
    assert cfg["STORAGE_DIR"] == str(tmp_path / "storage")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(app):
    from webapp.extensions import db

    with app.app_context():
        assert db.session.execute(db.text("PRAGMA journal_mode")).scalar() == "wal"
        assert db.session.execute(db.text("PRAGMA busy_timeout")).scalar() == 30000


def test_migrations_match_the_models(app):
    """A model change without its migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from webapp.extensions import db

    with app.app_context(), db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert diff == []


def test_session_cookie_is_http_only_and_same_site(app, client):
    from tests.appfixtures import add_user, login

    add_user(app, "doc@example.org")
    response = login(client, "doc@example.org")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    # no worker runs in this test: the web app is still healthy, and says so
    assert response.get_json() == {"status": "degraded", "database": "ok", "broker": "ok", "worker": "no live worker"}
