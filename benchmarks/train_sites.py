#!/usr/bin/env python
"""Train on two hospitals and judge on a third; `--loso` does it for each site in turn.

    .venv/bin/python benchmarks/train_sites.py --loso --arch efficientnet_lite0 --weights imagenet \
        --img-size 160 --epochs 12 --ema 0 --label-smoothing 0.1   # the demo recipe (docs/model-quality.md)
    .venv/bin/python benchmarks/train_sites.py --minutes 30        # ResNet18 from scratch, 30 minutes
    .venv/bin/python benchmarks/train_sites.py --minutes 3         # a quick look
    .venv/bin/python benchmarks/train_sites.py --epochs 40         # the same schedule on any machine
    .venv/bin/python benchmarks/train_sites.py --data gpu_data     # a copy of ../shared/data elsewhere

Trains on BUSI (Egypt) + BrEaST-Lesions-USG (Poland) as one three-class ImageFolder
(normal / benign / malignant), with the project's `ml.train.fit` (grouped 80/20 split,
Platt calibration on the validation part, threshold for the target sensitivity), then
prints per site: ROC-AUC (malignant vs rest) with a 95 % bootstrap interval that
resamples patients (BUS-UCLM: the file-name prefix; BrEaST: one image per patient;
BUSI: near-duplicate groups), sensitivity and specificity at the stored threshold, and
ECE (15 bins). BUS-UCLM (Spain) is never trained on. `--held-out SITE` trains on the other
two and judges that one; `--loso` trains once per held-out site (leave-one-site-out). When
BUS-UCLM is trained on, its 38 patients are split whole (`TrainConfig.group_pattern`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import MLError  # noqa: E402
from ml.data import RESIZE_NAMES  # noqa: E402
from ml.ensemble import combine  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import expected_calibration_error, roc_auc, summarise  # noqa: E402
from ml.train import TrainConfig, fit, snapshot_path  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
DATA = HERE.parent / "shared" / "data"
SITES = {"busi": "BUSI (Egypt)", "breast-lesions-usg": "BrEaST-Lesions-USG (Poland)", "bus-uclm": "BUS-UCLM (Spain)"}
CLASSES = ("benign", "malignant", "normal")


def use_data(folder: str | Path) -> None:
    """Read the sites from ``folder`` instead of ../shared/data (e.g. a shrunk copy on another machine)."""
    global DATA
    DATA = Path(folder)


def link_folder(out: Path, files: list[tuple[str, Path, str]]) -> Path:
    """An ImageFolder of symlinks: (site, file, class) -> out/class/site__name."""
    for site, path, cls in files:
        target = out / cls / f"{site}__{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(path.resolve(), target)
    return out


def site_files(site: str) -> list[tuple[str, Path, str]]:
    root = DATA / site
    return [(site, p, cls) for cls in CLASSES for p in sorted((root / cls).glob("*")) if p.is_file()]


# BUS-UCLM's file names start with the patient's four letters: one patient, one side of the split
PATIENT_PATTERN = r"^bus-uclm__([A-Z]{4})_"


def patient_of(path: Path, site: str) -> str:
    name = path.name.split("__", 1)[-1]
    return name[:4] if site == "bus-uclm" else name


def patient_bootstrap(y: np.ndarray, p: np.ndarray, groups: list[str], n_boot: int = 1000, seed: int = 0,
                      baseline: np.ndarray | None = None, metric=roc_auc):
    """95 % percentile interval of ``metric`` (ROC-AUC) resampling whole patients with
    replacement; with ``baseline`` (other scores of the same images), of the paired difference
    metric(p) - metric(baseline)."""
    rng = np.random.default_rng(seed)
    ids = sorted(set(groups))
    members = {g: np.flatnonzero(np.array(groups) == g) for g in ids}
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.choice(ids, len(ids))])
        if 0 < y[idx].sum() < len(idx):
            values.append(metric(y[idx], p[idx]) - (metric(y[idx], baseline[idx]) if baseline is not None else 0.0))
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def judge(predictor: Predictor, folder: Path, site: str, groups: list[str] | None = None) -> dict:
    fp = predict_folder(predictor, folder)
    m = summarise(fp.y, fp.probs, predictor.threshold)
    groups = groups or [patient_of(Path(p), site) for p in fp.paths]
    lo, hi = patient_bootstrap(fp.y, fp.probs, groups)
    return {"n": m["n"], "n_malignant": m["n_positive"], "roc_auc": m["roc_auc"], "ci": [lo, hi],
            "sensitivity": m["sensitivity"], "specificity": m["specificity"],
            "ece": expected_calibration_error(fp.y, fp.probs, 15), "threshold": predictor.threshold,
            "class_accuracy": float(np.mean([t == q for t, q in zip(fp.true_classes, fp.predicted)]))}


def run(train_sites: list[str], test_sites: list[str], args, work: Path) -> dict:
    merged = link_folder(work / "train", [f for s in train_sites for f in site_files(s)])
    out = work / "model.pt"
    masks = None
    if args.masks:  # the training sites' radiologists' masks, linked under the merged names
        masks = work / "masks"
        masks.mkdir()
        for s in train_sites:
            for f in sorted((DATA / "masks" / s).glob("*.png")) if (DATA / "masks" / s).is_dir() else []:
                os.symlink(f.resolve(), masks / f"{s}__{f.name}")
    # --epochs N: a schedule that does not depend on the machine's speed (the learning rate
    # follows the step count); else the clock: as many epochs as --minutes allow
    if args.combine:  # no training: the members' ensemble, judged as a run is
        combined = combine(args.combine, merged, out, threshold_confidence=args.threshold_confidence)
        return judged(combined, ensemble_report(combined["meta"]), train_sites, test_sites, work, out)
    cfg = TrainConfig(data=str(merged), out=str(out), epochs=args.epochs or 10_000, img_size=args.img_size,
                      batch_size=32, seed=args.seed, split_seed=args.split_seed, time_limit_min=None if args.epochs else args.minutes,
                      patience=10_000, threshold_confidence=args.threshold_confidence,
                      snapshot_epochs=tuple(args.snapshots),
                      ema=args.ema, weights=args.weights, arch=args.arch, lr=args.lr,
                      label_smoothing=args.label_smoothing, progress=False, scanner_augment=args.scanner_augment,
                      masks=str(masks) if masks else None, mask_weight=args.mask_weight,
                      mask_margin=args.mask_margin,
                      erase_lesions=args.erase_lesions if masks else 0.0,
                      mixstyle=args.mixstyle, randconv=args.randconv,
                      layer4_stride=args.layer4_stride, aspect_augment=args.aspect_augment,
                      input_norm=args.input_norm,
                      group_pattern=PATIENT_PATTERN if "bus-uclm" in train_sites else None,
                      resize=RESIZE_NAMES[args.resize])
    t0 = time.perf_counter()
    result = fit(cfg)
    minutes = (time.perf_counter() - t0) / 60
    report = {"train_sites": train_sites, "arch": args.arch, "weights": args.weights,
              "scanner_augment": args.scanner_augment,
              "masks": bool(masks), "mask_weight": args.mask_weight if masks else 0.0,
              "mask_margin": args.mask_margin if masks else 0,
              "erase_lesions": args.erase_lesions if masks else 0.0,
              "mixstyle": args.mixstyle, "randconv": args.randconv,
              "layer4_stride": args.layer4_stride, "aspect_augment": args.aspect_augment,
              "input_norm": args.input_norm,
              "resize": RESIZE_NAMES[args.resize], "schedule": f"{args.epochs} epoch(s), fixed" if args.epochs
              else f"as many epochs as {args.minutes:g} min allow", "minutes": round(minutes, 1), "best_epoch": result["best_epoch"],
              "epochs_run": len(result["history"])}
    return judged(result, report, train_sites, test_sites, work, out)


def ensemble_report(meta: dict) -> dict:
    """What a --combine run reports in place of training: its members (from the metadata
    ``ml.ensemble.combine`` wrote)."""
    args = meta.get("args") or {}
    members = meta["ensemble"]["members"]
    return {"train_sites": None, "scanner_augment": bool(args.get("scanner_augment")),
            "masks": bool(args.get("masks")), "mask_weight": args.get("mask_weight", 0.0),
            "mixstyle": args.get("mixstyle", 0.0), "randconv": args.get("randconv", 0.0),
            "layer4_stride": meta.get("layer4_stride"), "aspect_augment": args.get("aspect_augment", 1.0),
            "input_norm": meta.get("input_norm") or "fixed",
            "resize": meta.get("resize"), "minutes": 0.0,
            "schedule": f"ensemble of {len(members)}: " + ", ".join(
                f"seed {m.get('seed')} ({args.get('epochs')} epochs)" for m in members),
            "best_epoch": "/".join(str(m.get("epoch")) for m in members), "epochs_run": 0,
            "members": [f"{m['file']} (sha256 {m['sha256'][:12]})" for m in members]}


def judged(result: dict, report: dict, train_sites: list[str], test_sites: list[str], work: Path, out: Path) -> dict:
    """``report`` plus the model at ``out`` judged site by site: the validation part of each
    training site (``result["val_paths"]``) and every held-out site."""
    predictor = Predictor.from_checkpoint(out, "cpu")
    report = dict(report, train_sites=train_sites, sites={})
    for site in train_sites:
        # the validation part fit() held out, judged site by site (merged path: train/CLASS/SITE__NAME)
        files = [(site, Path(os.readlink(p)), Path(p).parent.name)
                 for p in result["val_paths"] if Path(p).name.startswith(site + "__")]
        part = link_folder(work / f"val-{site}", files)
        report["sites"][f"{site} (validation part)"] = judge(predictor, part, site)
    for site in test_sites:
        report["sites"][f"{site} (never trained on)"] = judge(predictor, DATA / site, site)
    return report


def show(report: dict) -> None:
    extras = [x for x, on in (("scanner augmentation", report["scanner_augment"]),
                              (f"lesion masks (weight {report.get('mask_weight')}, margin {report.get('mask_margin', 0)})",
                               report.get("masks")),
                              (f"lesions erased at p {report.get('erase_lesions')}", report.get("erase_lesions")),
                              (f"MixStyle at p {report.get('mixstyle')}", report.get("mixstyle")),
                              (f"RandConv at p {report.get('randconv')}", report.get("randconv")),
                              ("layer4 stride 1", report.get("layer4_stride") == 1),
                              ("each image standardised", report.get("input_norm") == "image"),
                              ("letterboxed input", report.get("resize") == "letterbox-bilinear"),
                              (f"aspect augmentation {report.get('aspect_augment')}",
                               (report.get("aspect_augment") or 1.0) > 1.0)) if on]
    net = f"{report.get('arch') or 'resnet18'} ({'ImageNet' if report.get('weights') == 'imagenet' else 'random'} start)"
    recipe = f"{' + '.join(report['train_sites'])}, {net}{' with ' + ', '.join(extras) if extras else ''}"
    if report.get("members"):
        print(f"{report['schedule']}, trained on {recipe}; best epochs {report['best_epoch']}")
    else:
        print(f"trained on {recipe}: {report['epochs_run']} epoch(s) in {report['minutes']} min "
              f"(schedule: {report.get('schedule', '?')}), best epoch {report['best_epoch']}")
    print(f"{'site':42} {'n':>4} {'mal':>4} {'ROC-AUC (95% CI, by patient)':>30} {'sens':>6} {'spec':>6} {'ECE':>6} {'class acc':>9}")
    for name, m in report["sites"].items():
        ci = f"{m['roc_auc']:.3f} ({m['ci'][0]:.3f}-{m['ci'][1]:.3f})"
        print(f"{name:42} {m['n']:4d} {m['n_malignant']:4d} {ci:>30} {m['sensitivity']:6.3f} "
              f"{m['specificity']:6.3f} {m['ece']:6.3f} {m['class_accuracy']:9.3f}")


def loso_summary(reports: list[dict]) -> dict:
    """The held-out figures of a leave-one-site-out series: per fold, their mean, and the worst
    fold (lowest ROC-AUC): what the selection rule in docs/model-quality.md reads."""
    folds = {name: m for r in reports for name, m in r["sites"].items() if name.endswith("(never trained on)")}
    keys = ("roc_auc", "sensitivity", "specificity", "ece")
    worst = min(folds, key=lambda n: folds[n]["roc_auc"])
    return {"folds": {n: {k: m[k] for k in keys} for n, m in folds.items()},
            "mean": {k: float(np.mean([m[k] for m in folds.values()])) for k in keys},
            "worst": dict({k: folds[worst][k] for k in keys}, site=worst)}


def show_loso(summary: dict) -> None:
    print("leave-one-site-out, held-out sites:")
    print(f"{'':42} {'ROC-AUC':>8} {'sens':>6} {'spec':>6} {'ECE':>6}")
    rows = list(summary["folds"].items()) + [("mean of the folds", summary["mean"]),
                                              (f"worst fold: {summary['worst']['site']}", summary["worst"])]
    for name, m in rows:
        print(f"{name[:42]:42} {m['roc_auc']:8.3f} {m['sensitivity']:6.3f} {m['specificity']:6.3f} {m['ece']:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="training time per run (wall clock)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train exactly N epochs instead (a schedule that is the same on a fast and a slow machine)")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "efficientnet_lite0"))
    ap.add_argument("--weights", default="none",
                    help="none (random), imagenet (efficientnet_lite0: the installed package, offline) or a PATH")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=None,
                    help="seed of the train/validation split (default: --seed); runs that share it can be ensembled")
    ap.add_argument("--scanner-augment", action="store_true", help="train with ml.augment.scanner_shift")
    ap.add_argument("--masks", action="store_true",
                    help="lesion-attention loss on the training sites' masks (<data>/masks/<site>/)")
    ap.add_argument("--mask-weight", type=float, default=1.0)
    ap.add_argument("--mask-margin", type=int, default=0, choices=range(4),
                    help="cells around the lesion that count as inside (as train --mask-margin)")
    ap.add_argument("--erase-lesions", type=float, default=0.0,
                    help="with --masks: probability of a masked image trained as its lesion-free copy (normal)")
    ap.add_argument("--mixstyle", type=float, default=0.0,
                    help="probability per batch of MixStyle after layer1 and layer2 (as train --mixstyle)")
    ap.add_argument("--randconv", type=float, default=0.0,
                    help="probability per image of a random-filter texture (as train --randconv)")
    ap.add_argument("--aspect-augment", type=float, default=1.0,
                    help="random width/height stretch up to this ratio (1 = off)")
    ap.add_argument("--layer4-stride", type=int, default=2, choices=(1, 2))
    ap.add_argument("--input-norm", default="fixed", choices=("fixed", "image"),
                    help="image: standardise each image to its own mean and spread first (as train --input-norm)")
    ap.add_argument("--resize", default="squash", choices=sorted(RESIZE_NAMES),
                    help="squash each image to the square input, or letterbox it (shape kept; as train --resize)")
    ap.add_argument("--loso", action="store_true", help="leave-one-site-out: one run per held-out site")
    ap.add_argument("--held-out", choices=sorted(SITES),
                    help="train on the other two sites and judge on this one (one leave-one-site-out run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(DATA),
                    help="folder holding the three sites (and masks/) as in ../shared/data (default: %(default)s)")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--keep", help="keep the model(s) in this folder")
    ap.add_argument("--snapshots", type=lambda v: [int(e) for e in v.split(",") if e], default=[],
                    help="also keep the models of these epochs, e.g. 40,60,80 (with --keep: NAME.eEPOCH.pt), "
                         "members of a snapshot ensemble for --combine")
    ap.add_argument("--threshold-confidence", type=float, default=0.0,
                    help="the stored threshold keeps sensitivity 0.90 on new cancers with this probability "
                         "(0, the default: met on the validation part)")
    ap.add_argument("--combine", nargs="+", metavar="MODEL",
                    help="train nothing: judge the ensemble of these checkpoints (trained here with one "
                         "--split-seed), calibrated on their shared validation part")
    args = ap.parse_args()
    use_data(args.data)
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = [s for s in SITES if not (DATA / s).is_dir()]
    if missing:
        sys.exit(f"missing data folders under {DATA}: {', '.join(missing)}")
    # BUS-UCLM first: its fold (trained on BUSI + BrEaST) is the demo model's recipe
    held_out = ["bus-uclm", "busi", "breast-lesions-usg"] if args.loso else [args.held_out or "bus-uclm"]
    plans = [([s for s in SITES if s != held], [held]) for held in held_out]
    reports = []
    for train_sites, test_sites in plans:
        with tempfile.TemporaryDirectory(prefix="sites-") as tmp:
            try:
                report = run(train_sites, test_sites, args, Path(tmp))
            except MLError as exc:   # an option out of range (train's own check), say which
                sys.exit(f"train_sites: {exc}")
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                name = "+".join(train_sites) + ".pt"
                (Path(args.keep) / name).write_bytes((Path(tmp) / "model.pt").read_bytes())
                for epoch in args.snapshots:  # a snapshot ensemble's members, named by epoch
                    if snapshot_path(Path(tmp) / "model.pt", epoch).is_file():
                        shutil.copyfile(snapshot_path(Path(tmp) / "model.pt", epoch),
                                        snapshot_path(Path(args.keep) / name, epoch))
        show(report)
        reports.append(report)
    if len(reports) > 1:
        summary = loso_summary(reports)
        show_loso(summary)
        reports.append({"loso": summary})
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
