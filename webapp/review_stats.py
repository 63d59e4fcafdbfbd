"""Agreement statistics of reviewers with the model and with each other.

The arithmetic lives in plain functions on plain values (`cohens_kappa`, `consensus`,
`wilson_interval`, `bootstrap_kappa_interval`, `summarise_reviews`) in `webapp.agreement`,
re-exported here, so it can be checked by hand; `review_statistics` only gathers the rows
from the database and hands them over, and this module lays the figures out for the
statistics page and its CSV. Reviews of withdrawn cases do not count.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import select

from webapp.agreement import SMALL_SAMPLE_CASES, ReviewRow, ReviewSummary, summarise_reviews
from webapp.agreement import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONSENSUS_RULES, Z_95,  # noqa: F401 (re-exported)
                              AgreementRow, Interval, PairRow, _agreement, _by_case, _ratio,
                              bootstrap_kappa_interval, cohens_kappa, consensus, wilson_interval)
from webapp.extensions import db
from webapp.models import LABELS, Case, ModelVersion, Prediction, Review, User


# A reviewer's detailed label as one of the three classes ("cancer" is "malignant").
REVIEW_CLASS = {"normal": "normal", "benign": "benign", "malignant": "malignant", "cancer": "malignant"}


def _review_rows() -> list[ReviewRow]:
    result = db.session.execute(
        select(Review.case_id, User.email, Review.model_label, Review.label, Review.reading_seconds,
               Prediction.predicted_class, Review.detailed_label, ModelVersion.name)
        .join(User, User.id == Review.reviewer_id)
        .join(Case, Case.id == Review.case_id)
        .outerjoin(Prediction, Prediction.id == Review.prediction_id)
        .outerjoin(ModelVersion, ModelVersion.id == Review.model_version_id)
        .where(Review.verdict.is_not(None), Review.model_label.is_not(None), Case.withdrawn_at.is_(None))
        .order_by(Review.case_id, Review.submitted_at, Review.id))
    return [ReviewRow(case_id, who, model_label, label, seconds, model_class,
                      REVIEW_CLASS.get((detailed or "").lower()), version)
            for case_id, who, model_label, label, seconds, model_class, detailed, version in result]


def _version_labels(version: ModelVersion) -> dict[int, str]:
    """Case id -> what ``version`` said, for cases that are not withdrawn."""
    return dict(db.session.execute(
        select(Prediction.case_id, Prediction.label).join(Case, Case.id == Prediction.case_id)
        .where(Prediction.model_version_id == version.id, Case.withdrawn_at.is_(None))).all())


class UnknownVersion(LookupError):
    """A model version name that is not in the registry."""


def review_statistics(version: str | None = None, rows: list[ReviewRow] | None = None) -> ReviewSummary:
    """The statistics of every finished review of a case that is not withdrawn.

    With ``version``, only the reviews of that version's output count, and the model
    figures are that version's against their consensus; without it, every review counts
    and the model figures are the active version's. Raises UnknownVersion.
    """
    rows = _review_rows() if rows is None else rows
    if version is not None:
        chosen = db.session.scalar(select(ModelVersion).where(ModelVersion.name == version))
        if chosen is None:
            raise UnknownVersion(version)
        rows = [r for r in rows if r.model_version == version]
    else:
        chosen = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    labels = _version_labels(chosen) if chosen is not None else {}
    summary = summarise_reviews(rows, labels, chosen.name if chosen else None)
    summary.version = version
    return summary


@dataclass
class VersionRow:
    """One model version's figures against the reviews of its own output."""

    name: str
    is_active: bool
    summary: ReviewSummary


def statistics_by_version(rows: list[ReviewRow] | None = None) -> list[VersionRow]:
    """Per model version that has reviews: the summary of the reviews of its output, its
    sensitivity and specificity against their consensus (newest version first)."""
    rows = _review_rows() if rows is None else rows
    by_version: dict[str, list[ReviewRow]] = defaultdict(list)
    for row in rows:
        if row.model_version:
            by_version[row.model_version].append(row)
    versions = db.session.scalars(select(ModelVersion).where(ModelVersion.name.in_(list(by_version)))
                                  .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())).all()
    return [VersionRow(v.name, v.is_active, summarise_reviews(by_version[v.name], _version_labels(v), v.name))
            for v in versions]


