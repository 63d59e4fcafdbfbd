"""Expert review of model outputs: the review queue, blind reads, agree/disagree, history.

Callable without HTTP: the review routes read the form, call one function here and render.
Each change (review plus its revision, the case's review count and the audit event) is
committed in one transaction; a rejected review raises ReviewRejected and writes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import joinedload

from webapp.extensions import db
from webapp.models import (CONFIDENCES, DETAILED_LABELS, VERDICTS, Case, Prediction, Review,
                           ReviewRevision, User, audit, utcnow)

REVIEWER_ROLES = ("reviewer", "admin")
QUEUE_SORTS = {
    "uncertain": "Most uncertain first (probability closest to the threshold)",
    "oldest": "Oldest first",
    "newest": "Newest first",
}
DEFAULT_QUEUE_SORT = "uncertain"


class ReviewRejected(ValueError):
    """A review that cannot be recorded as given; the message says why, for the reviewer."""


class ReviewForbidden(ReviewRejected):
    """The user's role may not review cases."""


# ------------------------------------------------------------------ reading time

def _serializer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="review-opened")


def reading_token(case_id: int, reviewer_id: int, opened: float | None = None) -> str:
    """A signed record of when ``reviewer_id`` opened ``case_id`` (server clock, seconds)."""
    return _serializer().dumps({"c": case_id, "u": reviewer_id, "t": time.time() if opened is None else opened})


def reading_seconds(token: str | None, case_id: int, reviewer_id: int, now: float | None = None) -> float | None:
    """Seconds from the signed opening time to ``now``; None when longer than the cap.

    Raises ReviewRejected for a missing, forged or foreign token (another case or user).
    """
    try:
        data = _serializer().loads(token or "")
    except BadSignature:
        raise ReviewRejected("the form lacks its opening time or it was altered; reload the case and review again") from None
    if not isinstance(data, dict) or data.get("c") != case_id or data.get("u") != reviewer_id:
        raise ReviewRejected("this form was opened for another case or user; reload the case and review again")
    seconds = (time.time() if now is None else now) - float(data["t"])
    if seconds < 0:
        raise ReviewRejected("the form's opening time lies in the future; reload the case and review again")
    # Longer than the cap: the page was left open, so the figure would not be a reading time.
    return None if seconds > current_app.config["REVIEW_READING_TIME_MAX_S"] else round(seconds, 1)


# ------------------------------------------------------------------ who reviews what

def blinded_for(reviewer: User) -> bool:
    """Whether ``reviewer`` reads blinded: the site setting or their own."""
    return bool(current_app.config["REVIEW_BLINDED"] or reviewer.blinded_review)


def current_review(case_id: int, reviewer_id: int) -> Review | None:
    return db.session.scalar(select(Review).where(Review.case_id == case_id, Review.reviewer_id == reviewer_id))


def blinded_case_ids(user: User, case_ids: list[int]) -> set[int]:
    """Of ``case_ids``, those whose model output ``user`` must not see yet: every case a
    blinded reviewer has not reviewed (one query for a whole page of the case list)."""
    if not case_ids or not user.has_role(*REVIEWER_ROLES) or not blinded_for(user):
        return set()
    reviewed = db.session.scalars(select(Review.case_id).where(
        Review.reviewer_id == user.id, Review.case_id.in_(case_ids))).all()
    return set(case_ids) - set(reviewed)


def needs_blind_read(case: Case, reviewer: User) -> bool:
    """True while a blinded reviewer has not yet given their label without the model output."""
    return blinded_for(reviewer) and current_review(case.id, reviewer.id) is None


@dataclass
class ReviewPanel:
    """What the case page shows a user about reviewing this case."""

    may_review: bool
    hide_model_output: bool = False
    review: Review | None = None
    token: str | None = None
    reviews: list[Review] = field(default_factory=list)  # everyone's, once they may be shown
    others_hidden: bool = False  # independent read: others' reviews wait for this reader's own


