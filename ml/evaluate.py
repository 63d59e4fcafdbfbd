"""Evaluate a checkpoint on any ImageFolder directory; write JSON and PNG plots."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.data import cache_images, positive_names, scan_folder
from ml.inference import Predictor
from ml.metrics import (bootstrap_ci, brier, calibration_bins, expected_calibration_error,
                        precision_recall_curve, roc_curve, summarise)

# dHash bits (of 256) within which two images count as near copies (as ml.data groups them)
NEAR_COPY_BITS = 30


@dataclass
class FolderPrediction:
    """A checkpoint's output on every readable image of an ImageFolder directory."""

    y: np.ndarray                  # 0/1 malignant targets (folder names)
    probs: np.ndarray              # calibrated malignancy probabilities
    true_classes: list[str]        # folder name per image
    predicted: list[str]           # model's class (multi-class) or its verdict label per image
    paths: list[Path]
    skipped: list
    images: Any                    # the uint8 cache (for the leakage guard)


def predict_folder(predictor: Predictor, data: str | Path, batch_size: int = 64,
                   progress: bool = False) -> FolderPrediction:
    """Calibrated probabilities, targets and classes for every readable image of ``data``.

    The folder's positive classes are the checkpoint's plus ``cancer`` and ``malignant``."""
    from ml.train import model_outputs

    index = scan_folder(data, positive_names(predictor.meta.get("positive_classes")))
    cache = cache_images(index, predictor.input_size, progress=progress, resize=predictor.resize)
    output = model_outputs(predictor.model, cache.images, batch_size, predictor.device,
                           predictor.meta["mean"], predictor.meta["std"])
    probs = predictor.calibrated(output).numpy().astype(np.float64)
    classes = predictor.classes_of(output)
    predicted = [cls if cls is not None else predictor.label_for(float(p)) for (cls, _), p in zip(classes, probs)]
    true_classes = [index.class_names[int(c)] for c in cache.classes]
    return FolderPrediction(cache.targets.numpy().astype(int), probs, true_classes, predicted,
                            cache.paths, cache.skipped, cache.images)


def class_confusion(true_classes: list[str], predicted: list[str], model_classes: list[str]) -> dict[str, Any]:
    """Rows: the evaluated folder's classes; columns: what the model says (its classes, or
    its normal/cancer verdict for a one-logit model); cells: image counts."""
    rows = sorted(set(true_classes))
    matrix = [[sum(1 for t, p in zip(true_classes, predicted) if t == r and p == c) for c in model_classes]
              for r in rows]
    return {"true": rows, "predicted": list(model_classes), "matrix": matrix}


def overlap_with_training(predictor: Predictor, paths: list[Path], images) -> tuple[np.ndarray, np.ndarray] | None:
    """(exact, near) boolean per evaluated image: the same file (sha256) as a training or
    validation image of the checkpoint, or a near copy (dHash within NEAR_COPY_BITS bits).
    None when the checkpoint did not record its images."""
    from ml.data import difference_hash
    from ml.hashing import file_sha256

    seen = predictor.meta.get("seen_images") or {}
    if not seen.get("sha256"):
        return None
    known = set(seen["sha256"])
    exact = np.array([file_sha256(p) in known for p in paths], dtype=bool)
    near = np.zeros(len(paths), dtype=bool)
    if seen.get("dhash"):
        ref = np.unpackbits(np.frombuffer(bytes.fromhex("".join(seen["dhash"])), dtype=np.uint8)).reshape(-1, 256)
        hashes = difference_hash(images)
        for i, h in enumerate(hashes):
            near[i] = bool(((ref != h).sum(axis=1) < NEAR_COPY_BITS).any())
    return exact, near & ~exact


