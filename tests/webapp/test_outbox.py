"""Every case reaches a final state: the broker refusing a job (the outbox), the broker
losing one (sent again after the visibility timeout), an admin re-queueing a stuck case,
and `/healthz` saying which part is down."""
from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from tests.appfixtures import add_user, image_bytes, login, register_model, running_worker, wait_for_case

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused


def _broker(url: str):
    """A plain Redis client on the embedded broker, to look into (or damage) its queues."""
    import redis

    return redis.Redis(unix_socket_path=url.removeprefix("redis+socket://").split("?", 1)[0])


def _upload(client, seed=0):
    response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes(seed=seed)), f"{seed}.png")]})
    assert response.status_code == 303, response.data
    return response


def _case(app, case_id):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        return db.session.get(Case, case_id)


def _predictions(app, case_id):
    from webapp.extensions import db
    from webapp.models import Prediction

    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Prediction).where(Prediction.case_id == case_id))


def _age(app, case_id, seconds):
    """Make a case look silent for ``seconds`` (as if its job had been lost that long ago)."""
    from webapp.extensions import db
    from webapp.models import Case, utcnow

    with app.app_context():
        db.session.execute(update(Case).where(Case.id == case_id)
                           .values(updated_at=utcnow() - timedelta(seconds=seconds)))
        db.session.commit()


def test_a_lost_job_is_sent_again_after_the_visibility_timeout_with_one_result(
        make_app, tiny_checkpoint, embedded_broker_url):
    from webapp.background import sweep_cases
    from webapp.extensions import db
    from webapp.models import AuditEvent

    app = make_app(BROKER_VISIBILITY_TIMEOUT=600)
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    broker, queue = _broker(embedded_broker_url), app.config["TASK_QUEUE"]
    _upload(client, seed=1)
    _upload(client, seed=2)
    assert broker.llen(queue) == 2
    broker.lpop(queue)  # one job is lost, as when the broker dies before writing it to disk
    with app.app_context():
        assert sweep_cases(app).resent == []  # within the visibility timeout: nothing is due
    _age(app, 1, 601)
    _age(app, 2, 601)
    with app.app_context():
        result = sweep_cases(app)
        assert (sorted(result.resent), result.sent, result.waiting) == ([1, 2], [], 0)
        assert sweep_cases(app).resent == []  # claimed: not sent again on the next pass
        events = db.session.scalars(select(AuditEvent.target_id).where(AuditEvent.action == "case.resend")).all()
        assert sorted(events) == [1, 2]
    # Three jobs for two cases: case 2's job was not lost, so it now runs twice.
    assert broker.llen(queue) == 3
    _upload(client, seed=3)  # queued behind them: once it is done, every earlier job has run
    with running_worker(app):
        assert wait_for_case(client, 3)["status"] == "done"
    for case_id in (1, 2):
        case = _case(app, case_id)
        assert (case.status, case.error, case.attempts) == ("done", None, 1)
        assert _predictions(app, case_id) == 1  # the duplicate job found the case done


def test_a_queued_case_is_re_run_by_an_admin_at_once_and_by_its_uploader_once_stuck(make_app, embedded_broker_url):
    app = make_app(BROKER_VISIBILITY_TIMEOUT=600)
    add_user(app, "doc@example.org")
    add_user(app, "admin@example.org", role="admin")
    doc, admin = app.test_client(), app.test_client()
    login(doc, "doc@example.org")
    login(admin, "admin@example.org")
    broker, queue = _broker(embedded_broker_url), app.config["TASK_QUEUE"]
    _upload(doc)
    assert broker.llen(queue) == 1

    response = doc.post("/cases/1/rerun", follow_redirects=True)
    assert b"already waiting for or running its prediction" in response.data
    assert broker.llen(queue) == 1
    assert b"Send again" not in admin.get("/cases").data  # not stuck: no button

    response = admin.post("/cases/1/rerun", follow_redirects=True)  # an admin may insist
    assert b"Queued again." in response.data and broker.llen(queue) == 2

    _age(app, 1, 601)  # no sign of life for longer than the visibility timeout
    assert b"Send again" in doc.get("/cases").data and b"Send again" in admin.get("/cases").data
    response = doc.post("/cases/1/rerun", follow_redirects=True)
    assert b"Queued again." in response.data and broker.llen(queue) == 3
    assert _case(app, 1).status == "queued"


