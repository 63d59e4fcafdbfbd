#!/usr/bin/env python
"""Does re-estimating a model's batch-normalisation statistics on a new site's images (no
labels) rank that site's next cases better?

Question: does AdaBN (`manage.py recalibrate --adapt-bn`) help a site with no reviewed cases,
and does re-estimating only the first stages protect a strong model?
Answer (2026-11-28): on weak held-out models yes (BUSI +0.071, BrEaST +0.034), on the demo model
at BUS-UCLM no (-0.023; half weight +0.003); first stages only do not help, so the product
re-estimates every layer. docs/studies/2026-11-28-site-batchnorm.md

    .venv/bin/python studies/site_batchnorm.py demo/model.pt                      # BUS-UCLM
    .venv/bin/python studies/site_batchnorm.py loso/busi+bus-uclm.pt --site breast-lesions-usg
    .venv/bin/python studies/site_batchnorm.py MODEL --site busi --weights 1,0.5 --images 50
    .venv/bin/python studies/site_batchnorm.py MODEL --site busi --stages all,1,2   # first stages only

For each --seeds split, the site is split by patient (benchmarks/site_adaptation.py) into a
pool (the site's uploads so far) and a test part (its next cases). The statistics are
re-estimated on the pool's images, all or the first --images of them, with
ml.adapt.adapt_batchnorm (what `manage.py recalibrate --adapt-bn` runs), and the test part is
judged: ROC-AUC (malignant vs rest) of the model as it was and as adapted, and their paired
difference with a 95 % interval that resamples patients. ROC-AUC does not depend on the
calibration, which `recalibrate` refits on the reviewed cases afterwards. A last line adapts
on the whole site and judges all of it (every image's statistics known in advance: an upper
bound for a site with many uploads).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.adapt import adapt_batchnorm, site_batches  # noqa: E402
from ml.data import cache_images, positive_names, scan_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import roc_auc  # noqa: E402
from ml.model import model_malignancy_logit  # noqa: E402
from ml.train import model_outputs  # noqa: E402

from benchmarks.site_adaptation import split_by_patient  # noqa: E402
from benchmarks.train_sites import SITES, link_folder, patient_bootstrap, patient_of, site_files  # noqa: E402


def cached(predictor: Predictor, folder: Path):
    index = scan_folder(folder, positive_names(predictor.meta.get("positive_classes")))
    return cache_images(index, predictor.input_size, resize=predictor.resize)


def logits(model: torch.nn.Module, predictor: Predictor, images: torch.Tensor) -> np.ndarray:
    out = model_outputs(model, images, 64, predictor.device, predictor.meta["mean"], predictor.meta["std"])
    return model_malignancy_logit(model, out).double().numpy()


def compare(predictor: Predictor, adapt_on: torch.Tensor, test, site: str, weight: float,
            stages: int | None = None) -> dict:
    """Base and adapted ROC-AUC on ``test`` and their paired difference with its interval."""
    y = test.targets.numpy().astype(int)
    groups = [patient_of(Path(p), site) for p in test.paths]
    base = logits(predictor.model, predictor, test.images)
    model = copy.deepcopy(predictor.model)
    adapt_batchnorm(model, site_batches(predictor, adapt_on), weight, stages)
    adapted = logits(model, predictor, test.images)
    lo, hi = patient_bootstrap(y, adapted, groups, baseline=base)
    return {"base": roc_auc(y, base), "adapted": roc_auc(y, adapted), "ci": (lo, hi), "n": len(y),
            "n_malignant": int(y.sum()), "images": len(adapt_on)}


def line(label, weight: float, stages: int | None, r: dict) -> str:
    return (f"{label:>8} {weight:6.2f} {'all' if stages is None else stages:>6} {r['images']:6d} {r['n']:6d} "
            f"({r['n_malignant']:3d}) {r['base']:15.3f} {r['adapted']:6.3f}  {r['adapted'] - r['base']:+.3f} "
            f"({r['ci'][0]:+.3f} to {r['ci'][1]:+.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--site", default="bus-uclm", choices=list(SITES))
    ap.add_argument("--seeds", default="0,1,2", help="patient splits of the site into pool and test part")
    ap.add_argument("--weights", default="1", help="weight of the site's statistics (1: only the site's)")
    ap.add_argument("--stages", default="all",
                    help="which layers to re-estimate: all, or k for the stem and layer1..layerk (e.g. all,1,2)")
    ap.add_argument("--images", type=int, default=None, help="adapt on the first N pool images only (default: all)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor.from_checkpoint(args.model, "cpu")
    stages = args.stages.split(",")
    if any(k != "all" and not (k.isdigit() and 0 <= int(k) <= 4) for k in stages):
        ap.error(f"--stages takes 'all' or a stage 0-4, comma-separated, not {args.stages!r}")
    variants = [(float(w), None if k == "all" else int(k)) for w in args.weights.split(",") for k in stages]
    print(f"{args.model} on {args.site}: batch-normalisation statistics re-estimated on the site's images")
    print(f"{'split':>8} {'weight':>6} {'stages':>6} {'images':>6} {'test n (mal)':>13} {'ROC-AUC before':>15} {'after':>6}  "
          f"paired difference (95 % CI by patient)")
    diffs = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="site-bn-") as tmp:
        work = Path(tmp)
        for seed in (int(s) for s in args.seeds.split(",")):
            pool, test = split_by_patient(args.site, seed)
            pool = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))][:args.images]
            pool_c = cached(predictor, link_folder(work / f"pool-{seed}", pool))
            test_c = cached(predictor, link_folder(work / f"test-{seed}", test))
            for w, k in variants:
                r = compare(predictor, pool_c.images, test_c, args.site, w, k)
                diffs[w, k].append(r["adapted"] - r["base"])
                print(line(seed, w, k, r), flush=True)
        whole = cached(predictor, link_folder(work / "whole", site_files(args.site)))
        for w, k in variants:
            r = compare(predictor, whole.images, whole, args.site, w, k)
            print(line("whole", w, k, r), flush=True)
    for (w, k), d in diffs.items():
        print(f"mean difference over the splits, weight {w:.2f}, stages {'all' if k is None else k}: {np.mean(d):+.3f}")


if __name__ == "__main__":
    main()
