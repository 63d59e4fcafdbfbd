"""The worker's Celery app: built by the web app's factory, plus the task module."""
from __future__ import annotations

from typing import Any, Mapping

from celery import Celery


def create_worker_app(config: Mapping[str, Any] | None = None) -> Celery:
    """Create the Flask app from ``config`` and return its Celery app with our tasks registered."""
    from webapp import create_app

    flask_app = create_app(config)
    celery_app: Celery = flask_app.extensions["celery"]
    import worker.tasks  # noqa: F401  (registers the tasks on every Celery app)

    return celery_app