def review_panel(case: Case, user: User) -> ReviewPanel:
    """The review state of ``case`` for ``user`` (a clinician gets may_review=False)."""
    if not user.has_role(*REVIEWER_ROLES):
        return ReviewPanel(may_review=False)
    ready = case.status == "done" and case.latest_prediction is not None and case.withdrawn_at is None
    review = current_review(case.id, user.id)
    reviews = db.session.scalars(select(Review).options(joinedload(Review.reviewer)).where(
        Review.case_id == case.id, Review.verdict.is_not(None)).order_by(Review.submitted_at)).all()
    hide = ready and needs_blind_read(case, user)
    # Independent reads: a reviewer sees the others' verdicts only after saving their own,
    # so that nobody is anchored by an earlier reading; admins oversee and see them all.
    own_saved = review is not None and review.verdict is not None
    show_others = not hide and (user.role == "admin" or own_saved)
    return ReviewPanel(may_review=ready, hide_model_output=hide, review=review,
                       token=reading_token(case.id, user.id) if ready else None,
                       reviews=list(reviews) if show_others else [],
                       others_hidden=not show_others and any(r.reviewer_id != user.id for r in reviews))


def _check(reviewer: User, case: Case) -> Prediction:
    if not reviewer.has_role(*REVIEWER_ROLES):
        raise ReviewForbidden("only reviewers and admins may review cases")
    if case.withdrawn_at is not None:
        raise ReviewRejected("this case was withdrawn by its uploader or an admin")
    prediction = case.latest_prediction
    if case.status != "done" or prediction is None:
        raise ReviewRejected("this case has no finished prediction to review yet")
    return prediction


def _label(value: str | None, what: str) -> tuple[str, str]:
    """(cancer/normal label, detailed label as given) or ReviewRejected."""
    value = (value or "").strip().lower()
    if value not in DETAILED_LABELS:
        raise ReviewRejected(f"{what} must be one of {', '.join(DETAILED_LABELS)}")
    return DETAILED_LABELS[value], value


def _confidence(value: str | None) -> str:
    value = (value or "").strip().lower()
    if value not in CONFIDENCES:
        raise ReviewRejected(f"choose a confidence: {', '.join(CONFIDENCES)}")
    return value


def _count_reviews(case: Case) -> None:
    case.review_count = db.session.scalar(select(func.count()).select_from(Review).where(
        Review.case_id == case.id, Review.verdict.is_not(None)))


def record_blind_read(case: Case, reviewer: User, label: str | None, confidence: str | None,
                      token: str | None) -> Review:
    """Store a blinded reviewer's first answer, given without the model's output.

    Afterwards the case page shows the model's output and asks them to confirm (agree or
    disagree); the blind answer stays stored beside the final one.
    """
    prediction = _check(reviewer, case)
    if not blinded_for(reviewer):
        raise ReviewRejected("blinded review is not switched on for you")
    if current_review(case.id, reviewer.id) is not None:
        raise ReviewRejected("you already gave your blind label for this case")
    coarse, _detailed = _label(label, "your label")
    confidence = _confidence(confidence)
    seconds = reading_seconds(token, case.id, reviewer.id)
    now = utcnow()
    review = Review(case_id=case.id, reviewer_id=reviewer.id, prediction_id=prediction.id,
                    model_version_id=prediction.model_version_id, model_label=prediction.label,
                    model_probability=prediction.probability, blinded=True, blinded_label=coarse,
                    blinded_confidence=confidence, blinded_seconds=seconds, revision=1,
                    created_at=now, updated_at=now)
    db.session.add(review)
    db.session.flush()
    db.session.add(ReviewRevision(review_id=review.id, revision=1, stage="blinded", label=coarse,
                                  detailed_label=_detailed, confidence=confidence, reading_seconds=seconds,
                                  model_version_id=prediction.model_version_id, model_label=prediction.label,
                                  created_at=now))
    audit("review.blind_read", actor=reviewer, target=review, case_id=case.id, label=coarse)
    db.session.commit()
    return review


