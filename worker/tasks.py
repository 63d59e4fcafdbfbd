"""Celery tasks. Each is a few lines: the work lives in `worker.prediction`."""
from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from worker import prediction

log = logging.getLogger(__name__)

# Errors that usually pass by themselves: the database busy or briefly unreachable,
# a network file system hiccup. Anything else is a bug and fails the case at once.
TRANSIENT_ERRORS = (OperationalError, ConnectionError, TimeoutError, OSError)
MAX_RETRIES = 5


@shared_task(name="worker.tasks.predict_case", bind=True, acks_late=True, reject_on_worker_lost=True,
             autoretry_for=TRANSIENT_ERRORS, max_retries=MAX_RETRIES, retry_backoff=2,
             retry_backoff_max=60, retry_jitter=True)
def predict_case(self, case_id: int) -> str:
    """Predict and explain one case; the outcome is written to the Case row."""
    try:
        return prediction.predict_case(case_id)
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= MAX_RETRIES:
            prediction.mark_failed(case_id, f"The prediction failed after {MAX_RETRIES} retries: {exc}. Re-run the case.")
            return "failed"
        prediction.mark_retrying(case_id, f"Waiting to retry (attempt {self.request.retries + 2} of "
                                          f"{MAX_RETRIES + 1}) after a passing error: {exc}")
        raise  # autoretry_for schedules the retry with backoff
    except Exception as exc:
        log.exception("case %s failed", case_id)
        prediction.mark_failed(case_id, f"Internal error while predicting ({type(exc).__name__}: {exc}). "
                                        "Re-run the case; if it fails again, tell an admin.")
        return "failed"


@worker_process_init.connect
def _prepare_worker_process(**_kwargs) -> None:
    """In each new pool process: fresh database connections, torch threads, warm model."""
    from celery import current_app as celery_app

    flask_app = getattr(celery_app, "flask_app", None)
    if flask_app is None:
        return
    with flask_app.app_context():
        from webapp.extensions import db

        db.engine.dispose(close=False)  # connections inherited from the parent are not ours
        threads = flask_app.config["WORKER_TORCH_THREADS"]
        if threads:
            import torch

            torch.set_num_threads(threads)
        version = prediction.active_version()
        if version is not None:
            try:  # loading now makes the first case as fast as the others
                prediction.model_cache.get(version)
            except Exception as exc:  # the task will report it on the case
                log.warning("could not preload model %s: %s", version.name, exc)
        db.session.remove()
