"""Agreement statistics of reviewers with the model and with each other.

The arithmetic lives in plain functions on plain values (`cohens_kappa`, `consensus`,
`summarise_reviews`) so it can be checked by hand; `review_statistics` only gathers the
rows from the database and hands them over.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

from sqlalchemy import select

from webapp.extensions import db
from webapp.models import LABELS, Prediction, Review, User

CONSENSUS_RULES = ("majority", "unanimous")


def cohens_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e).

    None when it is undefined: no items, or both raters gave one and the same label
    to everything (p_e = 1).
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} labels against {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[k] * count_b[k] for k in set(count_a) | set(count_b)) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def consensus(labels: Iterable[str], rule: str = "majority") -> str | None:
    """The reviewers' joint label, or None when there is none.

    ``majority``: the label with strictly more votes (a tie has no consensus);
    ``unanimous``: the label everyone gave.
    """
    if rule not in CONSENSUS_RULES:
        raise ValueError(f"unknown consensus rule {rule!r}; choose {' or '.join(CONSENSUS_RULES)}")
    votes = Counter(labels)
    if not votes:
        return None
    if rule == "unanimous":
        return next(iter(votes)) if len(votes) == 1 else None
    (top, n_top), *rest = votes.most_common()
    return None if rest and rest[0][1] == n_top else top


@dataclass(frozen=True)
class ReviewRow:
    """One finished review, reduced to what the statistics need."""

    case_id: int
    reviewer: str
    model_label: str
    label: str
    reading_seconds: float | None = None
    model_class: str | None = None     # a multi-class model's most likely class
    reviewer_class: str | None = None  # normal / benign / malignant, when the reviewer gave one


# A reviewer's detailed label as one of the three classes ("cancer" is "malignant").
REVIEW_CLASS = {"normal": "normal", "benign": "benign", "malignant": "malignant", "cancer": "malignant"}


@dataclass
class AgreementRow:
    reviewer: str
    n_reviews: int
    n_agree: int
    agreement: float | None          # share of reviews whose label equals the model's
    kappa_with_model: float | None
    mean_reading_seconds: float | None
    # Agreement on the class (normal / benign / malignant), over reviews where the model
    # gave a class and the reviewer named one.
    class_n: int = 0
    class_agreement: float | None = None
    class_kappa: float | None = None


@dataclass
class ReviewSummary:
    reviewers: list[AgreementRow]
    overall: AgreementRow
    # counts[model label][consensus label] over cases with a majority consensus
    confusion: dict[str, dict[str, int]]
    n_cases: int
    n_ties: int
    reviewer_pairs: list[tuple[str, str, int, float | None]]  # (a, b, shared cases, kappa)
    kappa_between_reviewers: float | None  # mean of the defined pairwise kappas
    active_model: str | None = None
    active_n: int = 0
    active_sensitivity: float | None = None
    active_specificity: float | None = None
    active_confusion: dict[str, int] = field(default_factory=dict)


def _agreement(name: str, rows: list[ReviewRow]) -> AgreementRow:
    agree = sum(r.label == r.model_label for r in rows)
    times = [r.reading_seconds for r in rows if r.reading_seconds is not None]
    classed = [r for r in rows if r.model_class and r.reviewer_class]
    class_agree = sum(r.model_class == r.reviewer_class for r in classed)
    return AgreementRow(name, len(rows), agree, agree / len(rows) if rows else None,
                        cohens_kappa([r.model_label for r in rows], [r.label for r in rows]),
                        sum(times) / len(times) if times else None, len(classed),
                        class_agree / len(classed) if classed else None,
                        cohens_kappa([r.model_class for r in classed], [r.reviewer_class for r in classed]))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def summarise_reviews(rows: Sequence[ReviewRow], active_labels: dict[int, str] | None = None,
                      active_model: str | None = None) -> ReviewSummary:
    """Agreement per reviewer and overall, model-vs-consensus confusion, kappas, and the
    active model's sensitivity/specificity against the majority consensus.

    ``active_labels`` maps case id to the active model's label for that case (cases it
    has not read are left out of its figures).
    """
    by_reviewer: dict[str, list[ReviewRow]] = defaultdict(list)
    by_case: dict[int, list[ReviewRow]] = defaultdict(list)
    for row in rows:
        by_reviewer[row.reviewer].append(row)
        by_case[row.case_id].append(row)

    confusion = {m: {c: 0 for c in LABELS} for m in LABELS}
    agreed: dict[int, str] = {}
    ties = 0
    for case_id, case_rows in by_case.items():
        label = consensus(r.label for r in case_rows)
        if label is None:
            ties += 1
            continue
        agreed[case_id] = label
        # The model label the reviewers saw: the latest one if the case was re-run between reviews.
        confusion[case_rows[-1].model_label][label] += 1

    pairs = []
    for a, b in combinations(sorted(by_reviewer), 2):
        labels_a = {r.case_id: r.label for r in by_reviewer[a]}
        labels_b = {r.case_id: r.label for r in by_reviewer[b]}
        shared = sorted(set(labels_a) & set(labels_b))
        if shared:
            pairs.append((a, b, len(shared), cohens_kappa([labels_a[c] for c in shared], [labels_b[c] for c in shared])))
    defined = [k for *_, k in pairs if k is not None]

    summary = ReviewSummary(
        reviewers=[_agreement(name, by_reviewer[name]) for name in sorted(by_reviewer)],
        overall=_agreement("all reviewers", list(rows)), confusion=confusion,
        n_cases=len(by_case), n_ties=ties, reviewer_pairs=pairs,
        kappa_between_reviewers=sum(defined) / len(defined) if defined else None,
        active_model=active_model)
    if active_labels:
        tp = sum(agreed[c] == "cancer" and active_labels[c] == "cancer" for c in agreed if c in active_labels)
        fn = sum(agreed[c] == "cancer" and active_labels[c] == "normal" for c in agreed if c in active_labels)
        tn = sum(agreed[c] == "normal" and active_labels[c] == "normal" for c in agreed if c in active_labels)
        fp = sum(agreed[c] == "normal" and active_labels[c] == "cancer" for c in agreed if c in active_labels)
        summary.active_n = tp + fn + tn + fp
        summary.active_sensitivity, summary.active_specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        summary.active_confusion = {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    return summary


def review_statistics() -> ReviewSummary:
    """The statistics of every finished review in the database."""
    from webapp.models import ModelVersion

    result = db.session.execute(
        select(Review.case_id, User.email, Review.model_label, Review.label, Review.reading_seconds,
               Prediction.predicted_class, Review.detailed_label)
        .join(User, User.id == Review.reviewer_id)
        .outerjoin(Prediction, Prediction.id == Review.prediction_id)
        .where(Review.verdict.is_not(None), Review.model_label.is_not(None))
        .order_by(Review.case_id, Review.submitted_at, Review.id))
    rows = [ReviewRow(case_id, who, model_label, label, seconds, model_class,
                      REVIEW_CLASS.get((detailed or "").lower()))
            for case_id, who, model_label, label, seconds, model_class, detailed in result]
    active = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    active_labels = {}
    if active is not None:
        active_labels = dict(db.session.execute(
            select(Prediction.case_id, Prediction.label).where(Prediction.model_version_id == active.id)).all())
    return summarise_reviews(rows, active_labels, active.name if active else None)
