"""The case list query: filters, sort orders and keyset pagination.

Every order is (column, id) with a matching index, and pages continue from a cursor
(the last row's values) instead of an OFFSET, so page 400 costs what page 1 costs.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

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


# ------------------------------------------------------------------ the review column

@dataclass
class ReviewCell:
    """What the list's review column shows one viewer about one case."""

    count: int                 # finished reviews
    consensus: str | None      # majority label (cancer / normal); None for a tie, none, or not shown
    shown: bool                # whether this viewer may see the consensus
    waits_for_own: bool        # a reviewer who sees the consensus once their own review is saved

    @property
    def text(self) -> str:
        from webapp.formatting import verdict_words

        if not self.count:
            return "not reviewed"
        words = f"{self.count} review{'s' if self.count != 1 else ''}"
        if not self.shown:
            return words
        if self.consensus is None:
            return f"{words}, no majority"
        return f"{words}: {verdict_words(self.consensus)}"


def review_cells(viewer: User, case_ids: list[int]) -> dict[int, ReviewCell]:
    """The review column for a page of cases, in one query.

    Independent reads: a reviewer sees the consensus of a case only once their own review
    of it is saved (before that, the others' verdicts would anchor them); admins see every
    consensus, except an admin reading blinded before their own label (as on the case
    page); clinicians see how many reviews there are, as their case page shows no reviews.
    """
    from webapp.models import Review
    from webapp.review_stats import consensus
    from webapp.reviews import blinded_case_ids

    if not case_ids:
        return {}
    rows = db.session.execute(select(Review.case_id, Review.reviewer_id, Review.label).where(
        Review.case_id.in_(case_ids), Review.verdict.is_not(None))).all()
    labels: dict[int, list[str]] = {}
    mine: set[int] = set()
    for case_id, reviewer_id, label in rows:
        labels.setdefault(case_id, []).append(label)
        if reviewer_id == viewer.id:
            mine.add(case_id)
    blind = blinded_case_ids(viewer, case_ids)  # a blinded reader's cases before their blind read (no query otherwise)
    cells = {}
    for case_id in case_ids:
        given = labels.get(case_id, [])
        if viewer.role == "admin":
            shown = case_id not in blind
        elif viewer.role == "reviewer":
            shown = case_id in mine
        else:
            shown = False
        cells[case_id] = ReviewCell(len(given), consensus(given) if shown else None, shown,
                                    waits_for_own=bool(given) and viewer.role != "clinician" and not shown)
    return cells


# ------------------------------------------------------------------ live status of a page

MAX_STATUS_IDS = 100


def parse_ids(text: str | None) -> list[int]:
    """``"3,1,2"`` as [3, 1, 2]; BadQuery for anything else or more than MAX_STATUS_IDS."""
    parts = [p for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise BadQuery("give the case numbers as ids=1,2,3")
    if len(parts) > MAX_STATUS_IDS:
        raise BadQuery(f"at most {MAX_STATUS_IDS} case numbers at a time")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise BadQuery("case numbers must be whole numbers, as ids=1,2,3") from None
    if any(i < 1 for i in ids):
        raise BadQuery("case numbers start at 1")
    return list(dict.fromkeys(ids))


def case_statuses(viewer: User, case_ids: list[int], hidden_output: set[int] | None = None) -> list[dict]:
    """Status, model output (unless hidden from a blinded reader) and review column of the
    cases in ``case_ids`` that ``viewer`` may see, in one query plus the review query.

    Cases the viewer may not see, withdrawn ones and unknown numbers are simply left out,
    so the answer reveals nothing about them.
    """
    from webapp.formatting import verdict_words
    from webapp.reviews import blinded_case_ids

    query = select(Case).where(Case.id.in_(case_ids), Case.withdrawn_at.is_(None))
    if not viewer.sees_all_cases:
        query = query.where(Case.uploader_id == viewer.id)
    cases = list(db.session.scalars(query.order_by(Case.id)))
    ids = [c.id for c in cases]
    hidden = blinded_case_ids(viewer, ids) if hidden_output is None else hidden_output
    reviews = review_cells(viewer, ids)
    out = []
    for case in cases:
        secret = case.id in hidden
        label = None if secret else case.label
        probability = None if secret else case.probability
        out.append({
            "id": case.id,
            "status": case.status,
            "finished": case.is_finished,
            "hidden": secret,
            "label": label,
            "label_text": verdict_words(label) if label else "–",
            "probability": probability,
            "probability_text": f"{probability * 100:.1f} %" if probability is not None else "–",
            "reviews": reviews[case.id].count,
            "review_text": reviews[case.id].text,
            "consensus": reviews[case.id].consensus,
            "consensus_after_own": reviews[case.id].waits_for_own,
            "updated_at": case.updated_at.isoformat() + "Z",
        })
    return out


# ------------------------------------------------------------------ thumbnails

THUMBNAIL_PX = 96


# Thumbnails are decoded by these two threads only, whatever the number of requests: a page
# asking for its thumbnails at once then holds at most two full-size decodes, and the memory
# glibc keeps per thread after a decode stays in two arenas (13 request threads decoding
# near-limit images took the web process to 2.5 GB; with a semaphore but decodes in the
# request threads, 16 at once still reached 1.6 GB).
_THUMBNAILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="thumbnail")


def thumbnail_path(store, case: Case) -> Path | None:
    """A JPEG of at most THUMBNAIL_PX on its longer side, made with Pillow the first time it
    is asked for and kept in the file store (``thumbs/ab/<image sha256>.jpg``: derived from
    the image, so one per stored image). None when the image cannot be read."""
    digest = case.image_sha256
    target = store.path(f"thumbs/{digest[:2]}/{digest}.jpg")
    if target.is_file():
        return target
    if not case.image_key or not store.exists(case.image_key):
        return None
    return _THUMBNAILER.submit(_make_thumbnail, store, store.path(case.image_key), target).result()


def _make_thumbnail(store, source: Path, target: Path) -> Path | None:
    import os
    import tempfile

    from PIL import Image, ImageOps, UnidentifiedImageError

    from webapp.storage import make_private

    if target.is_file():   # made by another request while this one waited
        return target
    try:
        with Image.open(source) as image:
            image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at a fraction of the size
            image.load()
            factor = min(image.size) // (THUMBNAIL_PX * 2)
            if image.mode.startswith("I;16"):
                image = image.convert("I")   # reduce() takes 32-bit integers, not 16-bit
            if factor > 1 and image.mode in ("L", "RGB", "RGBA", "LA", "I", "F"):
                image = image.reduce(factor)  # box reduction first: everything after is small
            if image.mode in ("I", "F"):
                # 16-bit or float greyscale: stretch its own range to 8 bits (a plain
                # conversion would clip everything above 255 to white).
                wide = image.convert("F")
                low, high = wide.getextrema()
                scale = 255.0 / (high - low) if high > low else 0.0
                image = wide.point(lambda v: (v - low) * scale).convert("L")
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            for folder in (store.root, target.parent.parent, target.parent):
                make_private(folder, directory=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".jpg")
            try:
                with os.fdopen(fd, "wb") as fh:
                    image.save(fh, format="JPEG", quality=80)
                os.replace(tmp, target)  # two requests at once: one identical file replaces the other
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    return target