def submit_review(case: Case, reviewer: User, verdict: str | None, label: str | None,
                  confidence: str | None, comment: str | None, token: str | None, *,
                  timed: bool = True) -> Review:
    """Record (or revise) ``reviewer``'s review of the case's latest prediction.

    ``agree`` confirms the model's label (a label, if given, must say the same);
    ``disagree`` needs the reviewer's label, which must differ from the model's.
    Benign / malignant / normal are accepted and counted as normal / cancer / normal.
    Every submission is appended to the review's history; the first one's reading time
    (opening the page to submitting, plus the blind read) is the review's reading time.
    ``timed=False`` (an API client that sent no opening token): the reading time is
    recorded as not measured.
    """
    prediction = _check(reviewer, case)
    verdict = (verdict or "").strip().lower()
    if verdict not in VERDICTS:
        raise ReviewRejected("choose agree or disagree")
    if verdict == "disagree":
        if not label:
            raise ReviewRejected("a disagreement needs your label (cancer or normal)")
        coarse, detailed = _label(label, "your label")
        if coarse == prediction.label:
            said = "suspicious for malignancy" if coarse == "cancer" else "not suspicious"
            raise ReviewRejected(f"{detailed} counts as {said}, which is the model's verdict too: choose agree "
                                 f"and give {detailed} as your class (the class is recorded), or disagree "
                                 "with a label on the other side")
    else:
        coarse, detailed = prediction.label, None
        if label:
            given, detailed = _label(label, "your label")
            if given != prediction.label:
                said = "suspicious for malignancy" if prediction.label == "cancer" else "not suspicious"
                raise ReviewRejected(f"agreeing means the case is {said}; {detailed} is not, so choose disagree")
    confidence = _confidence(confidence)
    comment = (comment or "").strip() or None
    if comment and len(comment) > 2000:
        raise ReviewRejected("the comment is longer than 2000 characters")
    review = current_review(case.id, reviewer.id)
    if review is None and needs_blind_read(case, reviewer):
        raise ReviewRejected("blinded review: give your own label before seeing the model's output")
    seconds = reading_seconds(token, case.id, reviewer.id) if timed else None
    now = utcnow()
    first_final = review is None or review.verdict is None
    if review is None:
        review = Review(case_id=case.id, reviewer_id=reviewer.id, revision=0, created_at=now)
        db.session.add(review)
    review.prediction_id, review.model_version_id = prediction.id, prediction.model_version_id
    review.model_label, review.model_probability = prediction.label, prediction.probability
    review.verdict, review.label, review.detailed_label = verdict, coarse, detailed
    review.confidence, review.comment = confidence, comment
    if first_final:
        parts = [seconds, review.blinded_seconds] if review.blinded else [seconds]
        # Not measured when any part was not: a partial time would look like a fast read.
        review.reading_seconds = None if None in parts else round(sum(parts), 1)
    review.revision += 1
    review.updated_at = review.submitted_at = now
    db.session.flush()
    db.session.add(ReviewRevision(review_id=review.id, revision=review.revision, stage="final", verdict=verdict,
                                  label=coarse, detailed_label=detailed, confidence=confidence, comment=comment,
                                  reading_seconds=seconds, model_version_id=prediction.model_version_id,
                                  model_label=prediction.label, created_at=now))
    _count_reviews(case)
    audit("review.submit" if first_final else "review.revise", actor=reviewer, target=review,
          case_id=case.id, verdict=verdict, label=coarse, revision=review.revision)
    db.session.commit()
    return review


def set_blinded_review(user: User, on: bool, actor: User | None = None) -> None:
    """Switch a reviewer's own blinded mode on or off (audited)."""
    if user.blinded_review == on:
        return
    user.blinded_review = on
    audit("user.blinded_review", actor=actor or user, target=user, on=on)
    db.session.commit()


# ------------------------------------------------------------------ the queue

@dataclass
class QueueItem:
    case: Case
    probability: float
    threshold: float
    label: str
    model_version: str
    blind_read_given: bool


_UNCERTAINTY = func.abs(Prediction.probability - Prediction.threshold)


def _queue_query(reviewer: User):
    """(Case, latest Prediction, own Review id or None) for every case ``reviewer`` may still review."""
    latest = (select(Prediction.case_id, func.max(Prediction.updated_at).label("at"))
              .group_by(Prediction.case_id).subquery())
    mine = (select(Review.case_id).where(Review.reviewer_id == reviewer.id, Review.verdict.is_not(None)))
    return (select(Case, Prediction, Review.id)
            .join(latest, latest.c.case_id == Case.id)
            .join(Prediction, and_(Prediction.case_id == Case.id, Prediction.updated_at == latest.c.at))
            .outerjoin(Review, and_(Review.case_id == Case.id, Review.reviewer_id == reviewer.id))
            .options(joinedload(Prediction.model_version))
            .where(Case.status == "done", Case.withdrawn_at.is_(None), Case.id.not_in(mine)))


