"""Evaluate a checkpoint on any ImageFolder directory; write JSON and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ml.data import cache_images, positive_names, scan_folder
from ml.inference import Predictor
from ml.metrics import (bootstrap_ci, brier, calibration_bins, precision_recall_curve,
                        roc_curve, summarise)


def predict_folder(predictor: Predictor, data: str | Path, batch_size: int = 64,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[Path], list]:
    """Probabilities and targets for every readable image of an ImageFolder directory.

    The folder's positive classes are the checkpoint's plus ``cancer`` and ``malignant``."""
    index = scan_folder(data, positive_names(predictor.meta.get("positive_classes")))
    cache = cache_images(index, predictor.input_size, progress=progress)
    from ml.train import evaluate
    probs, _ = evaluate(predictor.model, cache.images, None, batch_size, predictor.device,
                        predictor.meta["mean"], predictor.meta["std"])
    return cache.targets.numpy().astype(int), probs, cache.paths, cache.skipped


def evaluate_folder(model_path: str | Path, data: str | Path, device: str | None = None,
                    n_boot: int = 1000, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Metrics of the checkpoint at its stored threshold (and at 0.5) on ``data``.

    Keys include roc_auc, roc_auc_ci (95% bootstrap), accuracy, sensitivity, specificity,
    precision, f1, pr_auc, threshold, n, n_positive; ``_scores`` holds the raw arrays."""
    predictor = Predictor.from_checkpoint(model_path, device)
    y, probs, paths, skipped = predict_folder(predictor, data, batch_size, progress)
    result = summarise(y, probs, predictor.threshold)
    result["roc_auc_ci"] = list(bootstrap_ci(y, probs, n_boot=n_boot))
    result["at_0.5"] = summarise(y, probs, 0.5)
    result["brier"] = brier(y, probs)
    result["calibration"] = calibration_bins(y, probs)
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
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "cancer"], yticklabels=["normal", "cancer"],
           xlabel="predicted", ylabel="true", title=f"Confusion at {result['threshold']:.3f}")
    save(fig, "confusion.png")

    bins = result["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction cancer",
           title=f"Calibration (Brier {result['brier']:.3f})", xlim=(0, 1), ylim=(0, 1))
    save(fig, "calibration.png")

    (out / "metrics.json").write_text(to_json(result))
    written.append(out / "metrics.json")
    return written
