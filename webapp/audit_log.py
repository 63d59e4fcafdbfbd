"""Reading the audit log: filters (actor, action, case, date range), keyset pages, CSV rows,
and the one event the log writes for reading rather than changing: a case viewed.

Callable without HTTP; `webapp/admin/routes.py` reads the query string, calls these and
renders. Bad filter values raise AuditQueryError with a message for the admin (a 400).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Iterator, Mapping

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import joinedload

from webapp.extensions import db
from webapp.models import AuditEvent, Case, User, audit, utcnow

#: A user's views of one case make one "case.viewed" event per this many minutes, so that
#: paging back and forth through a case does not bury the log (the first view is kept).
CASE_VIEW_AUDIT_MINUTES = 10

PER_PAGE = 200
SYSTEM = "system"  # the actor filter value for events with no account (workers, command line)
_ACTION = re.compile(r"^[a-z0-9_.]{1,64}$")


class AuditQueryError(ValueError):
    """A filter or page value the audit log does not understand; the message says why."""


@dataclass(frozen=True)
class AuditFilters:
    actor: str | None = None       # an email (case-insensitive, exact), or "system"
    action: str | None = None      # "review.submit", or a family ending in "." ("review.")
    case_id: int | None = None     # events about this case
    start: date | None = None      # inclusive, UTC
    end: date | None = None        # inclusive, UTC

    def as_args(self) -> dict[str, str]:
        """The filters as query-string values (empty ones left out), for links."""
        values = {"actor": self.actor, "action": self.action, "case": self.case_id,
                  "from": self.start.isoformat() if self.start else None,
                  "to": self.end.isoformat() if self.end else None}
        return {k: str(v) for k, v in values.items() if v not in (None, "")}


def _date(value: str, what: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise AuditQueryError(f"the {what} date {value!r} is not a date: use YYYY-MM-DD, e.g. 2026-11-26") from None


def parse_filters(args: Mapping[str, str]) -> AuditFilters:
    """The filters from a query string (``actor``, ``action``, ``case``, ``from``, ``to``)."""
    actor = (args.get("actor") or "").strip().lower() or None
    if actor and len(actor) > 254:
        raise AuditQueryError("the actor is longer than an email address can be")
    action = (args.get("action") or "").strip().lower() or None
    if action and not _ACTION.fullmatch(action):
        raise AuditQueryError(f"unknown action {action!r}: choose one from the list")
    case_text = (args.get("case") or "").strip().lstrip("#")
    case_id = None
    if case_text:
        if not case_text.isdigit() or int(case_text) < 1:
            raise AuditQueryError(f"the case number {case_text!r} must be a whole number such as 12")
        case_id = int(case_text)
    start = _date(args["from"].strip(), "from") if (args.get("from") or "").strip() else None
    end = _date(args["to"].strip(), "to") if (args.get("to") or "").strip() else None
    if start and end and start > end:
        raise AuditQueryError(f"the date range runs backwards: from {start} is after to {end}")
    return AuditFilters(actor, action, case_id, start, end)


def _query(filters: AuditFilters):
    query = select(AuditEvent).options(joinedload(AuditEvent.actor))
    if filters.actor == SYSTEM:
        query = query.where(AuditEvent.actor_id.is_(None))
    elif filters.actor:
        query = query.where(AuditEvent.actor_id.in_(select(User.id).where(func.lower(User.email) == filters.actor)))
    if filters.action:
        if filters.action.endswith("."):
            query = query.where(AuditEvent.action.startswith(filters.action, autoescape=True))
        else:
            query = query.where(AuditEvent.action == filters.action)
    if filters.case_id:
        query = query.where(AuditEvent.target_type == "case", AuditEvent.target_id == filters.case_id)
    if filters.start:
        query = query.where(AuditEvent.created_at >= datetime.combine(filters.start, time.min))
    if filters.end:
        query = query.where(AuditEvent.created_at < datetime.combine(filters.end + timedelta(days=1), time.min))
    return query


def _cursor(event: AuditEvent) -> str:
    return f"{event.created_at.isoformat()}~{event.id}"


def _decode(cursor: str) -> tuple[datetime, int]:
    try:
        when, event_id = cursor.rsplit("~", 1)
        return datetime.fromisoformat(when), int(event_id)
    except ValueError:
        raise AuditQueryError("the page link is damaged; start again from the newest events") from None


@dataclass
class AuditPage:
    events: list[AuditEvent]
    next_cursor: str | None  # older events follow


def audit_page(filters: AuditFilters, before: str | None = None, per_page: int = PER_PAGE) -> AuditPage:
    """Newest first, ``per_page`` events older than the ``before`` cursor (keyset: page 50
    costs what page 1 costs)."""
    query = _query(filters)
    if before:
        query = query.where(tuple_(AuditEvent.created_at, AuditEvent.id) < tuple_(*_decode(before)))
    rows = list(db.session.scalars(query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
                                   .limit(per_page + 1)).unique())
    more = len(rows) > per_page
    rows = rows[:per_page]
    return AuditPage(rows, _cursor(rows[-1]) if more and rows else None)


def known_actions() -> list[str]:
    """Every action the log holds, for the filter's list (the action column is indexed)."""
    return list(db.session.scalars(select(AuditEvent.action).distinct().order_by(AuditEvent.action)))


def actor_name(event: AuditEvent) -> str:
    if event.actor is not None:
        return event.actor.email
    details = event.details or {}
    if details.get("os_user"):
        return f"{details['os_user']} (command line)"
    return SYSTEM


# ------------------------------------------------------------------ CSV

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS = ("id", "when_utc", "actor", "action", "target_type", "target_id", "details")


_PLAIN_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")


def csv_cell(value: Any) -> str:
    """A value as a CSV cell that a spreadsheet will not run: text starting with = + - @
    (or a tab / carriage return) gets a leading apostrophe (OWASP "CSV injection"). A plain
    number such as -0.25 (a kappa can be negative) is left as it is: it is no formula."""
    text = "" if value is None else str(value)
    if _PLAIN_NUMBER.fullmatch(text):
        return text
    return "'" + text if text.startswith(_FORMULA_START) else text


def audit_csv_rows(filters: AuditFilters) -> Iterator[list[Any]]:
    """The header, then every matching event, newest first, as rows of values (read in
    batches; the CSV writer guards each cell with ``csv_cell``)."""
    yield list(CSV_COLUMNS)
    query = _query(filters).order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
    for event in db.session.scalars(query.execution_options(yield_per=500)):  # many-to-one join: no duplicates
        yield [event.id, event.created_at.strftime("%Y-%m-%d %H:%M:%S"), actor_name(event), event.action,
               event.target_type, event.target_id, json.dumps(event.details or {}, sort_keys=True, default=str)]


# ------------------------------------------------------------------ case views

def record_case_view(case: Case, user: User, now: datetime | None = None) -> bool:
    """Audit that ``user`` opened ``case``: at most one event per user and case within
    CASE_VIEW_AUDIT_MINUTES (the first view of each window is kept). True if recorded."""
    now = now or utcnow()
    recent = db.session.scalar(select(AuditEvent.id).where(
        AuditEvent.target_type == "case", AuditEvent.target_id == case.id, AuditEvent.actor_id == user.id,
        AuditEvent.action == "case.viewed",
        AuditEvent.created_at >= now - timedelta(minutes=CASE_VIEW_AUDIT_MINUTES)).limit(1))
    if recent is not None:
        return False
    audit("case.viewed", actor=user, target=case)
    db.session.commit()
    return True

