"""Issue 31, item 5: `/healthz` knows whether a worker is alive. A running worker beats a
heartbeat row; a SIGKILLed worker (which used to leave `/healthz` at 200 "ok") is reported
within three intervals; a clean stop removes its row."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.worker.test_worker_recovery import start_worker


def _worker_state(client) -> str:
    return client.get("/healthz").get_json()["worker"]


def _wait_for(client, predicate, timeout: float, log_path) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = _worker_state(client)
        if predicate(state):
            return state
        assert time.monotonic() < deadline, (state, log_path.read_text()[-3000:])
        time.sleep(0.2)


@pytest.mark.slow
def test_healthz_sees_a_live_worker_a_killed_one_and_a_clean_stop(make_app, tmp_path):
    app = make_app(WORKER_HEARTBEAT_S=1)
    client = app.test_client()
    body = client.get("/healthz").get_json()
    assert (body["worker"], body["status"]) == ("no live worker", "degraded")
    assert client.get("/healthz").status_code == 200               # a load balancer keeps the web tier
    assert client.get("/healthz?require=worker").status_code == 503  # a monitor asks for a worker

    log_path = tmp_path / "worker.log"
    worker = start_worker(app, log_path, WORKER_HEARTBEAT_S=1)
    try:
        assert _wait_for(client, lambda s: s.startswith("ok"), 60, log_path) == "ok (1 live)"
        response = client.get("/healthz?require=worker")
        assert response.status_code == 200 and response.get_json()["status"] == "ok"
        # SIGKILL of the main process only (its pool process is left as an orphan)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        state = _wait_for(client, lambda s: not s.startswith("ok"), 10, log_path)
        assert state.startswith("no live worker (last heartbeat "), state
        assert client.get("/healthz?require=worker").status_code == 503
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # a clean stop (SIGTERM) takes the worker's row away at once
    second = start_worker(app, tmp_path / "second.log", WORKER_HEARTBEAT_S=1)
    try:
        _wait_for(client, lambda s: s.startswith("ok"), 60, tmp_path / "second.log")
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        with app.app_context():
            from webapp.extensions import db
            from webapp.models import Heartbeat

            names = [h.name for h in db.session.scalars(db.select(Heartbeat))]
        assert not any(name.endswith(f":{second.pid}") for name in names), names
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