def test_uploads_while_the_broker_is_down_wait_in_the_outbox_and_healthz_says_so(make_app, embedded_broker_url):
    from webapp.background import WAITING_FOR_QUEUE, sweep_cases

    app = make_app(CELERY_BROKER_URL=DEAD_BROKER)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    response = client.post("/cases/upload", follow_redirects=True,
                           data={"images": [(io.BytesIO(image_bytes(seed=s)), f"{s}.png") for s in (1, 2)]})
    assert b"sent to it automatically as soon as it is back" in response.data
    assert b"127.0.0.1" not in response.data and b"Connection" not in response.data
    for case_id in (1, 2):
        case = _case(app, case_id)
        assert (case.status, case.dispatched_at, case.error) == ("queued", None, WAITING_FOR_QUEUE)

    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.get_json() == {"status": "unavailable", "database": "ok", "broker": "not reachable",
                                 "worker": "no live worker"}
    with app.app_context():  # a sweep while the broker is still down sends nothing and loses nothing
        assert (sweep_cases(app).sent, sweep_cases(app).waiting) == ([], 2)
    assert _case(app, 1).error == WAITING_FOR_QUEUE

    back = make_app(SQLALCHEMY_DATABASE_URI=app.config["SQLALCHEMY_DATABASE_URI"],
                    STORAGE_DIR=app.config["STORAGE_DIR"], TASK_QUEUE=app.config["TASK_QUEUE"])
    assert back.test_client().get("/healthz").status_code == 200
    with back.app_context():
        assert sweep_cases(back).sent == [1, 2]
    assert _broker(embedded_broker_url).llen(app.config["TASK_QUEUE"]) == 2
    assert _case(app, 2).error is None


def _postgres_admin():
    try:
        import psycopg2

        connection = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2)
    except Exception:
        return None
    connection.autocommit = True
    return connection


@pytest.mark.postgres
def test_healthz_reports_a_database_that_refuses_writes(make_app):
    import flask_migrate

    from webapp import MIGRATIONS_DIR
    from webapp.extensions import db

    admin = _postgres_admin()
    if admin is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (user postgres)")
    name = f"breast_review_test_{uuid.uuid4().hex[:10]}"
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        app = make_app(SQLALCHEMY_DATABASE_URI=f"postgresql://postgres@127.0.0.1:5432/{name}",
                       SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True})
        with app.app_context():
            flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        # As on a replica, or a primary that ran out of disk and was set read-only.
        admin.cursor().execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        with app.app_context():
            db.engine.dispose()
        response = client.get("/healthz")
        assert response.status_code == 503
        assert response.get_json() == {"status": "unavailable", "database": "not writable", "broker": "ok",
                                       "worker": "no live worker"}
        with app.app_context():
            db.engine.dispose()
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_manage_py_sweep_sends_the_outbox(app, make_app, run_cli, embedded_broker_url):
    down = make_app(CELERY_BROKER_URL=DEAD_BROKER, SQLALCHEMY_DATABASE_URI=app.config["SQLALCHEMY_DATABASE_URI"],
                    STORAGE_DIR=app.config["STORAGE_DIR"], TASK_QUEUE=app.config["TASK_QUEUE"])
    add_user(app, "doc@example.org")
    client = down.test_client()
    login(client, "doc@example.org")
    _upload(client)
    assert _case(app, 1).dispatched_at is None
    result = run_cli("sweep")
    assert result.exit_code == 0, result.output
    assert "sent from the outbox: 1; lost jobs sent again: 0; still waiting: 0" in result.output
    assert _broker(embedded_broker_url).llen(app.config["TASK_QUEUE"]) == 1


def test_after_a_broker_crash_every_pending_case_is_sent_again_at_once(make_app, embedded_broker_url):
    """Issue 31, item 6: after the broker died, an in-flight case waited the whole visibility
    timeout (600 s). `manage.py run` now sweeps with every_pending once the broker is back."""
    from webapp.background import sweep_cases
    from webapp.extensions import db
    from webapp.models import Case

    app = make_app(BROKER_VISIBILITY_TIMEOUT=600)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    broker, queue = _broker(embedded_broker_url), app.config["TASK_QUEUE"]
    for seed in (1, 2):
        _upload(client, seed=seed)
    with app.app_context():   # case 2 was being predicted when the broker died
        db.session.execute(update(Case).where(Case.id == 2).values(status="running"))
        db.session.commit()
    broker.delete(queue)      # what the crash lost
    with app.app_context():
        assert sweep_cases(app).resent == []                       # the plain sweep waits 600 s
        assert sorted(sweep_cases(app, every_pending=True).resent) == [1, 2]
    assert broker.llen(queue) == 2
    assert _case(app, 2).status == "queued"
