"""Site adaptation without retraining: refit a checkpoint's probability calibration and its
operating threshold on one hospital's reviewed cases, and write the result as a new
checkpoint (same weights, so the same ranking and ROC-AUC; new probabilities and threshold).

Optionally first re-estimate the network's batch-normalisation statistics on the site's own
images (labels not used: :func:`adapt_batchnorm`), which changes the ranking as well.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ml import MLError
from ml.calibration import calibrated, fit_platt, shift_prevalence, shift_threshold
from ml.checkpoint import load_checkpoint, model_from_payload, save_checkpoint
from ml.inference import Predictor
from ml.metrics import (expected_calibration_error, operating_point, positives_needed, roc_auc, summarise,
                        threshold_for_sensitivity)
from ml.model import model_malignancy_logit

# Fewer reviewed cases than this (or fewer malignant ones than MIN_MALIGNANT) cannot set a threshold.
MIN_CASES = 20
MIN_MALIGNANT = 5
# A site threshold is set so that the target sensitivity holds on the site's *next* cases
# with this probability (ml.metrics.threshold_for_sensitivity); None: on the reviewed ones.
SITE_THRESHOLD_CONFIDENCE = 0.8


def malignancy_logits(predictor: Predictor, images: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
    """The uncalibrated malignancy logit of each image, preprocessed as the worker does."""
    return logits_of(predictor, model_inputs(predictor, images), batch_size)


def model_inputs(predictor: Predictor, images: Sequence[str | Path], batch_size: int = 64) -> torch.Tensor:
    """The model-size uint8 images (N x 3 x S x S), read once."""
    images = list(images)
    if not images:
        return torch.zeros(0, 3, predictor.input_size, predictor.input_size, dtype=torch.uint8)
    return torch.cat([predictor.to_uint8(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def logits_of(predictor: Predictor, uint8: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """The uncalibrated malignancy logit of each of ``model_inputs``' images."""
    out = [model_malignancy_logit(predictor.model, predictor.outputs(predictor.normalised(uint8[i:i + batch_size]))).double()
           for i in range(0, len(uint8), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def seen_by_model(predictor: Predictor, images: Sequence[str | Path], uint8: torch.Tensor) -> np.ndarray:
    """True per image the checkpoint was trained or validated on (the leakage guard's record:
    the same file or a near copy); all False when it recorded none."""
    from ml.evaluate import overlap_with_training

    overlap = overlap_with_training(predictor, [Path(p) for p in images], uint8) if len(images) else None
    return (overlap[0] | overlap[1]) if overlap is not None else np.zeros(len(images), dtype=bool)


def fit_site_threshold(logits: np.ndarray, malignant: np.ndarray, target_sensitivity: float,
                       confidence: float | None = SITE_THRESHOLD_CONFIDENCE) -> tuple[dict[str, Any], float]:
    """(Platt calibration, threshold on its scale) fitted on one site's reviewed cases."""
    calibration = fit_platt(logits, malignant)
    threshold = threshold_for_sensitivity(malignant, calibrated(logits, calibration), target_sensitivity, confidence)
    return calibration, threshold


# Fewer site images than this cannot stand for a site's scanner statistics.
MIN_ADAPT_IMAGES = 50


def batchnorm_stage(name: str) -> int:
    """The ResNet stage a batch-normalisation layer belongs to: 0 for the stem's ``bn1``,
    k for anything inside ``layerk`` (ensemble members' prefixes are ignored)."""
    for part in name.split("."):
        if part.startswith("layer") and part[5:].isdigit():
            return int(part[5:])
    return 0


def adapt_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor], weight: float = 1.0,
                    stages: int | None = None) -> int:
    """Re-estimate the running mean and variance of every batch-normalisation layer of
    ``model`` on ``batches`` (normalised inputs of one site; no labels, no gradient), in
    place, and return the number of images seen. ``weight`` 1 keeps only the site's
    statistics; 0.5 averages them with the training statistics.

    A scanner's gain, contrast and texture shift the activations of every layer; the layers
    were trained to see them centred on the training sites' statistics. Measuring the
    statistics on the site's own images re-centres them there ("AdaBN", Li et al.,
    "Revisiting batch normalization for practical domain adaptation", ICLR workshop 2017).
    Each batch counts equally (a cumulative average), so give batches of similar size.
    ``stages`` k re-estimates only the stem and ``layer1``..``layerk`` (None: every layer)."""
    layers = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and (stages is None or batchnorm_stage(name) <= stages)]
    if not layers:
        where = "" if stages is None else f" up to stage {stages} (0: the stem)"
        raise MLError(f"this model has no batch normalisation layers to adapt{where}")
    if not 0 < weight <= 1:
        raise MLError(f"the site statistics' weight must lie in (0, 1], not {weight}")
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None       # a cumulative average over the batches, not a moving one
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                seen += len(batch)
    finally:
        for m, (mean, var, tracked, momentum) in zip(layers, saved):
            if seen == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
            elif weight < 1:
                m.running_mean.mul_(weight).add_(mean, alpha=1 - weight)
                m.running_var.mul_(weight).add_(var, alpha=1 - weight)
            m.momentum = momentum
        model.train(was_training)
    return seen


