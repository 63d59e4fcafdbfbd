#!/usr/bin/env python
"""Do the heatmaps point at the lesion? `python benchmarks/localisation.py [--limit N]`.

For a checkpoint (default demo/model.pt) and each explanation (method x layer, e.g.
``gradcam@layer3``), on every benign and malignant image of the sites under --data that
have radiologists' lesion masks in <data>/masks/<site>/ (a site whose folder is absent is
skipped), measured at the image's original size after the worker's own resize:

* pointing game: share of images whose heatmap maximum lies inside the lesion (chance: the
  lesion's share of the image area);
* mass inside: share of the heatmap's total mass inside the lesion, against the lesion's
  share of the area (the ratio is 1 for a uniform map or a blind guess);
* cost: ms per image of the explanation against prediction alone, timed on the same
  batches, round-robin.

It also asks the model itself, without any heatmap, whether it uses the lesion: the drop in
p(cancer) when the lesion is replaced by the image's mean colour, against the drop when a
region of the same area elsewhere is replaced (the lesion mask shifted away from the lesion).
When the lesion matters no more than tissue elsewhere, no rendering can make a map point at
it, and the script says so.

``--warnings`` adds the distributions of the two warnings (faithfulness, border share) over
all images of the sites (normal ones too) for the worker's explanation, and the share of
cases each warning level flags. Score-CAM costs 512 forwards per image at layer4 (256 at
layer3): use ``--limit`` and ``--methods``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ml.data import load_image  # noqa: E402
from ml.explain import border_share, deletion_test, explain  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.render import resize_heatmap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITES = ("breast-lesions-usg", "bus-uclm")
LESION_CLASSES = ("malignant", "benign")


@dataclass
class Case:
    site: str
    cls: str
    path: Path
    mask: np.ndarray  # bool, original image size


def lesion_cases(data: Path, site: str, limit: int | None) -> list[Case]:
    """Benign and malignant images of ``site`` that have a mask; ``limit`` per site, spread
    evenly over the sorted file names and shared between the classes."""
    folder, masks = data / site, data / "masks" / site
    if not folder.is_dir() or not masks.is_dir():
        print(f"  {site}: no images or masks under {data}: skipped")
        return []
    cases = []
    for cls in LESION_CLASSES:
        files = sorted(p for p in (folder / cls).glob("*.png") if (masks / p.name).exists())
        if limit is not None:
            share = max(1, limit // len(LESION_CLASSES))
            files = files[::max(1, len(files) // share)][:share]
        for path in files:
            mask = np.asarray(Image.open(masks / path.name).convert("L")) > 127
            cases.append(Case(site, cls, path, mask))
    return cases


def parse_variant(text: str) -> tuple[str, str | None]:
    method, _, layer = text.partition("@")
    return method, (layer or None)


def shifted_mask(mask: np.ndarray) -> np.ndarray:
    """The lesion mask moved half the image away (wrapping round), so it covers the same area
    of other tissue; where that still overlaps the lesion, the overlap is dropped."""
    h, w = mask.shape
    moved = np.roll(mask, (h // 2, w // 2), axis=(0, 1))
    return moved & ~mask


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def occlusion_drops(predictor: Predictor, cases: list[Case]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p(cancer), and the drop of its log-odds with the lesion removed and with the same area
    elsewhere removed (log-odds: the model's p(cancer) is often ~0.001 on other sites, where
    probability drops are all tiny)."""
    base, lesion, elsewhere = [], [], []
    for start in range(0, len(cases), 16):
        chunk = cases[start:start + 16]
        originals = [np.asarray(load_image(c.path), dtype=np.float32) for c in chunk]
        variants = []
        for arr, c in zip(originals, chunk):
            fill = arr.mean(axis=(0, 1))
            for m in (None, c.mask, shifted_mask(c.mask)):
                out = arr.copy()
                if m is not None:
                    out[m] = fill
                variants.append(Image.fromarray(np.round(out).astype(np.uint8)))
        probs = predictor.probabilities(predictor.to_batch(variants)).cpu().numpy().reshape(-1, 3)
        odds = _log_odds(probs)
        base.extend(probs[:, 0])
        lesion.extend(odds[:, 0] - odds[:, 1])
        elsewhere.extend(odds[:, 0] - odds[:, 2])
    return np.array(base), np.array(lesion), np.array(elsewhere)


