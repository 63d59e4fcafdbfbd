#!/usr/bin/env python
"""Two cheap checks before paying for a training run on a preprocessing idea.

Question: would cropping to the ultrasound field, or mirror test-time augmentation, help?
Answer (2026-11-26): neither adopted; the crop keeps 0.994-0.998 of every site's images (a
no-op), and the mirror's +0.011 on BUS-UCLM (128-px model) did not repeat on held-out BrEaST or
at 144 px. docs/studies/2026-11-26-preprocessing-probe.md

    .venv/bin/python studies/preprocessing_probe.py [--model demo/model.pt]

1. Crop to the ultrasound field: how much of each site's images is black padding that a
   crop would remove (the share of the image area kept after trimming border rows and
   columns in which fewer than 4 % of pixels are brighter than 8/255). A step that keeps
   ~100 % of every image cannot change what the model learns.
2. Test-time augmentation by horizontal flip: ROC-AUC (malignant vs rest) of a model's
   malignancy logit on the plain images, on the mirrored images, and on their mean, with a
   95 % interval of the paired gain (mean minus plain) that resamples whole patients.
   Sites the model was trained on are marked: their figures flatter.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # for train_sites

from ml.data import cache_images, normalise, scan_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import roc_auc  # noqa: E402
from ml.model import model_malignancy_logit  # noqa: E402
from train_sites import patient_bootstrap, patient_of  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SITES = ("busi", "breast-lesions-usg", "bus-uclm")


def field_box(image: Image.Image, dark: int = 8, min_fill: float = 0.04) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) after trimming border rows/columns that are nearly all black."""
    lit = np.asarray(image.convert("L"), dtype=np.uint8) > dark

    def span(profile: np.ndarray) -> tuple[int, int]:
        idx = np.flatnonzero(profile >= min_fill)
        return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, len(profile))

    top, bottom = span(lit.mean(axis=1))
    left, right = span(lit[top:bottom].mean(axis=0))
    return left, top, right, bottom


def kept_area(site: str) -> list[float]:
    shares = []
    for path in sorted(p for p in (DATA / site).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        if "mask" in path.name.lower():
            continue
        with Image.open(path) as im:
            l, t, r, b = field_box(im)
            shares.append((r - l) * (b - t) / (im.size[0] * im.size[1]))
    return shares


@torch.inference_mode()
def flip_tta(predictor: Predictor, site: str) -> tuple[dict[str, float], tuple[float, float]]:
    """ROC-AUC of the plain, mirrored and averaged logits, and the patient-bootstrap 95 %
    interval of the averaged minus the plain."""
    cache = cache_images(scan_folder(DATA / site, positive_classes=["malignant"]), predictor.input_size,
                         resize=predictor.resize)
    y = cache.targets.numpy()
    logits = {}
    for name, view in (("plain", lambda x: x), ("mirrored", lambda x: x.flip(-1))):
        parts = [model_malignancy_logit(predictor.model, predictor.model(
            normalise(view(cache.images[i:i + 64]), predictor.meta["mean"], predictor.meta["std"])).float())
            for i in range(0, len(cache.images), 64)]
        logits[name] = torch.cat(parts).numpy().astype(np.float64)
    logits["mean of both"] = (logits["plain"] + logits["mirrored"]) / 2
    patients = [patient_of(Path(p), site) for p in cache.paths]
    gain = patient_bootstrap(y, logits["mean of both"], patients, baseline=logits["plain"])
    return {k: roc_auc(y, v) for k, v in logits.items()}, gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "demo" / "model.pt"))
    ap.add_argument("--trained-on", default="busi,breast-lesions-usg",
                    help="sites the model was trained on (marked in the output)")
    args = ap.parse_args()
    missing = [s for s in SITES if not (DATA / s).is_dir()]
    if missing:
        sys.exit(f"missing data folders under {DATA}: {', '.join(missing)}")
    print("1. crop to the ultrasound field: share of the image area kept")
    for site in SITES:
        shares = kept_area(site)
        print(f"   {site:20} n={len(shares):4d} mean {np.mean(shares):.4f}  min {np.min(shares):.4f}  "
              f"images losing >5 %: {sum(s < 0.95 for s in shares)}")
    predictor = Predictor.from_checkpoint(args.model, "cpu")
    trained = set(args.trained_on.split(","))
    print(f"2. flip test-time augmentation, ROC-AUC malignant vs rest ({args.model})")
    for site in SITES:
        aucs, (lo, hi) = flip_tta(predictor, site)
        mark = " (trained on: flatters)" if site in trained else " (never trained on)"
        print(f"   {site:20}" + "  ".join(f"{k} {v:.3f}" for k, v in aucs.items())
              + f"  gain {aucs['mean of both'] - aucs['plain']:+.3f} ({lo:+.3f} to {hi:+.3f})" + mark)


if __name__ == "__main__":
    main()