def _ordered(query, sort: str):
    if sort == "uncertain":
        return query.order_by(_UNCERTAINTY, Case.id)
    if sort == "oldest":
        return query.order_by(Case.created_at, Case.id)
    return query.order_by(Case.created_at.desc(), Case.id.desc())


def _check_sort(sort: str) -> None:
    if sort not in QUEUE_SORTS:
        raise ReviewRejected(f"unknown order {sort!r}; choose one of {', '.join(QUEUE_SORTS)}")


def queue_sort(value: str | None) -> str:
    """The queue order named by ``value`` (a link's or form's), the default when empty;
    ReviewRejected for an unknown one."""
    sort = (value or "").strip() or DEFAULT_QUEUE_SORT
    _check_sort(sort)
    return sort


def review_queue(reviewer: User, sort: str = "uncertain", page: int = 1, per_page: int = 25) -> tuple[list[QueueItem], bool]:
    """Cases with a finished prediction that ``reviewer`` has not reviewed, and whether more follow.

    ``uncertain`` orders by |probability - threshold| of the case's latest prediction,
    smallest first; ``oldest`` / ``newest`` by upload time. Raises ReviewRejected for
    an unknown sort or page.
    """
    _check_sort(sort)
    if page < 1:
        raise ReviewRejected("pages start at 1")
    query = _ordered(_queue_query(reviewer), sort)
    rows = db.session.execute(query.offset((page - 1) * per_page).limit(per_page + 1)).unique().all()
    items = [QueueItem(case, p.probability, p.threshold, p.label, p.model_version.name, review_id is not None)
             for case, p, review_id in rows[:per_page]]
    return items, len(rows) > per_page


def _after(sort: str, case_id: int):
    """The condition "comes after case ``case_id`` in the queue's ``sort`` order", or None
    when that case has no prediction to place it by."""
    if sort == "uncertain":
        key = db.session.scalar(select(_UNCERTAINTY).where(Prediction.case_id == case_id)
                                .order_by(Prediction.updated_at.desc()).limit(1))
        if key is None:
            return None
        return or_(_UNCERTAINTY > key, and_(_UNCERTAINTY == key, Case.id > case_id))
    created = db.session.scalar(select(Case.created_at).where(Case.id == case_id))
    if created is None:
        return None
    if sort == "oldest":
        return or_(Case.created_at > created, and_(Case.created_at == created, Case.id > case_id))
    return or_(Case.created_at < created, and_(Case.created_at == created, Case.id < case_id))


def next_in_queue(reviewer: User, sort: str, after_case_id: int) -> int | None:
    """The case ``reviewer`` should read after ``after_case_id`` in the queue's ``sort`` order.

    The first unreviewed case that follows it in that order; when none follows, the
    queue starts again from the top (cases skipped earlier, or new ones), never with
    ``after_case_id`` itself. None when nothing else is waiting: the queue is done.
    """
    _check_sort(sort)
    query = _queue_query(reviewer).where(Case.id != after_case_id)
    after = _after(sort, after_case_id)
    for candidate in ([query.where(after)] if after is not None else []) + [query]:
        row = db.session.execute(_ordered(candidate, sort).limit(1)).first()
        if row is not None:
            return row[0].id
    return None


def queue_progress(reviewer: User) -> tuple[int, int]:
    """(cases left for ``reviewer`` to review, cases open for review): "12 of 40 left".

    Open: done and not withdrawn (a done case always has its prediction: the worker writes
    both in one transaction). Two counts on indexes, so the case page can show it cheaply.
    """
    is_open = (Case.status == "done", Case.withdrawn_at.is_(None))
    total = db.session.scalar(select(func.count(Case.id)).where(*is_open))
    reviewed = db.session.scalar(select(func.count(Review.id)).join(Case, Case.id == Review.case_id).where(
        Review.reviewer_id == reviewer.id, Review.verdict.is_not(None), *is_open))
    return total - reviewed, total