def version_names() -> list[str]:
    """Every registered version's name, newest first (for the page's selector)."""
    return list(db.session.scalars(select(ModelVersion.name).order_by(ModelVersion.created_at.desc(),
                                                                        ModelVersion.id.desc())))


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def statistics_csv_rows(summary: ReviewSummary, per_version: list[VersionRow]) -> list[list[str]]:
    """Every figure of the page as rows of (section, model_version, subject, n, estimate,
    ci_low, ci_high, interval, cases); the cells are plain values (the caller guards them)."""
    header = ["section", "model_version", "subject", "n", "estimate", "ci_low", "ci_high", "interval", "cases"]
    out = [header]
    scope = summary.version or "all"

    def add(section, subject, n, estimate, ci, method, cases=(), version=scope):
        out.append([section, version, subject, str(n), _fmt(estimate), _fmt(ci[0] if ci else None),
                    _fmt(ci[1] if ci else None), method if ci else "", " ".join(str(c) for c in cases)])

    for row in summary.reviewers + [summary.overall]:
        add("agreement_with_model", row.reviewer, row.n_reviews, row.agreement, row.agreement_ci, "wilson")
        add("kappa_with_model", row.reviewer, row.n_reviews, row.kappa_with_model, row.kappa_ci, "bootstrap-cases")
        add("class_kappa_with_model", row.reviewer, row.class_n, row.class_kappa, row.class_kappa_ci, "bootstrap-cases")
    for pair in summary.pairs:
        add("kappa_between_reviewers", f"{pair.a} | {pair.b}", pair.n, pair.kappa, pair.kappa_ci, "bootstrap-cases",
            pair.disagreements)
    for model in LABELS:
        for agreed in LABELS:
            add("model_vs_consensus", f"model {model}, consensus {agreed}", summary.confusion[model][agreed], None,
                None, "", summary.confusion_cases.get(model, {}).get(agreed, []))
    if summary.active_model:
        cells = summary.active_confusion
        add("sensitivity", summary.active_model, cells.get("tp", 0) + cells.get("fn", 0), summary.active_sensitivity,
            summary.active_sensitivity_ci, "wilson", summary.active_cases.get("fn", []))
        add("specificity", summary.active_model, cells.get("tn", 0) + cells.get("fp", 0), summary.active_specificity,
            summary.active_specificity_ci, "wilson", summary.active_cases.get("fp", []))
    for item in per_version:
        s = item.summary
        add("agreement_with_model", "all reviewers", s.overall.n_reviews, s.overall.agreement, s.overall.agreement_ci,
            "wilson", version=item.name)
        add("kappa_with_model", "all reviewers", s.overall.n_reviews, s.overall.kappa_with_model, s.overall.kappa_ci,
            "bootstrap-cases", version=item.name)
        cells = s.active_confusion
        add("sensitivity", item.name, cells.get("tp", 0) + cells.get("fn", 0), s.active_sensitivity,
            s.active_sensitivity_ci, "wilson", s.active_cases.get("fn", []), version=item.name)
        add("specificity", item.name, cells.get("tn", 0) + cells.get("fp", 0), s.active_specificity,
            s.active_specificity_ci, "wilson", s.active_cases.get("fp", []), version=item.name)
    return out


def statistics_page(version: str | None = None) -> dict:
    """What the statistics page shows: the figures (all reviews, or one version's), the
    per-version table and the versions to choose from. Raises UnknownVersion."""
    rows = _review_rows()  # read once for both
    return {"stats": review_statistics(version, rows), "per_version": statistics_by_version(rows),
            "versions": version_names(), "version": version, "small_sample_cases": SMALL_SAMPLE_CASES}
