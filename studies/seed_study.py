#!/usr/bin/env python
"""How much of a recipe's figure is the seed, and what an ensemble of seeds would score.

Question: what does a recipe give on a site it never saw over many seeds, rather than one run?
Answer (2026-11-27, 14 GPU seeds): the 128-px demo recipe 0.770 +- 0.016 on BUS-UCLM (the
demo run's 0.801 was above all 14); MixStyle -0.021; two members +0.008; 80 epochs +0.020.
docs/studies/2026-11-27-many-seeds-gpu.md (also used by 2026-11-27-input-size.md,
2026-11-27-randconv-and-80-epochs.md and 2026-11-27-two-network-ensemble.md).

Two steps, so that the models can be trained and scored on one machine (a GPU machine,
say, where many seeds fit in minutes) and the figures computed on another
(``studies/seed_study_gpu.sh`` is the run behind the many-seeds note's table):

    # 0. (to train elsewhere) a copy of the sites at 256 px that travels: ~26 MB
    .venv/bin/python studies/seed_study.py shrink --out gpu_data
    # 1. score checkpoints (e.g. from benchmarks/train_sites.py --keep runs/NAME) on one site
    .venv/bin/python studies/seed_study.py scores runs/*/busi+breast-lesions-usg.pt \\
        --site bus-uclm --out scores.npz [--data DIR] [--device cuda]
    # 2. per model and per recipe: ROC-AUC, sens/spec, ECE, pointing game; ensembles
    .venv/bin/python studies/seed_study.py report scores.npz [--data ../shared/data]

``scores`` stores, per model, the calibrated malignancy probability of every image of the
site and the raw layer4 Grad-CAM and Grad-CAM++ grids (before upsampling: 8 x 8 for a
stride-1 layer4 at 128 px), so the file stays small. A model is named by the folder it
lies in; ``RECIPE-sSEED`` names (``A-s3``) group the models into recipes.

``report`` prints each model, then per recipe the mean single model, the spread, and
ensembles of two and of all members: mean calibrated log-odds for the probability, mean
of the members' [0, 1] maps for the heatmap (what a product ensemble would show). ROC-AUC
intervals resample patients (train_sites.patient_bootstrap). The pointing game uses the
radiologists' masks at the images' original size, under ``--data``/masks/SITE.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# benchmarks/ on the path, so that `import train_sites` is the same module that the
# benchmarks themselves import (its use_data() sets the data folder for all of them).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_sites  # noqa: E402
from localisation import hit_and_mass  # noqa: E402
from compare_models import log_odds, sigmoid  # noqa: E402
from ml import MLError  # noqa: E402
from ml import explain as explain_module  # noqa: E402
from ml.data import normalise  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import expected_calibration_error, roc_auc, summarise  # noqa: E402
from train_sites import SITES, patient_bootstrap, patient_of  # noqa: E402

METHODS = ("gradcam", "gradcam++")


def raw_grids(predictor: Predictor, images: torch.Tensor, method: str, batch: int = 64) -> np.ndarray:
    """ReLU(sum_c w_c A_c) at layer4's own grid, before upsampling and scaling: what
    ``ml.explain.explain`` computes through ``cam_grid``, captured on its way to the product's
    scaling (explain() returns only the scaled maps)."""
    grids = []
    original = explain_module.cam_grid

    def capture(weights, activations):
        grid = original(weights, activations)
        grids.append(grid.cpu())
        return grid

    explain_module.cam_grid = capture
    try:
        for start in range(0, len(images), batch):
            x = normalise(images[start:start + batch].to(predictor.device), predictor.meta["mean"], predictor.meta["std"])
            explain_module.explain(predictor.model, x, method, "layer4")
    finally:
        explain_module.cam_grid = original
    return torch.cat(grids).numpy().astype(np.float32)


def name_of(path: str) -> str:
    return Path(path).parent.name


def cmd_scores(args) -> None:
    train_sites.use_data(args.data)
    out: dict[str, np.ndarray] = {}
    for i, model in enumerate(args.models):
        predictor = Predictor.from_checkpoint(model, args.device)
        fp = predict_folder(predictor, train_sites.DATA / args.site)
        rel = np.array([f"{Path(p).parent.name}/{Path(p).name}" for p in fp.paths])
        if "paths" in out and not np.array_equal(out["paths"], rel):
            sys.exit(f"{model} read other images than the first model")
        out["paths"], out["y"] = rel, fp.y
        out[f"name_{i}"] = np.array(name_of(model))
        out[f"p_{i}"] = fp.probs
        out[f"threshold_{i}"] = np.array(predictor.threshold)
        out[f"resize_{i}"] = np.array(predictor.resize)
        out[f"input_size_{i}"] = np.array(predictor.input_size)
        for method in METHODS:
            out[f"{method}_{i}"] = raw_grids(predictor, fp.images, method)
        print(f"{name_of(model)}: ROC-AUC {roc_auc(fp.y, fp.probs):.3f} on {len(fp.y)} images", flush=True)
    out["site"] = np.array(args.site)
    np.savez_compressed(args.out, **out)


# ---------------------------------------------------------------- report

def recipe_and_seed(name: str) -> tuple[str, int | None]:
    """``A40-s3`` -> ("A40", 3); a name without ``-sSEED`` is a recipe of its own, seed None."""
    found = re.search(r"^(.*)-s(\d+)$", name)
    return (found.group(1), int(found.group(2))) if found else (name, None)


def load(files: list[str]) -> dict:
    """Merge score files of the same site and images into one list of models."""
    models, paths, y, site = [], None, None, None
    for f in files:
        z = np.load(f)
        if paths is not None and not np.array_equal(z["paths"], paths):
            sys.exit(f"{f} scored other images than {files[0]}")
        paths, y, site = z["paths"], z["y"], str(z["site"])
        i = 0
        while f"p_{i}" in z:
            if str(z[f"name_{i}"]) in {m["name"] for m in models}:  # the same model scored twice
                i += 1
                continue
            models.append({"name": str(z[f"name_{i}"]), "p": z[f"p_{i}"], "threshold": float(z[f"threshold_{i}"]),
                           "resize": str(z[f"resize_{i}"]),
                           "input_size": int(z[f"input_size_{i}"]), **{m: z[f"{m}_{i}"] for m in METHODS}})
            i += 1
    models.sort(key=lambda m: (recipe_and_seed(m["name"])[0], recipe_and_seed(m["name"])[1] or -1))
    return {"models": models, "paths": list(paths), "y": y, "site": site}


def scaled_maps(grids: np.ndarray, size: int) -> torch.Tensor:
    """The product's heatmap from raw grids: bilinear to the input size, then [0, 1] per image."""
    return explain_module.scale_cam(torch.from_numpy(grids), (size, size))


