"""What `/healthz` checks: the database takes a write, the broker takes a connection."""
from __future__ import annotations

import logging

from flask import Flask
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from webapp.background import broker_reachable
from webapp.extensions import db
from webapp.models import Heartbeat, utcnow

log = logging.getLogger(__name__)


def database_writable(name: str = "web") -> bool:
    """True when a committed write succeeds (the `heartbeat` row ``name``). A read alone
    would pass on a full disk, a read-only replica or a locked file."""
    try:
        now = utcnow()
        if db.session.execute(update(Heartbeat).where(Heartbeat.name == name).values(beat_at=now)).rowcount == 0:
            db.session.add(Heartbeat(name=name, beat_at=now))
        db.session.commit()
        return True
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.warning("health check: the database refused a write: %s", exc)
        return False


def health_report(app: Flask) -> tuple[dict[str, str], int]:
    """The JSON body and status of `/healthz`: 200 when everything answers, else 503 with
    the failing parts named (no addresses or error texts: those go to the log)."""
    checks = {"database": "ok" if database_writable() else "not writable",
              "broker": "ok" if broker_reachable(app) else "not reachable"}
    healthy = all(value == "ok" for value in checks.values())
    return {"status": "ok" if healthy else "unavailable", **checks}, 200 if healthy else 503
