"""Agreement statistics of reviewers with the model and with each other.

The arithmetic lives in plain functions on plain values (`cohens_kappa`, `consensus`,
`wilson_interval`, `bootstrap_kappa_interval`, `summarise_reviews`) so it can be checked
by hand; `review_statistics` only gathers the rows from the database and hands them over.

95 % intervals: Wilson score intervals for proportions (agreement, sensitivity,
specificity); for kappa a percentile bootstrap over *cases* (1,000 resamples, fixed seed,
so the page shows the same figures every time): resampling cases rather than reviews keeps
the reviews of one case together, as they are not independent. Reviews of withdrawn
cases do not count.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

from sqlalchemy import select

from webapp.extensions import db
from webapp.models import LABELS, Case, ModelVersion, Prediction, Review, User

CONSENSUS_RULES = ("majority", "unanimous")
Z_95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
#: Below this many reviewed cases the page warns that the intervals are wide and the
#: figures may move a lot with the next few reviews.
SMALL_SAMPLE_CASES = 30

Interval = tuple[float, float]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval | None:
    """The Wilson score interval of ``successes`` out of ``n`` (None when n = 0).

    centre (p + z²/2n) / (1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n);
    unlike p ± z·SE it stays inside [0, 1] and behaves at 0/n and n/n.
    """
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0/n and n/n the bound is exactly 0 or 1 (rounding would leave 0.9999999999999999).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_kappa_interval(groups: Sequence[Sequence[tuple[str, str]]], resamples: int = BOOTSTRAP_RESAMPLES,
                             seed: int = BOOTSTRAP_SEED) -> Interval | None:
    """95 % percentile-bootstrap interval of Cohen's kappa, resampling cases.

    ``groups`` has one entry per case: the (rater A label, rater B label) pairs that case
    contributes (one for a reviewer against the model; several when all reviewers are
    pooled). Resamples where kappa is undefined are skipped; None when fewer than two
    cases, one label only, or most resamples undefined.
    """
    import numpy as np

    groups = [g for g in groups if g]
    n = len(groups)
    labels = sorted({x for g in groups for pair in g for x in pair})
    if n < 2 or len(labels) < 2:
        return None
    k = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    # Per case: rows, agreements, then each label's count for rater A and for rater B.
    counts = np.zeros((n, 2 + 2 * k))
    for c, group in enumerate(groups):
        for a, b in group:
            counts[c, 0] += 1
            counts[c, 1] += a == b
            counts[c, 2 + index[a]] += 1
            counts[c, 2 + k + index[b]] += 1
    # Cases with the same counts are interchangeable: drawing n cases with replacement is
    # drawing n times from the distinct count patterns in proportion to their frequency,
    # which is the same bootstrap at a fraction of the cost (a handful of patterns, not n).
    patterns, frequency = np.unique(counts, axis=0, return_counts=True)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // len(patterns)))  # bounded memory
    kappas = []
    for start in range(0, resamples, chunk):
        weights = rng.multinomial(n, frequency / n, size=min(chunk, resamples - start))
        sums = weights @ patterns
        total = sums[:, 0]
        observed = sums[:, 1] / total
        expected = ((sums[:, 2:2 + k] / total[:, None]) * (sums[:, 2 + k:] / total[:, None])).sum(axis=1)
        defined = expected < 1 - 1e-12
        kappas.append((observed[defined] - expected[defined]) / (1 - expected[defined]))
    values = np.concatenate(kappas)
    if len(values) < resamples / 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


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
    model_version: str | None = None   # the version whose output was reviewed


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
    agreement_ci: Interval | None = None
    kappa_ci: Interval | None = None
    class_kappa_ci: Interval | None = None


@dataclass
class PairRow:
    """Two reviewers on the cases both read: kappa with its interval, and where they differ."""

    a: str
    b: str
    n: int
    kappa: float | None
    kappa_ci: Interval | None
    disagreements: list[int]


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
    # Intervals and drill-down: the cases behind each cell.
    pairs: list[PairRow] = field(default_factory=list)
    kappa_between_ci: Interval | None = None
    confusion_cases: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    active_cases: dict[str, list[int]] = field(default_factory=dict)
    active_sensitivity_ci: Interval | None = None
    active_specificity_ci: Interval | None = None
    version: str | None = None       # the model version these figures are limited to (None: all)

    @property
    def small_sample(self) -> bool:
        return self.n_cases < SMALL_SAMPLE_CASES


def _agreement(name: str, rows: list[ReviewRow]) -> AgreementRow:
    agree = sum(r.label == r.model_label for r in rows)
    times = [r.reading_seconds for r in rows if r.reading_seconds is not None]
    classed = [r for r in rows if r.model_class and r.reviewer_class]
    class_agree = sum(r.model_class == r.reviewer_class for r in classed)
    kappa = cohens_kappa([r.model_label for r in rows], [r.label for r in rows])
    class_kappa = cohens_kappa([r.model_class for r in classed], [r.reviewer_class for r in classed])
    return AgreementRow(name, len(rows), agree, agree / len(rows) if rows else None, kappa,
                        sum(times) / len(times) if times else None, len(classed),
                        class_agree / len(classed) if classed else None, class_kappa,
                        agreement_ci=wilson_interval(agree, len(rows)),
                        kappa_ci=None if kappa is None else bootstrap_kappa_interval(
                            _by_case(rows, lambda r: (r.model_label, r.label))),
                        class_kappa_ci=None if class_kappa is None else bootstrap_kappa_interval(
                            _by_case(classed, lambda r: (r.model_class, r.reviewer_class))))


def _by_case(rows: Sequence[ReviewRow], pair) -> list[list[tuple[str, str]]]:
    """The rows' label pairs grouped by case, for a bootstrap over cases."""
    grouped: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        grouped[row.case_id].append(pair(row))
    return list(grouped.values())


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
    confusion_cases: dict[str, dict[str, list[int]]] = {m: {c: [] for c in LABELS} for m in LABELS}
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
        confusion_cases[case_rows[-1].model_label][label].append(case_id)

    pairs, pair_rows = [], []
    for a, b in combinations(sorted(by_reviewer), 2):
        labels_a = {r.case_id: r.label for r in by_reviewer[a]}
        labels_b = {r.case_id: r.label for r in by_reviewer[b]}
        shared = sorted(set(labels_a) & set(labels_b))
        if shared:
            kappa = cohens_kappa([labels_a[c] for c in shared], [labels_b[c] for c in shared])
            pairs.append((a, b, len(shared), kappa))
            pair_rows.append(PairRow(a, b, len(shared), kappa, None if kappa is None else bootstrap_kappa_interval(
                [[(labels_a[c], labels_b[c])] for c in shared]),
                [c for c in shared if labels_a[c] != labels_b[c]]))
    defined = [k for *_, k in pairs if k is not None]

    summary = ReviewSummary(
        reviewers=[_agreement(name, by_reviewer[name]) for name in sorted(by_reviewer)],
        overall=_agreement("all reviewers", list(rows)), confusion=confusion,
        n_cases=len(by_case), n_ties=ties, reviewer_pairs=pairs,
        kappa_between_reviewers=sum(defined) / len(defined) if defined else None,
        active_model=active_model, pairs=pair_rows, confusion_cases=confusion_cases)
    if len(pair_rows) == 1:
        # One pair: the mean is that pair's kappa, and so is its interval (with more
        # pairs the mean's interval would need the pairs' dependence; not shown).
        summary.kappa_between_ci = pair_rows[0].kappa_ci
    if active_labels:
        cells: dict[str, list[int]] = {"tp": [], "fn": [], "tn": [], "fp": []}
        for case_id in sorted(agreed):
            if case_id not in active_labels:
                continue
            truth, said = agreed[case_id], active_labels[case_id]
            cell = ("tp" if said == "cancer" else "fn") if truth == "cancer" else ("fp" if said == "cancer" else "tn")
            cells[cell].append(case_id)
        tp, fn, tn, fp = (len(cells[k]) for k in ("tp", "fn", "tn", "fp"))
        summary.active_n = tp + fn + tn + fp
        summary.active_sensitivity, summary.active_specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        summary.active_sensitivity_ci, summary.active_specificity_ci = wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp)
        summary.active_confusion = {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
        summary.active_cases = cells
    return summary


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