def pointing(maps: torch.Tensor, masks: list[np.ndarray], resize: str) -> float:
    return float(np.mean([hit_and_mass(hm, mask, resize)[0] for hm, mask in zip(maps.numpy(), masks)]))


def shortcut_check(s: dict, single: dict, labels: Path) -> None:
    """Where the site's labels.csv flags burned-in marks and Doppler boxes (BUS-UCLM): ROC-AUC
    on the images without either, and between lesions only (benign against malignant)."""
    import csv

    if not labels.is_file():
        return
    rows = {Path(r["file"]).stem: r for r in csv.DictReader(labels.open(newline=""))}
    stems = [Path(p).stem for p in s["paths"]]
    if not all(k in rows and "marks" in rows[k] and "doppler" in rows[k] for k in stems):
        return
    flagged = np.array([rows[k]["marks"].startswith("Y") or rows[k]["doppler"].startswith("Y") for k in stems])
    lesion = np.array([not p.startswith("normal/") for p in s["paths"]])
    y = s["y"]
    print(f"\nShortcut check ({labels}): ROC-AUC on the {int((~flagged).sum())} images without calipers or "
          f"Doppler ({int(y[~flagged].sum())} malignant), on the {int(flagged.sum())} with them, and benign "
          f"against malignant lesions only")
    print(f"  {'model':26} {'all':>6} {'clean':>6} {'marked':>6} {'lesions':>7}")
    for name, f in single.items():
        p = f["p"]
        print(f"  {name:26} {f['auc']:6.3f} {roc_auc(y[~flagged], p[~flagged]):6.3f} "
              f"{roc_auc(y[flagged], p[flagged]):6.3f} {roc_auc(y[lesion], p[lesion]):7.3f}")


