"""The case list query: filters, sort orders and keyset pagination.

Every order is (column, id) with a matching index, and pages continue from a cursor
(the last row's values) instead of an OFFSET, so page 400 costs what page 1 costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.orm import joinedload

from webapp.extensions import db
from webapp.models import CASE_STATUSES, LABELS, Case, User

SORTS = {
    # name: (column, descending, label shown in the form)
    "newest": (Case.created_at, True, "Newest first"),
    "oldest": (Case.created_at, False, "Oldest first"),
    "probability_desc": (Case.probability, True, "Highest probability first"),
    "probability_asc": (Case.probability, False, "Lowest probability first"),
}


class BadQuery(ValueError):
    """A filter, sort or cursor value the list does not understand."""


@dataclass
class CasePage:
    cases: list[Case]
    next_cursor: str | None
    prev_cursor: str | None


def _encode(case: Case, sort: str) -> str:
    column = SORTS[sort][0]
    value = case.created_at.isoformat() if column is Case.created_at else repr(case.probability)
    return f"{value}~{case.id}"


def _decode(cursor: str, sort: str) -> tuple:
    try:
        value, case_id = cursor.rsplit("~", 1)
        if SORTS[sort][0] is Case.created_at:
            return datetime.fromisoformat(value), int(case_id)
        return float(value), int(case_id)
    except ValueError:
        raise BadQuery("the page link is damaged; start again from the first page") from None


def list_cases(viewer: User, *, status: str | None = None, label: str | None = None,
               reviewed: str | None = None, sort: str = "newest", after: str | None = None,
               before: str | None = None, per_page: int = 25) -> CasePage:
    """One page of the cases ``viewer`` may see, filtered and sorted.

    ``after``/``before`` are cursors from a previous page. Sorting by probability lists
    only cases that have a result.
    """
    if sort not in SORTS:
        raise BadQuery(f"unknown sort {sort!r}")
    if status and status not in CASE_STATUSES:
        raise BadQuery(f"unknown status {status!r}")
    if label and label not in LABELS:
        raise BadQuery(f"unknown label {label!r}")
    if reviewed and reviewed not in ("yes", "no"):
        raise BadQuery(f"reviewed must be 'yes' or 'no', not {reviewed!r}")
    column, descending, _ = SORTS[sort]

    query = select(Case).options(joinedload(Case.uploader))
    query = query.where(Case.withdrawn_at.is_(None))
    if not viewer.sees_all_cases:
        query = query.where(Case.uploader_id == viewer.id)
    if status:
        query = query.where(Case.status == status)
    if label:
        query = query.where(Case.label == label)
    if reviewed == "yes":
        query = query.where(Case.review_count > 0)
    elif reviewed == "no":
        query = query.where(Case.review_count == 0)
    if column is Case.probability:
        query = query.where(Case.probability.is_not(None))

    key = tuple_(column, Case.id)
    backwards = before is not None
    # Walking backwards reverses the order; the rows are flipped back below.
    forward_desc = descending != backwards
    if after is not None or before is not None:
        bound = tuple_(*_decode(before if backwards else after, sort))
        query = query.where(key < bound if forward_desc else key > bound)
    order = (column.desc(), Case.id.desc()) if forward_desc else (column.asc(), Case.id.asc())
    rows = list(db.session.scalars(query.order_by(*order).limit(per_page + 1)).unique())
    more = len(rows) > per_page
    rows = rows[:per_page]
    if backwards:
        rows.reverse()
        has_prev, has_next = more, True
    else:
        has_prev, has_next = after is not None, more
    return CasePage(
        cases=rows,
        next_cursor=_encode(rows[-1], sort) if has_next and rows else None,
        prev_cursor=_encode(rows[0], sort) if has_prev and rows else None,
    )