def evaluate_folder(model_path: str | Path, data: str | Path, device: str | None = None,
                    n_boot: int = 1000, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Metrics of the checkpoint at its stored threshold (and at 0.5) on ``data``.

    Keys include roc_auc (malignant vs the rest), roc_auc_ci (95% bootstrap), accuracy,
    sensitivity, specificity, precision, f1, pr_auc, threshold, n, n_positive, brier, ece
    (15 equal-width bins), classes (the model's), confusion (tn/fp/fn/tp at the threshold,
    plus the folder class x model output matrix: true, predicted, matrix), and the leakage guard: overlap_exact / overlap_near (images that are, or
    nearly are, the checkpoint's own training or validation images) with ``unseen``, the
    metrics on the rest. Probabilities are calibrated. ``_scores`` holds the raw arrays."""
    predictor = Predictor.from_checkpoint(model_path, device)
    folder = predict_folder(predictor, data, batch_size, progress)
    y, probs, paths, skipped = folder.y, folder.probs, folder.paths, folder.skipped
    result = summarise(y, probs, predictor.threshold)
    result["roc_auc_ci"] = list(bootstrap_ci(y, probs, n_boot=n_boot))
    result["at_0.5"] = summarise(y, probs, 0.5)
    result["brier"] = brier(y, probs)
    result["ece"] = expected_calibration_error(y, probs, 15)
    result["classes"] = predictor.class_names or list(predictor.meta["labels"])
    result["confusion"] = dict(result["confusion"],
                               **class_confusion(folder.true_classes, folder.predicted, result["classes"]))
    overlap = overlap_with_training(predictor, paths, folder.images)
    if overlap is None:
        result["overlap_exact"] = result["overlap_near"] = None
        result["overlap_note"] = "the checkpoint does not record its training images (trained before the leakage guard)"
    else:
        exact, near = overlap
        result["overlap_exact"], result["overlap_near"] = int(exact.sum()), int(near.sum())
        rest = ~(exact | near)
        result["unseen"] = (summarise(y[rest], probs[rest], predictor.threshold) if rest.any() else None)
        if result["unseen"] is not None:
            result["unseen"]["ece"] = expected_calibration_error(y[rest], probs[rest], 15)
    result["calibration"] = calibration_bins(y, probs, 15)
    result["model"] = str(model_path)
    result["data"] = str(data)
    result["skipped_files"] = [str(p) for p, _ in skipped]
    result["_scores"] = {"y": y, "p": probs, "paths": [str(p) for p in paths]}
    return result


def to_json(result: dict[str, Any]) -> str:
    """JSON without the raw arrays; NaN written as null."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not k.startswith("_")}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(result), indent=2)


def write_report(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """ROC, PR, confusion-matrix and calibration PNGs (plus metrics.json) into ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y, p = result["_scores"]["y"], result["_scores"]["p"]
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lo, hi = result["roc_auc_ci"]
    ax.plot(fpr, tpr, lw=2, label=f"AUC {result['roc_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - result["specificity"]], [result["sensitivity"]], c="crimson", zorder=3,
               label=f"threshold {result['threshold']:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "roc.png")

    precision, recall = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.step(recall, precision, where="post", lw=2, label=f"AP {result['pr_auc']:.3f}")
    ax.axhline(result["n_positive"] / max(result["n"], 1), ls="--", c="grey", lw=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    save(fig, "pr.png")

    c = result["confusion"]
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])  # the verdict at the threshold
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "cancer"], yticklabels=["normal", "cancer"],
           xlabel="predicted", ylabel="true", title=f"Confusion at {result['threshold']:.3f}")
    save(fig, "confusion.png")

    # reliability diagram: observed malignant fraction per equal-width bin of the calibrated
    # probability (bars), the diagonal of perfect calibration, and how many cases each bin holds
    bins = result["calibration"]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(4.5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / max(len(bins), 1) if not bins else bins[0]["hi"] - bins[0]["lo"]
    ax.bar([b["lo"] for b in bins], [b["observed"] for b in bins], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="observed fraction malignant")
    ax.bar([b["lo"] for b in bins], [b["mean_predicted"] - b["observed"] for b in bins], bottom=[b["observed"] for b in bins],
           width=width, align="edge", color="none", edgecolor="crimson", hatch="//", label="gap to the mean predicted")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ece = result.get("ece")
    ax.set(ylabel="observed fraction malignant", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (ECE {ece:.3f}, Brier {result['brier']:.3f})" if ece is not None else "Reliability")
    ax.legend(loc="upper left", fontsize=7)
    counts.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge", color="grey")
    counts.set(xlabel="calibrated probability of malignancy", ylabel="cases")
    save(fig, "calibration.png")

    (out / "metrics.json").write_text(to_json(result))
    written.append(out / "metrics.json")
    return written
