"""Binary classification metrics on numpy arrays, written out so each is easy to check.

Conventions: ``y`` holds 0/1 targets (1 = cancer), ``scores`` the model's probabilities.
Undefined ratios (e.g. sensitivity with no positives) are NaN, never a silent 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _arrays(y: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} targets but {len(s)} scores")
    return y, s


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def roc_auc(y: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2."""
    y, s = _arrays(y, scores)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over tied scores (Mann-Whitney U)
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y, s = _arrays(y, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((1 - y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


def precision_recall_curve(y: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at every distinct threshold, recall ascending."""
    y, s = _arrays(y, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct].astype(float)
    predicted = distinct + 1.0
    return np.r_[1.0, tps / predicted], np.r_[0.0, tps / max(y.sum(), 1)]


def average_precision(y: Sequence, scores: Sequence) -> float:
    """PR-AUC as average precision: sum over thresholds of (recall step) x precision."""
    y, _ = _arrays(y, scores)
    if y.sum() == 0:
        return float("nan")
    precision, recall = precision_recall_curve(y, scores)
    return float(np.sum(np.diff(recall) * precision[1:]))


def confusion(y: Sequence, scores: Sequence, threshold: float) -> dict[str, int]:
    """Counts at ``score >= threshold`` -> cancer."""
    y, s = _arrays(y, scores)
    pred = s >= threshold
    return {"tp": int((pred & (y == 1)).sum()), "fp": int((pred & (y == 0)).sum()),
            "tn": int((~pred & (y == 0)).sum()), "fn": int((~pred & (y == 1)).sum())}


def threshold_metrics(y: Sequence, scores: Sequence, threshold: float) -> dict[str, float]:
    c = confusion(y, scores, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"accuracy": _ratio(tp + tn, tp + tn + fp + fn), "precision": precision,
            "sensitivity": recall, "recall": recall, "specificity": _ratio(tn, tn + fp),
            "f1": f1, "confusion": c}


def sensitivity_confidence(n_positive: int, n_missed: int, target: float) -> float:
    """How likely a threshold that misses ``n_missed`` of ``n_positive`` positives is to have
    sensitivity >= ``target`` on new positives from the same population (scores continuous).

    The threshold sits at the k-th lowest positive score (k = n_missed + 1), and the share
    of the population below the k-th of n order statistics is Beta(k, n - k + 1), so
    P(miss rate <= 1 - target) = P(Binomial(n, 1 - target) >= k). No assumption about the
    score distribution: the distribution-free tolerance bound behind split conformal
    prediction."""
    if n_positive < 1 or not 0 <= n_missed < n_positive:
        raise ValueError("need 0 <= n_missed < n_positive")
    q = 1.0 - target
    return float(sum(math.comb(n_positive, j) * q ** j * (1 - q) ** (n_positive - j)
                     for j in range(n_missed + 1, n_positive + 1)))


def positives_needed(target: float, confidence: float) -> int:
    """The fewest positives for which a threshold below all of them reaches ``confidence``
    that sensitivity >= ``target`` (1 - target**n >= confidence)."""
    if target >= 1.0:
        raise ValueError("no finite number of positives bounds a sensitivity of 1")
    return max(1, math.ceil(math.log(1 - confidence) / math.log(target) - 1e-12))


def threshold_for_sensitivity(y: Sequence, scores: Sequence, target: float = 0.90,
                              confidence: float | None = None) -> float:
    """A threshold whose sensitivity on (y, scores) is at least ``target`` with the highest
    specificity that allows; it lies half-way between the lowest positive score that must
    be included and the next lower score.

    With ``confidence`` (e.g. 0.8) the threshold is instead the highest one for which
    sensitivity >= ``target`` on *new* positives holds with that probability
    (``sensitivity_confidence``): on few positives it keeps a margin that the in-sample
    rule does not (10 positives at target 0.90: the in-sample rule may miss one, and then
    meets the target on new cases only 26 % of the time). Where even a threshold below every
    positive falls short of ``confidence`` (fewer than ``positives_needed``), that one is
    returned: the most the data can support."""
    y, s = _arrays(y, scores)
    pos = np.sort(s[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples to set a sensitivity threshold on")
    if not 0.0 < target <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    needed = math.ceil(target * len(pos) - 1e-9)
    if confidence is not None:
        if not 0.0 < confidence < 1.0:
            raise ValueError("confidence must be in (0, 1)")
        missed = 0
        while missed + 1 < len(pos) and sensitivity_confidence(len(pos), missed + 1, target) >= confidence:
            missed += 1
        needed = len(pos) - missed
    cut = float(pos[needed - 1])
    # Half-way to the next lower score rather than on the positive itself: the same
    # validation figures, but a margin against tiny score shifts (float16 weights, BLAS).
    below = s[s < cut]
    return (cut + float(below.max())) / 2 if len(below) else cut


def bootstrap_ci(y: Sequence, scores: Sequence, metric=roc_auc, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling cases with replacement (stratified by class
    so that every resample has both classes)."""
    y, s = _arrays(y, scores)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"), float("nan"))
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        values[b] = metric(y[idx], s[idx])
    alpha = (1 - level) / 2
    return (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)))


def calibration_bins(y: Sequence, scores: Sequence, n_bins: int = 10) -> list[dict[str, float]]:
    """Mean predicted probability vs observed fraction of cancer in equal-width bins."""
    y, s = _arrays(y, scores)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, n_bins - 1)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int((which == b).sum()),
             "mean_predicted": float(s[which == b].mean()), "observed": float(y[which == b].mean())}
            for b in range(n_bins) if (which == b).any()]


def brier(y: Sequence, scores: Sequence) -> float:
    y, s = _arrays(y, scores)
    return float(np.mean((s - y) ** 2))


def summarise(y: Sequence, scores: Sequence, threshold: float) -> dict:
    """All headline metrics at ``threshold`` plus the threshold-free ones."""
    y, s = _arrays(y, scores)
    out = threshold_metrics(y, s, threshold)
    out.update({"roc_auc": roc_auc(y, s), "pr_auc": average_precision(y, s),
                "threshold": float(threshold), "n": int(len(y)), "n_positive": int(y.sum())})
    return out


def operating_point(y: Sequence, scores: Sequence, threshold: float, target: float) -> dict:
    """``summarise`` at a stored threshold plus how sure it is to keep ``target`` sensitivity
    on new positives (``target_confidence``, from the positives it misses here)."""
    out = summarise(y, scores, threshold)
    n_pos, missed = out["n_positive"], out["confusion"]["fn"]
    out["target_confidence"] = sensitivity_confidence(n_pos, missed, target) if missed < n_pos else 0.0
    return out


def expected_calibration_error(y: Sequence, scores: Sequence, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width bins: sum over bins of (bin share) x |observed
    fraction positive - mean predicted probability|. NaN for no cases."""
    y, s = _arrays(y, scores)
    if len(y) == 0:
        return float("nan")
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - s[inside].mean())
    return float(total)
