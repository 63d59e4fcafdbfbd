"""Celery bound to the Flask app, and the one way the web app enqueues work.

`celery_init_app` follows Flask's "Background Tasks with Celery" pattern: every task runs
inside the app context, and the worker starts from the same `create_app` and config as
the web server. The web process sends tasks by name, so it never imports the worker's
task module (which imports torch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery, Task
from flask import Flask
from sqlalchemy import and_, or_, select, update

from webapp.broker import BrokerUnavailable, discover_embedded_url
from webapp.config import EMBEDDED_BROKER
from webapp.extensions import db
from webapp.models import Case, audit, utcnow

log = logging.getLogger(__name__)

PREDICT_CASE = "worker.tasks.predict_case"


def broker_url_for(app_config: dict) -> str | None:
    """The broker URL to use, or None when the embedded broker is not running."""
    url = app_config["CELERY_BROKER_URL"]
    if url == EMBEDDED_BROKER:
        return discover_embedded_url(app_config["INSTANCE_PATH"])
    return url


def celery_settings(app_config: dict, broker_url: str | None) -> dict:
    """Celery settings derived from the app config (documented in docs/operations.md)."""
    return {
        "broker_url": broker_url or "memory://unavailable",
        # Celery would let a CELERY_BROKER_URL environment variable win over broker_url
        # (so an exported "embedded", or a URL that `manage.py run` overrides, would be
        # used as is); these two settings make it use the URL chosen here.
        "broker_read_url": broker_url or "memory://unavailable",
        "broker_write_url": broker_url or "memory://unavailable",
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": app_config["BROKER_VISIBILITY_TIMEOUT"],
            # Sweep for lost jobs every 10 s instead of kombu's default ~100 s, so a job
            # whose worker died comes back about visibility_timeout after delivery.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
        },
        "task_default_queue": app_config["TASK_QUEUE"],
        # The job's state lives in the Case row; nobody reads Celery results.
        "task_ignore_result": True,
        "result_backend": None,
        # Acknowledge after the task finishes, and give the job back when the worker
        # process dies mid-task: an accepted upload is never dropped.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One job at a time per process: a long job never holds a second one hostage.
        "worker_prefetch_multiplier": 1,
        "worker_proc_alive_timeout": app_config["WORKER_PROC_ALIVE_TIMEOUT"],
        # Celery counts KiB; None leaves pool processes alone.
        "worker_max_memory_per_child": (app_config.get("WORKER_MAX_MEMORY_MB", 0) * 1024) or None,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app for ``app``; tasks run inside ``app``'s application context."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    broker_url = broker_url_for(app.config)
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(celery_settings(app.config, broker_url))
    celery_app.set_default()
    celery_app.flask_app = app  # worker signal handlers need the app
    app.extensions["celery"] = celery_app
    app.extensions["celery_broker_available"] = broker_url is not None
    return celery_app


def enqueue_prediction(app: Flask, case_id: int) -> None:
    """Send the prediction job for ``case_id`` to the broker.

    Raises BrokerUnavailable with an operator-readable message when no broker runs or the
    broker cannot be reached; callers keep that for the logs (see `send_case`).
    """
    if not app.extensions.get("celery_broker_available"):
        raise BrokerUnavailable(
            "no job queue is running: start the app with 'python manage.py run', or set "
            "CELERY_BROKER_URL to a Redis server that workers listen on")
    celery_app: Celery = app.extensions["celery"]
    try:
        celery_app.send_task(
            PREDICT_CASE, args=[case_id], retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                          "interval_max": 1},
        )
    except Exception as exc:  # kombu raises transport-specific connection errors
        raise BrokerUnavailable(f"the job queue could not be reached ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------ the outbox and the sweep
#
# A case is committed as "queued" before its job is sent. `dispatched_at` says when the
# broker last took the job; None means the broker refused it and the case waits in the
# outbox. The sweep (`sweep_cases`, run by every worker and by `manage.py sweep`) sends
# outbox cases, and sends again any case that has been queued or running with no sign of
# life for BROKER_VISIBILITY_TIMEOUT seconds (its job was lost). `predict_case` is
# idempotent, so a job sent twice gives one result.

#: What a clinician sees on a case whose job the broker has not taken yet (details in logs).
WAITING_FOR_QUEUE = ("the prediction service is not reachable just now; this case is sent to it "
                     "automatically as soon as it is back")

PENDING = ("queued", "running")


def _stuck_condition(cutoff: datetime):
    """Cases that need sending: refused by the broker, or silent since ``cutoff``."""
    return and_(Case.status.in_(PENDING),
                or_(and_(Case.status == "queued", Case.dispatched_at.is_(None)), Case.updated_at < cutoff))


def stuck_since(app: Flask, now: datetime | None = None) -> datetime:
    """Cases queued or running with no change since this time count as lost."""
    return (now or utcnow()) - timedelta(seconds=app.config["BROKER_VISIBILITY_TIMEOUT"])


def is_stuck(app: Flask, case: Case, now: datetime | None = None) -> bool:
    """True when ``case`` waits in the outbox or its job shows no sign of life for the
    visibility timeout (so sending it again is due)."""
    if case.status not in PENDING:
        return False
    return (case.status == "queued" and case.dispatched_at is None) or case.updated_at < stuck_since(app, now)


def send_case(app: Flask, case_id: int) -> bool:
    """Send the job of a queued case whose `dispatched_at` is already set; True if the
    broker took it. If not, the case goes back to the outbox with a neutral message for
    its readers (the broker's error goes to the log only) and the sweep sends it later."""
    try:
        enqueue_prediction(app, case_id)
    except BrokerUnavailable as exc:
        log.warning("case %s waits in the outbox: %s", case_id, exc)
        db.session.execute(update(Case).where(Case.id == case_id, Case.status == "queued")
                           .values(dispatched_at=None, error=WAITING_FOR_QUEUE))
        db.session.commit()
        return False
    db.session.execute(update(Case).where(Case.id == case_id, Case.error == WAITING_FOR_QUEUE).values(error=None))
    db.session.commit()
    return True


@dataclass
class SweepResult:
    sent: list[int] = field(default_factory=list)  # outbox cases the broker took
    resent: list[int] = field(default_factory=list)  # lost jobs sent again
    waiting: int = 0  # cases still due (the broker refused, or the pass stopped)


def sweep_cases(app: Flask, now: datetime | None = None, limit: int = 500, *,
                every_pending: bool = False) -> SweepResult:
    """One pass: send every outbox case, and again every case whose job was lost.

    Each case is claimed by a conditional update before it is sent, so that several
    sweepers (one per worker) never send the same case twice in one round. The pass
    stops at the first refusal: the broker is down, the next pass tries again.

    ``every_pending``: every queued or running case counts as lost now, without waiting for
    the visibility timeout: after the broker itself died (`manage.py run` restarts it), a job
    it held unacknowledged or had not yet written to disk would otherwise wait that long
    (600 s by default). A job sent twice still gives one result.
    """
    now = now or utcnow()
    due = Case.status.in_(PENDING) if every_pending else _stuck_condition(stuck_since(app, now))
    result = SweepResult()
    rows = db.session.execute(select(Case.id, Case.dispatched_at, Case.status).where(due)
                              .order_by(Case.id).limit(limit)).all()
    for index, (case_id, dispatched_at, status) in enumerate(rows):
        lost = dispatched_at is not None or status == "running"
        claimed = db.session.execute(update(Case).where(Case.id == case_id, due)
                                     .values(status="queued", dispatched_at=now, updated_at=now))
        if claimed.rowcount != 1:  # finished meanwhile, or another sweeper has it
            db.session.rollback()
            continue
        if lost:
            case = db.session.get(Case, case_id)
            case.error = None
            audit("case.resend", target=case, reason="no progress within the visibility timeout",
                  was=status)
        db.session.commit()
        if not send_case(app, case_id):
            result.waiting = len(rows) - index
            break
        (result.resent if lost else result.sent).append(case_id)
    if result.sent or result.resent or result.waiting:
        log.info("sweep: %d sent from the outbox, %d lost jobs sent again, %d still waiting",
                 len(result.sent), len(result.resent), result.waiting)
    return result


def broker_reachable(app: Flask) -> bool:
    """True when a connection to the broker can be opened now (within a few seconds)."""
    if not app.extensions.get("celery_broker_available"):
        return False
    celery_app: Celery = app.extensions["celery"]
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=5)
            connection.default_channel  # noqa: B018 - the Redis transport pings here
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        log.warning("broker not reachable: %s", exc)
        return False
