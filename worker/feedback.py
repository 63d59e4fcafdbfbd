"""Gather reviewed cases from the database and hand them to `ml.export` as an ImageFolder.

Runs inside the Flask app context (`manage.py export-feedback`, `manage.py retrain`).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from flask import current_app
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from ml.export import ExportSummary, FeedbackImage, write_feedback_folder
from webapp.extensions import db
from webapp.models import Case, Review
from webapp.review_stats import CONSENSUS_RULES, consensus

TIE = "no majority (tie)"
NOT_UNANIMOUS = "not unanimous"
TOO_FEW = "fewer reviews than --min-reviews"
NO_IMAGE = "image missing from the store"


@dataclass
class FeedbackExport:
    """What an export selected and wrote, and why the other reviewed cases were left out."""

    items: list[FeedbackImage]
    left_out: Counter = field(default_factory=Counter)
    written: ExportSummary | None = None

    @property
    def n_confirmed(self) -> int:
        return sum(i.source == "model-confirmed" for i in self.items)

    @property
    def n_corrected(self) -> int:
        return sum(i.source == "reviewer-corrected" for i in self.items)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def select_feedback(since: datetime | None = None, min_reviews: int = 1, rule: str = "majority") -> FeedbackExport:
    """Every case with finished reviews, its consensus label and provenance.

    Each review is a vote for its label (an agreement votes for the model's label).
    With ``since``, only cases with a review submitted at or after it are considered,
    and all their current reviews count. Cases with fewer than ``min_reviews`` reviews,
    ties (majority) or split votes (unanimous) are left out and counted by reason.
    """
    if rule not in CONSENSUS_RULES:
        raise ValueError(f"unknown consensus rule {rule!r}; choose {' or '.join(CONSENSUS_RULES)}")
    if min_reviews < 1:
        raise ValueError("--min-reviews must be at least 1")
    query = (select(Review).options(joinedload(Review.model_version))
             .join(Case, Case.id == Review.case_id)
             .where(Review.verdict.is_not(None), Case.withdrawn_at.is_(None))  # withdrawn cases stay out
             .order_by(Review.case_id, Review.submitted_at, Review.id))
    by_case: dict[int, list[Review]] = defaultdict(list)
    for review in db.session.scalars(query):
        by_case[review.case_id].append(review)
    store = current_app.extensions["file_store"]
    export = FeedbackExport(items=[])
    for case_id, reviews in sorted(by_case.items()):
        if since is not None and max(r.submitted_at for r in reviews) < since:
            continue
        if len(reviews) < min_reviews:
            export.left_out[TOO_FEW] += 1
            continue
        label = consensus((r.label for r in reviews), rule)
        if label is None:
            export.left_out[TIE if rule == "majority" else NOT_UNANIMOUS] += 1
            continue
        case = db.session.get(Case, case_id)
        if not store.exists(case.image_key):
            export.left_out[NO_IMAGE] += 1
            continue
        latest = reviews[-1]  # the model output reviewed most recently
        votes = Counter(r.label for r in reviews)
        folder, class_source = export_class(label, reviews)
        export.items.append(FeedbackImage(
            case_id=case_id, image=store.path(case.image_key), label=folder, sha256=case.image_sha256,
            verdict=label, class_source=class_source,
            source="model-confirmed" if label == latest.model_label else "reviewer-corrected",
            n_reviews=len(reviews), votes_cancer=votes["cancer"], votes_normal=votes["normal"],
            model_label=latest.model_label or "", model_version=latest.model_version.name if latest.model_version else "",
            first_review_at=_iso(min(r.submitted_at for r in reviews)),
            last_review_at=_iso(max(r.submitted_at for r in reviews)), patient_key=case.patient_key or ""))
    return export


def export_class(verdict: str, reviews: list[Review]) -> tuple[str, str]:
    """(class folder, where the class came from) for a case whose consensus is ``verdict``.

    Malignant when the consensus is cancer. Otherwise benign or normal: the majority of the
    classes reviewers named (a tie counts as benign: a lesion seen by one reader is kept),
    else the three-class model's class that the reviewers agreed with, else normal (the
    meaning of "not cancer" before reviewers could name a class).
    """
    if verdict == "cancer":
        return "malignant", "reviewers"
    named = Counter(r.detailed_label for r in reviews if r.detailed_label in ("benign", "normal"))
    if named:
        return ("benign" if named["benign"] >= named["normal"] else "normal"), "reviewers"
    predicted = reviews[-1].prediction.predicted_class if reviews[-1].prediction is not None else None
    if predicted in ("benign", "normal"):
        return predicted, "model"
    return "normal", "default"


def export_feedback(out_dir: str | Path, since: datetime | None = None, min_reviews: int = 1,
                    rule: str = "majority") -> FeedbackExport:
    """Select the reviewed cases and write them to ``out_dir`` (safe to re-run into it)."""
    export = select_feedback(since, min_reviews, rule)
    export.written = write_feedback_folder(export.items, out_dir)
    return export


def describe(export: FeedbackExport) -> list[str]:
    """The summary lines `manage.py export-feedback` prints."""
    w = export.written
    lines = [f"exported {len(export.items)} case(s): {w.per_label.get('malignant', 0)} malignant, "
             f"{w.per_label.get('benign', 0)} benign, {w.per_label.get('normal', 0)} normal ({export.n_confirmed} model-confirmed, "
             f"{export.n_corrected} reviewer-corrected)",
             f"files: {w.written} written, {w.unchanged} unchanged, {w.removed} removed"]
    left = sum(export.left_out.values())
    lines.append(f"left out: {left}" + (" (" + ", ".join(f"{n} {why}" for why, n in sorted(export.left_out.items())) + ")" if left else ""))
    return lines