def cmd_report(args) -> None:
    from PIL import Image

    s = load(args.files)
    y, site, models = s["y"], s["site"], s["models"]
    groups = [patient_of(Path(p), site) for p in s["paths"]]
    mask_dir = Path(args.data) / "masks" / site
    # masks are PNGs named as the image (the scored copy may be a shrunk JPEG of the same stem)
    lesion = [i for i, p in enumerate(s["paths"])
              if p.startswith("malignant/") and (mask_dir / f"{Path(p).stem}.png").exists()]
    masks = [np.asarray(Image.open(mask_dir / f"{Path(s['paths'][i]).stem}.png").convert("L")) > 127 for i in lesion]

    def maps_of(members: list[dict], method: str) -> torch.Tensor:
        return torch.stack([scaled_maps(m[method][lesion], m["input_size"]) for m in members]).mean(0)

    def figures(members: list[dict]) -> dict:
        p = sigmoid(np.mean([log_odds(m["p"]) for m in members], axis=0))
        threshold = float(sigmoid(np.mean([log_odds(np.array(m["threshold"])) for m in members])))
        summary = summarise(y, p, threshold)
        out = {"auc": roc_auc(y, p), "sens": summary["sensitivity"], "spec": summary["specificity"],
               "ece": expected_calibration_error(y, p, 15), "p": p}
        for method in METHODS if masks else ():
            out[method] = pointing(maps_of(members, method), masks, members[0]["resize"])
        return out

    print(f"{SITES.get(site, site)}: {len(y)} images ({int(y.sum())} malignant) of {len(set(groups))} patients; "
          f"pointing game on {len(lesion)} malignant images with masks")
    head = f"  {'model':26} {'ROC-AUC (95% CI)':>21}  {'sens / spec':>13}  {'ECE':>5}  {'GC':>5} {'GC++':>5}"
    print(head)
    single = {}
    for m in models:
        f = single[m["name"]] = figures([m])
        lo, hi = patient_bootstrap(y, f["p"], groups, n_boot=args.boot)
        print(f"  {m['name']:26} {f['auc']:.3f} ({lo:.3f}-{hi:.3f})  {f['sens']:.3f} / {f['spec']:.3f}  "
              f"{f['ece']:.3f}  {f.get('gradcam', float('nan')):5.2f} {f.get('gradcam++', float('nan')):5.2f}")
    shortcut_check(s, single, Path(args.data) / site / "labels.csv")
    recipes: dict[str, list[dict]] = {}
    for m in models:
        recipes.setdefault(recipe_and_seed(m["name"])[0], []).append(m)
    print("\nPer recipe: single models (mean, min-max), ensembles of two (every pair: mean), of all members")
    for recipe, members in recipes.items():
        aucs = [single[m["name"]]["auc"] for m in members]
        keys = ("auc", "sens", "spec", "ece", *(METHODS if masks else ()))
        mean_single = {k: np.mean([single[m["name"]][k] for m in members]) for k in keys}
        print(f"  {recipe} ({len(members)} seeds): single ROC-AUC mean {np.mean(aucs):.3f}, "
              f"sd {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f}, range {min(aucs):.3f}-{max(aucs):.3f}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in mean_single.items() if k != "auc"))
        if len(members) < 2:
            continue
        pairs = [figures(list(pair)) for pair in itertools.combinations(members, 2)]
        gains = [f["auc"] - np.mean([single[a["name"]]["auc"], single[b["name"]]["auc"]])
                 for f, (a, b) in zip(pairs, itertools.combinations(members, 2))]
        print(f"    ensembles of 2 ({len(pairs)} pairs): ROC-AUC mean {np.mean([f['auc'] for f in pairs]):.3f} "
              f"(range {min(f['auc'] for f in pairs):.3f}-{max(f['auc'] for f in pairs):.3f}; "
              f"gain over the pair's mean single {np.mean(gains):+.3f}, positive in {sum(g > 0 for g in gains)}/"
              f"{len(gains)}); " + ", ".join(f"{k} {np.mean([f[k] for f in pairs]):.3f}" for k in keys if k != "auc"))
        f = figures(members)
        lo, hi = patient_bootstrap(y, f["p"], groups, n_boot=args.boot)
        print(f"    ensemble of all {len(members)}: ROC-AUC {f['auc']:.3f} ({lo:.3f}-{hi:.3f}); "
              + ", ".join(f"{k} {f[k]:.3f}" for k in keys if k != "auc"))
    names = list(recipes)
    for a, b in itertools.combinations(names, 2):
        seeds_a, seeds_b = ({recipe_and_seed(m["name"])[1]: m for m in recipes[r]} for r in (a, b))
        common = sorted(set(seeds_a) & set(seeds_b) - {None})
        if not common:
            continue
        diffs = [single[seeds_b[k]["name"]]["auc"] - single[seeds_a[k]["name"]]["auc"] for k in common]
        print(f"  {b} against {a}, same seeds ({len(common)}): ROC-AUC {np.mean(diffs):+.3f} on average, "
              f"better in {sum(d > 0 for d in diffs)}/{len(diffs)} ({', '.join(f'{d:+.3f}' for d in diffs)})")


def cmd_shrink(args) -> None:
    """A copy of the three sites with every image at most ``--size`` px a side (JPEG) and the
    training sites' masks resized to match: small enough to carry to another machine."""
    from PIL import Image

    src, dst = Path(args.data), Path(args.out)
    count = 0
    for site in SITES:
        for cls in train_sites.CLASSES:
            for path in sorted((src / site / cls).glob("*")):
                if not path.is_file():
                    continue
                image = Image.open(path).convert("RGB")
                image.thumbnail((args.size, args.size), Image.BILINEAR)
                out = dst / site / cls / f"{path.stem}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out, quality=90)
                count += 1
        for mask in sorted((src / "masks" / site).glob("*.png")):
            image = next((dst / site).glob(f"*/{mask.stem}.jpg"), None)
            if image is not None:
                out = dst / "masks" / site / mask.name
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(mask).convert("L").resize(Image.open(image).size, Image.NEAREST).save(out)
    print(f"{count} images under {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scores", help="score checkpoints on one site into an .npz")
    sc.add_argument("models", nargs="+")
    sc.add_argument("--site", default="bus-uclm", choices=sorted(SITES))
    sc.add_argument("--data", default=str(train_sites.DATA))
    sc.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    sc.add_argument("--out", required=True)
    rp = sub.add_parser("report", help="figures from one or more score files")
    rp.add_argument("files", nargs="+")
    rp.add_argument("--data", default=str(train_sites.DATA), help="for the masks (default: %(default)s)")
    rp.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    sh = sub.add_parser("shrink", help="a small copy of the sites to carry to another machine")
    sh.add_argument("--data", default=str(train_sites.DATA))
    sh.add_argument("--size", type=int, default=256)
    sh.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"scores": cmd_scores, "report": cmd_report, "shrink": cmd_shrink}[args.command](args)
    except (MLError, OSError) as exc:  # a missing checkpoint, data folder or score file: say which
        sys.exit(f"seed_study: {exc}")


if __name__ == "__main__":
    main()
