"""Agreement arithmetic on plain values, so that it can be checked by hand: Cohen's kappa,
the reviewers' consensus, Wilson score intervals for proportions (agreement, sensitivity,
specificity) and, for kappa, a percentile bootstrap over *cases* (1,000 resamples, fixed
seed, so the page shows the same figures every time; resampling cases rather than reviews
keeps the reviews of one case together, as they are not independent), and
`summarise_reviews`, which turns `ReviewRow`s into the page's `ReviewSummary`. Nothing here
reads the database: :mod:`webapp.review_stats` gathers the rows and re-exports these names.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Sequence

from webapp.models import LABELS

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