def hit_and_mass(heatmap: np.ndarray, mask: np.ndarray, resize: str) -> tuple[bool, float]:
    """The heatmap at the mask's (the image's) size: is its maximum inside the lesion (pointing
    game), and what share of its mass lies there."""
    full = resize_heatmap(heatmap, mask.shape[::-1], resize).astype(np.float64)
    total = full.sum()
    return bool(total > 0 and mask.flat[int(np.argmax(full))]), float(full[mask].sum() / total) if total > 0 else 0.0


def localise(predictor: Predictor, cases: list[Case], variant: str, batch: int,
             scorecam_batch: int) -> dict[str, np.ndarray]:
    """Per image: pointing-game hit, mass inside, lesion area share; plus ms/img timings."""
    method, layer = parse_variant(variant)
    model = predictor.model
    hits, mass, area, t_explain, t_predict = [], [], [], [], []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        x = predictor.to_batch([c.path for c in chunk])
        t0 = time.perf_counter()
        with torch.inference_mode():
            torch.sigmoid(model(x).float().flatten())
        t1 = time.perf_counter()
        _, maps = explain(model, x, method, layer, scorecam_batch_size=scorecam_batch)
        t2 = time.perf_counter()
        t_predict.append((t1 - t0) * 1e3 / len(chunk))
        t_explain.append((t2 - t1) * 1e3 / len(chunk))
        for c, hm in zip(chunk, maps.cpu().numpy()):
            hit, inside = hit_and_mass(hm, c.mask, predictor.resize)
            hits.append(hit)
            mass.append(inside)
            area.append(c.mask.mean())
    return {"hit": np.array(hits, dtype=float), "mass": np.array(mass), "area": np.array(area),
            "ms_explain": np.array(t_explain), "ms_predict": np.array(t_predict)}


def report_localisation(cases: list[Case], results: dict[str, dict[str, np.ndarray]]) -> None:
    groups = sorted({(c.site, c.cls) for c in cases}, key=lambda g: (g[0], LESION_CLASSES.index(g[1])))
    print("\nLocalisation (pointing game = heatmap maximum inside the lesion; mass = share of heatmap "
          "mass inside; area = lesion share of the image; ratio = mass / area, 1 = no better than chance)")
    print("  (chance for the pointing game is the lesion's area share)")
    print(f"  {'explanation':<24} {'site':<19} {'class':<9} {'n':>4} {'pointing':>8} "
          f"{'mass':>6} {'area':>6} {'ratio':>6}")
    for variant, r in results.items():
        for site, cls in groups:
            sel = np.array([c.site == site and c.cls == cls for c in cases])
            m, a = r["mass"][sel].mean(), r["area"][sel].mean()
            print(f"  {variant:<24} {site:<19} {cls:<9} {sel.sum():>4} {r['hit'][sel].mean():>8.2f} "
                  f"{m:>6.3f} {a:>6.3f} {m / a:>6.2f}")
    print("\nCost (median ms per image over the batches above, same batches, explanation run right after "
          "prediction alone)")
    for variant, r in results.items():
        pred, expl = np.median(r["ms_predict"]), np.median(r["ms_explain"])
        print(f"  {variant:<24} prediction alone {pred:8.1f} ms/img, prediction + explanation "
              f"{expl:9.1f} ms/img: {expl / pred:7.2f}x")


