"""Site adaptation without retraining: refit a checkpoint's probability calibration and its
operating threshold on one hospital's reviewed cases, and write the result as a new
checkpoint (same weights, so the same ranking and ROC-AUC; new probabilities and threshold).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ml import MLError
from ml.calibration import calibrated, fit_platt
from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.inference import Predictor
from ml.metrics import expected_calibration_error, summarise, threshold_for_sensitivity
from ml.model import model_malignancy_logit

# Fewer reviewed cases than this (or fewer malignant ones than MIN_MALIGNANT) cannot set a threshold.
MIN_CASES = 20
MIN_MALIGNANT = 5


def malignancy_logits(predictor: Predictor, images: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
    """The uncalibrated malignancy logit of each image, preprocessed as the worker does."""
    out = []
    for start in range(0, len(images), batch_size):
        output = predictor.outputs(predictor.to_batch(list(images[start:start + batch_size])))
        out.append(model_malignancy_logit(predictor.model, output).double())
    return torch.cat(out).numpy() if out else np.zeros(0)


def recalibrate(checkpoint: str | Path, images: Sequence[str | Path], malignant: Sequence[int], out: str | Path,
                target_sensitivity: float = 0.90, site: str | None = None) -> dict[str, Any]:
    """Write ``out``: ``checkpoint`` with a Platt calibration and a threshold (for
    ``target_sensitivity``) fitted on ``images`` with their reviewed labels ``malignant``
    (1 = malignant). Returns the new metadata; its ``site_adaptation`` entry holds the
    figures on those cases before and after (in-sample: judge the result on held-out data).
    """
    y = np.asarray(malignant, dtype=int)
    if len(y) < MIN_CASES or y.sum() < MIN_MALIGNANT or (1 - y).sum() < MIN_MALIGNANT:
        raise MLError(f"site adaptation needs at least {MIN_CASES} reviewed cases with {MIN_MALIGNANT} malignant "
                      f"and {MIN_MALIGNANT} other ones; there are {len(y)} ({int(y.sum())} malignant)")
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    logits = malignancy_logits(predictor, images)
    before = calibrated(logits, predictor.meta.get("calibration"))
    calibration = fit_platt(logits, y)
    after = calibrated(logits, calibration)
    threshold = threshold_for_sensitivity(y, after, target_sensitivity)
    payload = load_checkpoint(checkpoint)
    meta = dict(payload["meta"])
    meta.update({
        "calibration": calibration, "threshold": threshold, "target_sensitivity": target_sensitivity,
        "site_adaptation": {
            "site": site, "n": int(len(y)), "n_malignant": int(y.sum()),
            "previous_calibration": payload["meta"].get("calibration"),
            "previous_threshold": payload["meta"]["threshold"],
            "before": dict(summarise(y, before, float(payload["meta"]["threshold"])),
                           ece=expected_calibration_error(y, before)),
            "after": dict(summarise(y, after, threshold), ece=expected_calibration_error(y, after)),
        },
    })
    meta.pop("created_at", None)
    save_checkpoint(out, predictor.model, meta, half=meta.get("stored_dtype") == "float16")
    return meta
