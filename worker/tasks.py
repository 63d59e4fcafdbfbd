"""Celery tasks. Each is a few lines: the work lives in `worker.prediction`."""
from __future__ import annotations

import logging
import os
import threading

from celery import shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from flask import current_app
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
    _configure_torch(current_app)
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
    """In each new pool process: fresh database connections, then the model loads in the
    background.

    Celery kills a pool process that has not reported itself ready within
    `worker_proc_alive_timeout` seconds, and it reports only after this handler returns.
    Importing torch and reading the checkpoint can take longer than that on a busy machine,
    so this handler does only what is instant and leaves the rest to a thread: the first
    task waits for the model (the model cache's lock) instead of the process being killed.
    """
    from celery import current_app as celery_app

    flask_app = getattr(celery_app, "flask_app", None)
    if flask_app is None:
        return
    with flask_app.app_context():
        from webapp.extensions import db

        db.engine.dispose(close=False)  # connections inherited from the parent are not ours
    threading.Thread(target=_warm_up, args=(flask_app,), name="model-warm-up", daemon=True).start()


_torch_configured = threading.local()


def _configure_torch(flask_app) -> None:
    """Apply WORKER_TORCH_THREADS in the calling thread, once, before it runs torch code
    (OpenMP keeps the setting per thread, so the warm-up thread and the task's thread each
    set it)."""
    if getattr(_torch_configured, "done", False):
        return
    threads = flask_app.config["WORKER_TORCH_THREADS"]
    if threads:
        import torch

        torch.set_num_threads(threads)
    _torch_configured.done = True


def _warm_up(flask_app) -> None:
    """Load the active model so that the first case is as fast as the others (best effort)."""
    with flask_app.app_context():
        from webapp.extensions import db

        try:
            _configure_torch(flask_app)
            version = prediction.active_version()
            if version is not None:
                prediction.model_cache.get(version)
                log.info("model %s loaded", version.name)
        except Exception as exc:  # noqa: BLE001 - a task will meet the same error and report it on its case
            log.warning("could not preload the model: %s", exc)
        finally:
            db.session.remove()


class _Sweeper:
    """The periodic sweep of the worker's main process: outbox cases and lost jobs are sent
    (see `webapp.background.sweep_cases`). Every worker runs one; their claims on the
    database keep them from sending a case twice."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, flask_app) -> None:
        interval = flask_app.config["SWEEP_INTERVAL"]
        if interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(flask_app, interval), name="case-sweep",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self, flask_app, interval: int) -> None:
        from webapp.background import sweep_cases
        from webapp.extensions import db

        while not self._stop.is_set():
            with flask_app.app_context():
                try:
                    sweep_cases(flask_app)
                except Exception:  # noqa: BLE001 - the database may be away; try again next time
                    log.exception("sweep failed; trying again in %s s", interval)
                finally:
                    db.session.remove()
            self._stop.wait(interval)


sweeper = _Sweeper()


class _Heartbeat:
    """The worker's main process writes ``heartbeat`` row ``worker:<host>:<pid>`` every
    WORKER_HEARTBEAT_S seconds, so that `/healthz` can tell a live worker from a dead one
    (a SIGKILLed worker stops beating; its pool processes may linger, but nothing takes
    jobs). The row is deleted on a clean stop."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.name = ""

    def start(self, flask_app, hostname: str) -> None:
        interval = flask_app.config["WORKER_HEARTBEAT_S"]
        if interval <= 0 or self._thread is not None:
            return
        self.name = f"worker:{hostname}:{os.getpid()}"[:64]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(flask_app, interval), name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, flask_app=None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            if flask_app is not None:
                from webapp.health import forget_heartbeat

                with flask_app.app_context():
                    forget_heartbeat(self.name)

    def _loop(self, flask_app, interval: int) -> None:
        from webapp.extensions import db
        from webapp.health import beat

        while not self._stop.is_set():
            with flask_app.app_context():
                try:
                    beat(self.name)
                except Exception:  # noqa: BLE001 - the database may be away; /healthz says so itself
                    log.warning("heartbeat not written; trying again in %s s", interval)
                finally:
                    db.session.remove()
            self._stop.wait(interval)


heartbeat = _Heartbeat()


def _flask_app_of(sender):
    return getattr(getattr(sender, "app", None), "flask_app", None)


@worker_ready.connect
def _start_sweeper(sender=None, **_kwargs) -> None:
    flask_app = _flask_app_of(sender)
    if flask_app is not None:
        sweeper.start(flask_app)
        heartbeat.start(flask_app, getattr(sender, "hostname", None) or "worker")


@worker_shutdown.connect
def _stop_sweeper(sender=None, **_kwargs) -> None:
    sweeper.stop()
    heartbeat.stop(_flask_app_of(sender))