def report_model(predictor: Predictor, cases: list[Case], results: dict[str, dict[str, np.ndarray]]) -> None:
    """Does the model use the lesion at all? Plain words, whatever the maps say."""
    base, lesion, elsewhere = occlusion_drops(predictor, cases)
    print("\nDoes the model itself look at the lesion? (occlusion, no heatmap involved: drop of the "
          "cancer log-odds when the lesion is replaced by the image's mean colour, against the same "
          "area elsewhere)")
    for site in sorted({c.site for c in cases}):
        for cls in LESION_CLASSES:
            sel = np.array([c.site == site and c.cls == cls for c in cases])
            if not sel.any():
                continue
            flagged = (base[sel] >= predictor.threshold).mean()
            print(f"  {site:<19} {cls:<9} n={sel.sum():<4} median p(cancer) {np.median(base[sel]):.3f} "
                  f"(flagged cancer at the threshold {predictor.threshold:.3f}: {flagged:.0%}); "
                  f"mean log-odds drop, lesion hidden {lesion[sel].mean():+.2f}, elsewhere hidden {elsewhere[sel].mean():+.2f}; "
                  f"lesion matters more in {(lesion[sel] > elsewhere[sel]).mean():.0%}")
    malignant = np.array([c.cls == "malignant" for c in cases])
    if not malignant.any():
        return
    # per image: the model "uses the lesion" when hiding it lowers the cancer log-odds by
    # more than hiding the same area of other tissue does
    uses = lesion > elsewhere
    wrong = 1 - uses[malignant].mean()
    best_variant, best = max(((v, r["hit"][malignant].mean()) for v, r in results.items()),
                             key=lambda t: t[1], default=(None, 0.0))
    chance = np.mean([c.mask.mean() for c, m in zip(cases, malignant) if m])
    print(f"\nVerdict on {malignant.sum()} malignant lesions:")
    if wrong >= 0.2:
        print(f"  THE MODEL ITSELF LOOKS AT THE WRONG PLACE in {wrong:.0%} of them: hiding the lesion "
              f"lowers the cancer log-odds no more than hiding the same area of other tissue (mean drop "
              f"{lesion[malignant].mean():+.2f} for the lesion, {elsewhere[malignant].mean():+.2f} elsewhere). "
              f"No heatmap method or rendering can point at a lesion the model does not use there; the fix "
              f"is the model (more sites, lesion supervision), not the map.")
    else:
        print(f"  the model uses the lesion in {1 - wrong:.0%} of them (mean log-odds drop "
              f"{lesion[malignant].mean():+.2f} for the lesion, {elsewhere[malignant].mean():+.2f} elsewhere).")
    for variant, r in results.items():
        hit = r["hit"][malignant]
        on_used = hit[uses[malignant]].mean() if uses[malignant].any() else float("nan")
        print(f"  {variant:<24} pointing game {hit.mean():.2f} on all, {on_used:.2f} where the model "
              f"uses the lesion ({uses[malignant].sum()} images); chance {chance:.2f}, target 0.80")
    if best_variant is not None:
        verdict = "points at the lesion" if best >= 0.8 else "does NOT point at the lesion reliably"
        print(f"  best: {best_variant} {best:.2f}: the heatmap {verdict}.")


