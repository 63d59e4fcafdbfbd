"""The sweep runs inside every worker: cases uploaded while the broker was down are sent
and predicted once a worker reaches the broker, with nothing else to start."""
from __future__ import annotations

import io
import os
import signal
import time

import pytest

from tests.appfixtures import add_user, image_bytes, login, register_model
from tests.worker.test_worker_recovery import start_worker


@pytest.mark.slow
def test_a_worker_sends_and_predicts_the_cases_of_its_outbox(make_app, tiny_checkpoint, embedded_broker_url, tmp_path):
    from webapp.extensions import db
    from webapp.models import Case

    app = make_app()
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    down = make_app(CELERY_BROKER_URL="redis://127.0.0.1:1/0", SQLALCHEMY_DATABASE_URI=app.config["SQLALCHEMY_DATABASE_URI"],
                    STORAGE_DIR=app.config["STORAGE_DIR"], TASK_QUEUE=app.config["TASK_QUEUE"])
    client = down.test_client()
    login(client, "doc@example.org")
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes(seed=s)), f"{s}.png")
                                                             for s in (1, 2)]})
    assert response.status_code == 303

    log_path = tmp_path / "worker.log"
    worker = start_worker(app, log_path, SWEEP_INTERVAL=1)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with app.app_context():
                states = [(c.status, c.error, c.attempts) for c in db.session.scalars(db.select(Case).order_by(Case.id))]
                db.session.remove()
            if all(state[0] in ("done", "failed") for state in states):
                break
            time.sleep(0.1)
        assert states == [("done", None, 1), ("done", None, 1)], log_path.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