def site_batches(predictor: Predictor, uint8: torch.Tensor, batch_size: int = 32) -> list[torch.Tensor]:
    """Model-size uint8 images -> normalised batches of near-equal size (so that each image
    weighs about the same in :func:`adapt_batchnorm`'s average)."""
    if len(uint8) == 0:
        return []
    chunks = torch.tensor_split(uint8, -(-len(uint8) // batch_size))
    return [predictor.normalised(c) for c in chunks]


# the rules `recalibrate` shows side by side, so an admin sees what each costs on the site
THRESHOLD_OPTIONS = (None, 0.5, 0.8)


def threshold_options(logits: np.ndarray, malignant: np.ndarray, calibration: dict[str, Any],
                      target_sensitivity: float) -> list[dict[str, Any]]:
    """Under each rule of THRESHOLD_OPTIONS (confidence None = in-sample): the threshold on
    ``calibration``'s scale, the sensitivity and specificity it gives on these cases, and
    the chance it keeps ``target_sensitivity`` on the next cancers."""
    scores = calibrated(logits, calibration)
    rows = []
    for confidence in THRESHOLD_OPTIONS:
        threshold = threshold_for_sensitivity(malignant, scores, target_sensitivity, confidence)
        m = operating_point(malignant, scores, threshold, target_sensitivity)
        rows.append({"confidence": confidence, "threshold": threshold, "sensitivity": m["sensitivity"],
                     "specificity": m["specificity"], "confidence_reached": m["target_confidence"]})
    return rows


def recalibrate(checkpoint: str | Path, images: Sequence[str | Path], malignant: Sequence[int], out: str | Path,
                target_sensitivity: float = 0.90, site: str | None = None,
                confidence: float | None = SITE_THRESHOLD_CONFIDENCE,
                site_images: Sequence[str | Path] | None = None, site_weight: float = 1.0) -> dict[str, Any]:
    """Write ``out``: ``checkpoint`` with a Platt calibration and a threshold (for
    ``target_sensitivity`` on the site's next cases with probability ``confidence``; None:
    met on these cases) fitted on ``images`` with their reviewed labels ``malignant``
    (1 = malignant). Images the checkpoint was trained or validated on (the leakage guard's
    record: the same file or a near copy) are left out: its scores on them are optimistic,
    so a threshold set there fails on new cases. Returns the new metadata; its
    ``site_adaptation`` entry holds the figures on the cases used, before and after
    (in-sample: judge the result on held-out data).

    With ``site_images`` (the site's uploads, reviewed or not), the batch-normalisation
    statistics are first re-estimated on them (:func:`adapt_batchnorm` with ``site_weight``;
    images the checkpoint saw are left out, at least MIN_ADAPT_IMAGES must remain), and the
    calibration and threshold are fitted on the adapted network's scores.
    """
    y = np.asarray(malignant, dtype=int)
    images = list(images)
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    uint8 = model_inputs(predictor, images)
    seen = seen_by_model(predictor, images, uint8)
    uint8, y = uint8[torch.from_numpy(~seen)], y[~seen]
    logits = logits_of(predictor, uint8)
    left_out = int(seen.sum())
    if len(y) < MIN_CASES or y.sum() < MIN_MALIGNANT or (1 - y).sum() < MIN_MALIGNANT:
        note = (f" ({left_out} more were left out: the model was trained or validated on them; recalibrate "
                f"on cases reviewed since)" if left_out else "")
        raise MLError(f"site adaptation needs at least {MIN_CASES} reviewed cases with {MIN_MALIGNANT} malignant "
                      f"and {MIN_MALIGNANT} other ones; there are {len(y)} ({int(y.sum())} malignant){note}")
    before = calibrated(logits, predictor.meta.get("calibration"))
    batchnorm = None
    if site_images is not None:
        batchnorm = _adapt_to_site(predictor, list(site_images), site_weight)
        # the reviewed labels played no part in the adaptation: a fair, if small, comparison
        batchnorm["roc_auc_before"] = roc_auc(y, logits)
        logits = logits_of(predictor, uint8)
        batchnorm["roc_auc_after"] = roc_auc(y, logits)
    calibration, threshold = fit_site_threshold(logits, y, target_sensitivity, confidence)
    after = calibrated(logits, calibration)
    at_threshold = dict(operating_point(y, after, threshold, target_sensitivity), ece=expected_calibration_error(y, after))
    payload = load_checkpoint(checkpoint)
    meta = dict(payload["meta"])
    meta.update({
        "calibration": calibration, "threshold": threshold, "target_sensitivity": target_sensitivity,
        "site_adaptation": {
            "site": site, "n": int(len(y)), "n_malignant": int(y.sum()), "left_out_seen": left_out,
            "confidence": confidence,
            # the chance that this threshold keeps the target sensitivity on the site's next cancers
            "confidence_reached": at_threshold["target_confidence"],
            "malignant_needed": (positives_needed(target_sensitivity, confidence)
                                 if confidence and target_sensitivity < 1 else None),
            "options": threshold_options(logits, y, calibration, target_sensitivity),
            "previous_calibration": payload["meta"].get("calibration"),
            "previous_threshold": payload["meta"]["threshold"],
            "before": dict(summarise(y, before, float(payload["meta"]["threshold"])),
                           ece=expected_calibration_error(y, before)),
            "after": at_threshold,
        },
    })
    if batchnorm is not None:
        meta["site_adaptation"]["batchnorm"] = batchnorm
    meta.pop("created_at", None)
    save_checkpoint(out, predictor.model, meta, half=meta.get("stored_dtype") == "float16")
    return meta


# At most this many of a site's images are read for its batch-normalisation statistics.
MAX_ADAPT_IMAGES = 2000


def _adapt_to_site(predictor: Predictor, site_images: list, weight: float) -> dict[str, Any]:
    """Re-estimate ``predictor.model``'s batch-normalisation statistics on the site's images
    it was not trained or validated on; what was used, for the checkpoint's record."""
    site_images = site_images[:MAX_ADAPT_IMAGES]
    uint8 = model_inputs(predictor, site_images)
    seen = seen_by_model(predictor, site_images, uint8)
    uint8 = uint8[torch.from_numpy(~seen)]
    if len(uint8) < MIN_ADAPT_IMAGES:
        raise MLError(f"re-estimating the network's statistics needs at least {MIN_ADAPT_IMAGES} of the site's images "
                      f"the model was not trained on; there are {len(uint8)}"
                      + (f" ({int(seen.sum())} more are its own training or validation images)" if seen.any() else ""))
    n = adapt_batchnorm(predictor.model, site_batches(predictor, uint8), weight)
    return {"images": n, "left_out_seen": int(seen.sum()), "weight": weight}


def set_prevalence(checkpoint: str | Path, out: str | Path, prevalence: float,
                   site: str | None = None) -> dict[str, Any]:
    """Write ``out``: ``checkpoint`` with its probabilities moved to a site where
    ``prevalence`` of the cases are malignant (ml.calibration.shift_prevalence) and its
    threshold moved alike, so every case keeps its verdict and only the probability shown
    changes. Needs no reviewed cases: the share of cancers a site sees is usually known from
    its own records. Returns the new metadata (``site_adaptation.method`` = "prevalence")."""
    payload = load_checkpoint(checkpoint)
    meta = dict(payload["meta"])
    previous = meta.get("calibration")
    calibration = shift_prevalence(previous, prevalence)
    threshold = shift_threshold(float(meta["threshold"]), calibration)
    meta.update({
        "calibration": calibration, "threshold": threshold,
        "site_adaptation": {
            "site": site, "method": "prevalence", "prevalence": float(prevalence),
            "prevalence_before": calibration["prevalence_before"], "log_odds_shift": calibration["prevalence_shift"],
            "previous_calibration": previous, "previous_threshold": float(payload["meta"]["threshold"]),
        },
    })
    meta.pop("created_at", None)
    model = model_from_payload(payload, checkpoint)   # the file read once
    save_checkpoint(out, model, meta, half=meta.get("stored_dtype") == "float16")
    return meta
