#!/usr/bin/env python
"""Store a trained checkpoint as the bundled demo model (float16) and check that halving
the weights changed nothing a user sees: the same verdict on every image of --check.

    .venv/bin/python benchmarks/save_demo.py reports/sites30/busi+breast-lesions-usg.pt \\
        --sites "busi (Egypt, CC BY 4.0)" "breast-lesions-usg (Poland, CC BY 4.0)" \\
        --mask-sites "breast-lesions-usg (Poland)" --check ../shared/data/bus-uclm --out demo/model.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.checkpoint import load_model, save_checkpoint  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--sites", nargs="+", required=True, help="the data it was trained on, with licences")
    ap.add_argument("--mask-sites", nargs="*", default=[],
                    help="the sites whose radiologists' lesion masks guided training (train_sites.py --masks)")
    ap.add_argument("--check", required=True, help="an ImageFolder to compare float32 and float16 on")
    ap.add_argument("--out", default="demo/model.pt")
    args = ap.parse_args()
    model, meta = load_model(args.checkpoint)
    meta = dict(meta, training_sites=args.sites)
    if meta.get("args", {}).get("masks"):
        # the run's temporary mask folder means nothing to a reader: say whose masks they were
        meta["args"] = dict(meta["args"], masks="lesion masks of " + (", ".join(args.mask_sites) or "the training sites"))
        meta["lesion_masks"] = args.mask_sites
    meta.pop("history", None)  # per-epoch figures stay in the run's report, not in the shipped file
    # train_sites.py names BUS-UCLM's patient pattern for every run; where BUS-UCLM was not a
    # training site it grouped nothing, and the site's name in the shipped file would only mislead
    for part in ("split", "args"):
        pattern = (meta.get(part) or {}).get("group_pattern")
        if pattern and not any(site.split(" (")[0] in pattern for site in args.sites):
            meta[part] = dict(meta[part], group_pattern=None)
            print(f"dropped the group pattern {pattern!r} from meta[{part!r}]: none of --sites is in it")
    save_checkpoint(args.out, model, meta, half=True)
    full, half = Predictor.from_checkpoint(args.checkpoint, "cpu"), Predictor.from_checkpoint(args.out, "cpu")
    a, b = predict_folder(full, args.check), predict_folder(half, args.check)
    same = np.mean([x == y for x, y in zip(a.predicted, b.predicted)])
    ma, mb = summarise(a.y, a.probs, full.threshold), summarise(b.y, b.probs, half.threshold)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    print(f"largest probability change {np.abs(a.probs - b.probs).max():.2e}; same class on {same:.1%} of {len(a.y)} images")
    for key in ("roc_auc", "sensitivity", "specificity"):
        print(f"{key:12} float32 {ma[key]:.3f}  float16 {mb[key]:.3f}")


if __name__ == "__main__":
    main()
