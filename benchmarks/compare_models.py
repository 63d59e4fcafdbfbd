#!/usr/bin/env python
"""Compare checkpoints on one site, image by image: the paired test behind every "A against B"
figure in docs/model-quality.md.

    .venv/bin/python benchmarks/compare_models.py BASE.pt OTHER.pt [MORE.pt ...] \\
        [--site bus-uclm] [--ensemble] [--mirror] [--threads 2]

For each model, on every image of ``../shared/data/SITE``: ROC-AUC (malignant vs rest) with a
95 % interval that resamples patients, sensitivity and specificity at the model's stored
threshold, and ECE (15 bins). For each model after the first, the paired difference in
ROC-AUC against the first, with its patient-bootstrap interval (the same resampled patients
for both models, so the shared difficulty of the images cancels out), and the same for ECE.

``--ensemble`` adds the mean of the models' calibrated log-odds (a quick estimate of what an
ensemble of the checkpoints would score), against the first model and against the mean single
model. The product's ensemble (``manage.py ensemble``, ml/ensemble.py) averages the raw outputs
and fits one calibration on the members' shared validation part: compare its checkpoint like
any other. ``--mirror`` adds each model with mirror test-time augmentation (the mean log-odds
of the image and its left-right mirror), which is not in the product.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ml import MLError  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import expected_calibration_error, roc_auc, summarise  # noqa: E402
from ml.train import model_outputs  # noqa: E402
import train_sites  # noqa: E402
from train_sites import SITES, patient_bootstrap, patient_of  # noqa: E402


def log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def scores(model_path: str, site: str, mirror: bool) -> dict:
    """Calibrated probabilities (and the mirror-averaged ones) of one model on one site."""
    predictor = Predictor.from_checkpoint(model_path, "cpu")
    fp = predict_folder(predictor, train_sites.DATA / site)
    out = {"name": f"{Path(model_path).parent.name}/{Path(model_path).name}",
           "paths": [str(p) for p in fp.paths], "y": fp.y, "p": fp.probs, "threshold": predictor.threshold}
    if mirror:
        flipped = model_outputs(predictor.model, fp.images.flip(-1), 64, predictor.device,
                                predictor.meta["mean"], predictor.meta["std"])
        p_flip = predictor.calibrated(flipped).numpy().astype(np.float64)
        out["p_mirror"] = sigmoid((log_odds(fp.probs) + log_odds(p_flip)) / 2)
    return out


def ece(y: np.ndarray, p: np.ndarray) -> float:
    return expected_calibration_error(y, p, 15)


def line(label: str, y: np.ndarray, p: np.ndarray, groups: list[str], threshold: float,
         baseline: np.ndarray | None = None) -> str:
    lo, hi = patient_bootstrap(y, p, groups)
    m = summarise(y, p, threshold)
    text = (f"  {label:44} {roc_auc(y, p):.3f} ({lo:.3f}-{hi:.3f})  {m['sensitivity']:.3f} / {m['specificity']:.3f}"
            f"  {ece(y, p):.3f}")
    if baseline is not None:
        d_lo, d_hi = patient_bootstrap(y, p, groups, baseline=baseline)
        text += f"  {roc_auc(y, p) - roc_auc(y, baseline):+.3f} ({d_lo:+.3f} to {d_hi:+.3f})"
        e_lo, e_hi = patient_bootstrap(y, p, groups, baseline=baseline, metric=ece)
        text += f"  ECE {ece(y, p) - ece(y, baseline):+.3f} ({e_lo:+.3f} to {e_hi:+.3f})"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoints; the first is the baseline of the paired differences")
    ap.add_argument("--site", default="bus-uclm", choices=sorted(SITES))
    ap.add_argument("--ensemble", action="store_true", help="also the mean calibrated log-odds of all the models")
    ap.add_argument("--mirror", action="store_true", help="also each model with mirror test-time augmentation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(train_sites.DATA), help="folder holding the sites (default: %(default)s)")
    args = ap.parse_args()
    train_sites.use_data(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (train_sites.DATA / args.site).is_dir():
        sys.exit(f"no data folder {train_sites.DATA / args.site}")
    if args.ensemble and len(args.models) < 2:
        ap.error("--ensemble needs at least two models")
    try:
        runs = [scores(m, args.site, args.mirror) for m in args.models]
    except MLError as exc:   # a missing, truncated or foreign checkpoint: say which, no traceback
        sys.exit(f"compare_models: {exc}")
    for run in runs[1:]:
        if run["paths"] != runs[0]["paths"]:
            sys.exit(f"{run['name']} did not read the same images as {runs[0]['name']}")
    y = runs[0]["y"]
    groups = [patient_of(Path(p), args.site) for p in runs[0]["paths"]]
    base = runs[0]["p"]
    print(f"{SITES[args.site]}: {len(y)} images ({int(y.sum())} malignant) of {len(set(groups))} patients")
    print(f"  {'model':44} {'ROC-AUC (95% CI)':>21}  {'sens / spec':>13}  {'ECE':>5}  paired against {runs[0]['name']}: ROC-AUC, ECE")
    for i, run in enumerate(runs):
        print(line(run["name"], y, run["p"], groups, run["threshold"], base if i else None))
        if args.mirror:
            print(line(f"{run['name']} + mirror (against itself)", y, run["p_mirror"], groups, run["threshold"],
                       run["p"]))
    if args.ensemble:
        mean_logit = np.mean([log_odds(r["p"]) for r in runs], axis=0)
        mean_single = np.mean([roc_auc(y, r["p"]) for r in runs])
        print(line(f"ensemble of {len(runs)} (mean log-odds)", y, sigmoid(mean_logit), groups,
                   float(sigmoid(np.mean([log_odds(np.array(r["threshold"])) for r in runs]))), base))
        print(f"  mean single model {mean_single:.3f}; ensemble {roc_auc(y, sigmoid(mean_logit)):.3f} "
              "(the ensemble's threshold: the models' thresholds averaged as log-odds, not refitted)")


if __name__ == "__main__":
    main()
