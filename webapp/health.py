"""What `/healthz` checks: the database takes a write, the broker takes a connection, and a
worker has beaten its heartbeat recently (`worker.tasks._Heartbeat`)."""
from __future__ import annotations

import logging

from flask import Flask
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from webapp.background import broker_reachable
from webapp.extensions import db
from webapp.models import Heartbeat, utcnow

log = logging.getLogger(__name__)


def database_writable(name: str = "web") -> bool:
    """True when a committed write succeeds (the `heartbeat` row ``name``). A read alone
    would pass on a full disk, a read-only replica or a locked file."""
    try:
        beat(name)
        return True
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.warning("health check: the database refused a write: %s", exc)
        return False


WORKER_PREFIX = "worker:"


def beat(name: str) -> None:
    """Record that the component ``name`` is alive now (a worker's heartbeat)."""
    now = utcnow()
    if db.session.execute(update(Heartbeat).where(Heartbeat.name == name).values(beat_at=now)).rowcount == 0:
        db.session.add(Heartbeat(name=name, beat_at=now))
    # rows of workers that died without a clean stop, long gone
    db.session.execute(delete(Heartbeat).where(Heartbeat.name.startswith(WORKER_PREFIX),
                                               Heartbeat.beat_at < now - timedelta(days=1)))
    db.session.commit()


def forget_heartbeat(name: str) -> None:
    """A worker's clean stop: it is no longer counted as alive."""
    try:
        db.session.execute(delete(Heartbeat).where(Heartbeat.name == name))
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()


def live_workers(app: Flask) -> str:
    """"ok (N live)", or why none is: no heartbeat within three intervals of the newest."""
    max_age = timedelta(seconds=3 * max(1, app.config["WORKER_HEARTBEAT_S"]))
    try:
        rows = db.session.execute(select(func.count(), func.max(Heartbeat.beat_at))
                                  .where(Heartbeat.name.startswith(WORKER_PREFIX),
                                         Heartbeat.beat_at >= utcnow() - max_age)).one()
        if rows[0]:
            return f"ok ({rows[0]} live)"
        last = db.session.scalar(select(func.max(Heartbeat.beat_at)).where(Heartbeat.name.startswith(WORKER_PREFIX)))
    except SQLAlchemyError:
        db.session.rollback()
        return "unknown (database not readable)"
    if last is None:
        return "no live worker"
    return f"no live worker (last heartbeat {int((utcnow() - last).total_seconds())} s ago)"


def health_report(app: Flask, require: tuple[str, ...] = ()) -> tuple[dict[str, str], int]:
    """The JSON body and status of `/healthz`: 503 with the failing parts named when the
    database or broker fails (no addresses or error texts: those go to the log). No live
    worker makes the status "degraded": the web app still takes uploads, which wait in the
    queue, so it stays 200 for a load balancer unless ``require`` names "worker" (a monitor
    asks `/healthz?require=worker`)."""
    checks = {"database": "ok" if database_writable() else "not writable",
              "broker": "ok" if broker_reachable(app) else "not reachable",
              "worker": live_workers(app)}
    failing = [k for k in ("database", "broker") if checks[k] != "ok"]
    worker_ok = checks["worker"].startswith("ok")
    if not worker_ok and "worker" in require:
        failing.append("worker")
    status = "unavailable" if failing else ("ok" if worker_ok else "degraded")
    return {"status": status, **checks}, 503 if failing else 200
