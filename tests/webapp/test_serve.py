"""`manage.py serve`: the production web server (gunicorn) starts, answers, stops on SIGTERM,
and refuses settings it must not run with (docs/deploy.md)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from click.testing import CliRunner

import manage
from webapp.cli import MIN_SECRET_KEY_LENGTH, serve_refusal
from webapp.config import PROJECT_ROOT, load_config

SETTINGS = ("INSTANCE_PATH", "DATABASE_URL", "CELERY_BROKER_URL", "TASK_QUEUE", "SECRET_KEY", "STORAGE_DIR")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture
def serve_env(tmp_path, migrated_db_template, embedded_broker_url, monkeypatch):
    """Environment of a one-machine deployment: a migrated SQLite database and a broker
    on a local socket (so no SECRET_KEY of its own is needed)."""
    instance = tmp_path / "instance"
    instance.mkdir()
    shutil.copy(migrated_db_template, instance / "app.db")
    env = {"INSTANCE_PATH": str(instance), "DATABASE_URL": f"sqlite:///{instance / 'app.db'}",
           "CELERY_BROKER_URL": embedded_broker_url, "TASK_QUEUE": f"test-{uuid.uuid4().hex[:12]}"}
    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _invoke(*args):
    return CliRunner().invoke(manage.cli, ["serve", *args], catch_exceptions=False)


@pytest.mark.slow
def test_serve_starts_answers_healthz_and_stops_on_sigterm(serve_env, tmp_path):
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(serve_env)
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "manage.py"), "serve", "--port", str(port), "--workers", "2",
         "--threads", "2"], cwd=PROJECT_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status, body, headers = _get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        assert status == 200, log_path.read_text()
        # web only: no worker runs beside `serve` here, which /healthz says without failing
        assert json.loads(body) == {"status": "degraded", "database": "ok", "broker": "ok",
                                    "worker": "no live worker"}
        assert headers["Server"] == "gunicorn"  # gunicorn's own header: no version in it
        status, body, _ = _get(f"http://127.0.0.1:{port}/login")
        assert status == 200 and b"csrf_token" in body
        log = log_path.read_text()
        assert "serving on http://127.0.0.1:" in log and "with 2 process(es) x 2 thread(s)" in log
        assert log.count("Booting worker with pid") == 2, log

        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
        assert "Shutting down: Master" in log_path.read_text()
        with pytest.raises(OSError):  # nobody listens any more
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Nothing of it is left behind: the web processes were in its session.
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


def test_serve_refuses_a_database_that_is_not_migrated(serve_env, tmp_path, monkeypatch):
    empty = tmp_path / "empty.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{empty}")
    result = _invoke("--port", str(_free_port()))
    assert result.exit_code == 1
    assert "the database is not initialised or not up to date: run 'python manage.py init' first" in result.output


def test_serve_refuses_an_unreachable_database(serve_env, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://nobody@127.0.0.1:{_free_port()}/none")
    monkeypatch.setenv("SECRET_KEY", "k" * MIN_SECRET_KEY_LENGTH)
    result = _invoke()
    assert result.exit_code == 1 and "cannot reach the database: OperationalError" in result.output


def test_serve_refuses_the_embedded_broker(serve_env, monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "embedded")
    result = _invoke()
    assert result.exit_code == 1
    assert "'serve' runs the web app only and starts no broker: set CELERY_BROKER_URL=redis://" in result.output


@pytest.mark.parametrize("database, broker", [
    ("postgresql://postgres@db.example.org/app", "redis://127.0.0.1:6379/0"),   # PostgreSQL
    (None, "redis://queue.example.org:6379/0"),                                  # a broker elsewhere
    (None, "rediss://:password@10.1.2.3:6380/0"),                                # the same over TLS
])
def test_serve_refuses_a_generated_or_short_secret_key_beyond_one_machine(serve_env, monkeypatch, database, broker):
    if database:
        monkeypatch.setenv("DATABASE_URL", database)
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    # Refused before any connection is tried (these hosts do not exist).
    result = _invoke()
    assert result.exit_code == 1 and "SECRET_KEY is not set" in result.output and "same key" in result.output
    monkeypatch.setenv("SECRET_KEY", "changeme")
    result = _invoke()
    assert result.exit_code == 1 and "SECRET_KEY is too short (8 characters)" in result.output
    monkeypatch.setenv("SECRET_KEY", "x" * MIN_SECRET_KEY_LENGTH)
    assert serve_refusal(load_config()) is None


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "redis://localhost/3", "rediss://[::1]:6380/0",
                                    "redis+socket:///tmp/r.sock"])
def test_one_machine_needs_no_secret_key_of_its_own(serve_env, monkeypatch, broker):
    # SQLite cannot be shared between machines and the broker is local: the key generated
    # into the instance folder is shared by every web process of this machine.
    monkeypatch.setenv("CELERY_BROKER_URL", broker)
    settings = load_config()
    assert settings["SECRET_KEY_GENERATED"] and serve_refusal(settings) is None