def report_warnings(predictor: Predictor, data: Path, sites: list[str], variant: str, limit: int | None,
                    faithfulness_at: float, border_at: float) -> None:
    """Distributions of the faithfulness score and the border share over all images of the
    sites (any class), with the worker's settings, and the share each warning level flags."""
    method, layer = parse_variant(variant)
    paths = []
    for site in sites:
        for cls in ("malignant", "benign", "normal"):
            files = sorted((data / site / cls).glob("*.png"))
            if limit is not None:
                files = files[::max(1, len(files) // max(1, limit // 3))][:max(1, limit // 3)]
            paths.extend(files)
    if not paths:
        return
    faith, border, positive = [], [], []
    for start in range(0, len(paths), 16):
        chunk = paths[start:start + 16]
        x = predictor.to_batch(chunk)
        probs, maps = explain(predictor.model, x, method, layer)
        positive.extend((probs >= predictor.threshold).tolist())
        for test in deletion_test(predictor.model, x, maps, probs):
            faith.append(np.nan if test is None else test.score)
        for path, hm in zip(chunk, maps.cpu().numpy()):
            with Image.open(path) as im:
                border.append(border_share(resize_heatmap(hm, im.size, predictor.resize)))
    faith, border, positive = np.array(faith), np.array(border), np.array(positive)
    measured = faith[~np.isnan(faith)]
    measured_positive = faith[~np.isnan(faith) & positive]
    q = [5, 10, 25, 50, 75, 90, 95]
    print(f"\nWarning levels ({variant}, {len(paths)} images of {', '.join(sites)}, every class)")
    print(f"  faithfulness percentiles {q}: " + " ".join(f"{v:+.4f}" for v in np.percentile(measured, q))
          + f"  (not measured, empty map: {np.isnan(faith).sum()})")
    print(f"  border share percentiles {q}: " + " ".join(f"{v:.3f}" for v in np.percentile(border, q)))
    print("  share flagged at other levels (all / labelled cancer):")
    print("    faithfulness <= " + ", ".join(
        f"{lv:+.3f}: {(measured <= lv).mean():.0%} / {(measured_positive <= lv).mean():.0%}"
        for lv in (0.0, -0.005, -0.01, -0.02, -0.05, -0.1)))
    print("    border share > " + ", ".join(
        f"{lv:.2f}: {(border > lv).mean():.0%} / {(border[positive] > lv).mean():.0%}"
        for lv in (0.5, 0.55, 0.6, 0.65)))
    print(f"  faithfulness <= {faithfulness_at:+.4f} flags {(measured <= faithfulness_at).mean():.1%} of all, "
          f"{(measured_positive <= faithfulness_at).mean():.1%} of the {positive.sum()} labelled cancer; "
          f"border share > {border_at:.2f} flags {(border > border_at).mean():.1%} of all, "
          f"{(border[positive] > border_at).mean():.1%} of those labelled cancer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "model.pt"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                        help="folder holding the site folders and masks/ (default ../shared/data)")
    parser.add_argument("--sites", nargs="+", default=list(SITES))
    parser.add_argument("--methods", nargs="+",
                        default=["gradcam@layer4", "gradcam++@layer4", "gradcam@layer3", "gradcam++@layer3",
                                 "gradcam@layer2", "gradcam@layer3+layer4", "gradcam@layer2+layer3",
                                 "scorecam@layer4", "scorecam@layer3"],
                        help="METHOD[@LAYER]: gradcam, gradcam++, scorecam; layer4 (4x4 grid at 128 px), "
                             "layer3 (8x8), layer2 (16x16), layer3+layer4 (fusion)")
    parser.add_argument("--limit", type=int, default=None, help="images per site (spread over the site)")
    parser.add_argument("--scorecam-limit", type=int, default=12,
                        help="images per site for Score-CAM variants (hundreds of forwards each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scorecam-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-localisation", dest="localisation", action="store_false",
                        help="skip the localisation part (with --warnings: the warning levels only)")
    parser.add_argument("--warnings", action="store_true",
                        help="also measure the faithfulness and border-share distributions")
    parser.add_argument("--warnings-variant", default=None,
                        help="METHOD@LAYER to judge (default: the worker's EXPLAIN_METHOD@EXPLAIN_LAYER from the app's config)")
    parser.add_argument("--faithfulness-at", type=float, default=None,
                        help="level to report the flagged share for (default: the app's config)")
    parser.add_argument("--border-at", type=float, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    predictor = Predictor.from_checkpoint(args.model, device="cpu")
    print(f"{args.model}: {predictor.input_size} px, threshold {predictor.threshold:.4f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = [c for site in args.sites for c in lesion_cases(data, site, args.limit)] if args.localisation else []
    if not cases and args.localisation:
        print("no images with masks found: nothing to measure")
        return
    results = {}
    for variant in args.methods if args.localisation else ():
        subset = cases
        if variant.startswith("scorecam") and args.scorecam_limit:
            keep = {id(c) for site in args.sites
                    for c in lesion_cases_subset(cases, site, args.scorecam_limit)}
            subset = [c for c in cases if id(c) in keep]
        t = time.perf_counter()
        r = localise(predictor, subset, variant, args.batch, args.scorecam_batch)
        if subset is not cases:  # report on the same rows: pad the unmeasured ones out
            results[f"{variant} (n={len(subset)})"] = r
            report_localisation(subset, {f"{variant} (n={len(subset)})": r})
        else:
            results[variant] = r
        print(f"  [{variant}: {len(subset)} images in {time.perf_counter() - t:.0f} s]", flush=True)
    if args.localisation:
        report_localisation(cases, {k: v for k, v in results.items() if len(v["hit"]) == len(cases)})
        report_model(predictor, cases, {k: v for k, v in results.items() if len(v["hit"]) == len(cases)})
    if args.warnings:
        from webapp.config import load_config
        cfg = load_config()
        faith_at = args.faithfulness_at if args.faithfulness_at is not None else cfg["FAITHFULNESS_WARNING"]
        border_at = args.border_at if args.border_at is not None else cfg["BORDER_SHARE_WARNING"]
        variant = args.warnings_variant or f"{cfg['EXPLAIN_METHOD']}@{cfg['EXPLAIN_LAYER'] or 'layer4'}"
        report_warnings(predictor, data, args.sites, variant, args.limit, faith_at, border_at)


def lesion_cases_subset(cases: list[Case], site: str, limit: int) -> list[Case]:
    """Up to ``limit`` cases of ``site``, half malignant and half benign, spread evenly."""
    out = []
    for cls in LESION_CLASSES:
        group = [c for c in cases if c.site == site and c.cls == cls]
        share = max(1, limit // len(LESION_CLASSES))
        out.extend(group[::max(1, len(group) // share)][:share])
    return out


if __name__ == "__main__":
    main()
