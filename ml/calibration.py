"""Probability calibration of the malignancy score.

Platt scaling (Platt 1999): p = sigmoid(a * z + b) on the malignancy logit z, fitted by
maximum likelihood on validation data. Chosen over temperature scaling because the score
shown is one malignant-vs-rest probability and training reweights the classes (balanced
loss), which shifts the base rate: temperature alone cannot move the intercept, Platt's
b can. With a > 0 the map is monotone, so ROC-AUC and the ranking of cases are unchanged.
Stored in the checkpoint as ``meta["calibration"] = {"method": "platt", "a": .., "b": ..}``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ml import MLError

IDENTITY = {"method": "none", "a": 1.0, "b": 0.0}


def fit_platt(logits: Sequence[float], y: Sequence[int], max_iter: int = 100) -> dict[str, Any]:
    """Fit (a, b) by Newton's method on the log-loss with Platt's smoothed targets
    ((n+ + 1)/(n+ + 2) and 1/(n- + 2)), which keeps small or separable sets finite.

    Raises MLError when ``y`` lacks a class. ``a`` is kept positive (a non-positive slope
    would reverse the ranking; then the identity slope is kept and only ``b`` is fitted).
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    n_pos, n_neg = float(t.sum()), float(len(t) - t.sum())
    if n_pos == 0 or n_neg == 0:
        raise MLError("calibration needs both malignant and other cases")
    target = np.where(t > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        u = a * z + b  # log-loss written with logaddexp so large scores cannot overflow
        return float(np.sum(target * np.logaddexp(0, -u) + (1 - target) * np.logaddexp(0, u)))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(max_iter):
        p = 0.5 * (1 + np.tanh(0.5 * (a * z + b)))
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.sum((p - target) * z), np.sum(p - target)])
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while scale > 1e-8 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2  # backtracking: Newton from far away can overshoot
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, loss(a, b)
        if np.abs(scale * step).max() < 1e-10 or previous - current < 1e-12 * max(1.0, abs(current)):
            break
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        a, b = 1.0, float(np.log(n_pos + 1) - np.log(n_neg + 1))
        p = 0.5 * (1 + np.tanh(0.5 * (z + b)))
        b -= float(np.mean(p - target) / max(np.mean(p * (1 - p)), 1e-12))
    return {"method": "platt", "a": float(a), "b": float(b), "n": int(len(t)), "n_positive": int(n_pos)}


def calibrated(logits: np.ndarray | float, calibration: dict[str, Any] | None) -> np.ndarray | float:
    """The calibrated malignancy probability for malignancy logits (identity when None)."""
    c = calibration or IDENTITY
    z = np.asarray(logits, dtype=np.float64) * float(c["a"]) + float(c["b"])
    p = 0.5 * (1 + np.tanh(0.5 * z))  # the sigmoid, without overflow
    return float(p) if np.ndim(p) == 0 else p


def fitted_prevalence(calibration: dict[str, Any] | None) -> float | None:
    """The share of malignant cases that ``calibration``'s probabilities assume: a prevalence
    it was moved to (:func:`shift_prevalence`), else the share among the cases it was fitted
    on; None when it does not say (an older checkpoint, or no calibration)."""
    if not isinstance(calibration, dict):
        return None
    if calibration.get("prevalence") is not None:
        return float(calibration["prevalence"])
    n, positive = calibration.get("n"), calibration.get("n_positive")
    if isinstance(n, (int, float)) and isinstance(positive, (int, float)) and 0 < positive < n:
        return float(positive) / float(n)
    return None


def log_odds(p: np.ndarray | float) -> np.ndarray | float:
    """The inverse of the sigmoid, with probabilities kept 1e-12 away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    z = np.log(q / (1 - q))
    return float(z) if np.ndim(z) == 0 else z


def shift_prevalence(calibration: dict[str, Any] | None, prevalence: float) -> dict[str, Any]:
    """``calibration`` moved to a site where ``prevalence`` of the cases are malignant.

    A Platt fit carries the share of cancers among its validation cases into every
    probability. Where only that share differs (the images of each class look alike), Bayes'
    rule moves every log-odds by the same amount, logit(new share) - logit(old share)
    (Saerens, Latinne & Decaestecker, Neural Computation 2002): only ``b`` changes, so the
    ranking and, with the threshold moved alike (:func:`shift_threshold`), every verdict stay.
    """
    if not 0 < prevalence < 1:
        raise MLError(f"the prevalence must lie strictly between 0 and 1, not {prevalence}")
    old = fitted_prevalence(calibration)
    if old is None or not calibration or calibration.get("method") in (None, "none"):
        raise MLError("the model's calibration does not record the share of cancers it was fitted on: "
                      "recalibrate it on the site's reviewed cases instead")
    shift = log_odds(prevalence) - log_odds(old)
    return dict(calibration, b=float(calibration["b"]) + shift, prevalence=float(prevalence),
                prevalence_before=old, prevalence_shift=shift)


def shift_threshold(threshold: float, calibration: dict[str, Any]) -> float:
    """The threshold on the scale of a calibration moved by :func:`shift_prevalence`, so that
    every case keeps its verdict."""
    return float(calibrated(log_odds(threshold) + float(calibration.get("prevalence_shift") or 0.0), None))
