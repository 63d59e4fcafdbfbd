"""Celery bound to the Flask app, and the one way the web app enqueues work.

`celery_init_app` follows Flask's "Background Tasks with Celery" pattern: every task runs
inside the app context, and the worker starts from the same `create_app` and config as
the web server. The web process sends tasks by name, so it never imports the worker's
task module (which imports torch).
"""
from __future__ import annotations

import logging

from celery import Celery, Task
from flask import Flask

from webapp.broker import BrokerUnavailable, discover_embedded_url
from webapp.config import EMBEDDED_BROKER

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
    broker cannot be reached; the caller records that on the case.
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
        log.warning("could not enqueue case %s: %s", case_id, exc)
        raise BrokerUnavailable(f"the job queue could not be reached ({type(exc).__name__}: {exc})") from exc
