#!/usr/bin/env python
"""Does moving a model's probabilities to a site's share of cancers calibrate them there?

Question: is the high ECE at a new site mostly its case mix, and does `recalibrate
--prevalence` fix it without reviewed cases?
Answer (2026-11-27): yes; on BUS-UCLM the demo model's ECE falls 0.094 -> 0.034 with the true
share (0.067-0.071 stated wrong by half or double), verdicts unchanged.
docs/studies/2026-11-27-site-prevalence.md

    .venv/bin/python studies/site_prevalence.py demo/model.pt [MORE.pt ...] [--site bus-uclm] \\
        [--factors 0.5,1,2]

For each model, on every image of ``../shared/data/SITE`` (a site it never trained on): ECE
(15 bins) and Brier score with its stored calibration, then with the calibration moved to the
site's share of cancers (`manage.py recalibrate --prevalence`, ml.calibration.shift_prevalence)
as stated by an admin. An admin knows that share only roughly, so the stated value is the true
share times each of --factors (0.5 and 2: wrong by half or double). Sensitivity and
specificity are printed to show that they do not move: the threshold moves with the
probabilities. The true share is read from the site's labels, which a real site would take
from its own records; nothing is fitted to the site.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# benchmarks/ on the path, so that `import train_sites` is the same module that the
# benchmarks themselves import (its use_data() sets the data folder for all of them).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ml import MLError  # noqa: E402
from ml.calibration import calibrated, fitted_prevalence, log_odds, shift_prevalence, shift_threshold  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import expected_calibration_error, summarise  # noqa: E402
import train_sites  # noqa: E402
from train_sites import SITES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--site", default="bus-uclm", choices=sorted(SITES))
    ap.add_argument("--factors", default="0.5,1,2", help="stated share = the site's true share times each of these")
    ap.add_argument("--data", default=str(train_sites.DATA), help="folder holding the sites (default: %(default)s)")
    args = ap.parse_args()
    train_sites.use_data(args.data)
    factors = [float(f) for f in args.factors.split(",") if f]
    print(f"{'model':28} {'calibration':24} {'ECE':>6} {'Brier':>6} {'sens':>6} {'spec':>6} {'threshold':>9}")
    for path in args.models:
        try:
            predictor = Predictor.from_checkpoint(path, "cpu")
        except MLError as exc:
            sys.exit(f"site_prevalence: {exc}")
        fp = predict_folder(predictor, train_sites.DATA / args.site)
        y, stored = fp.y, predictor.meta.get("calibration")
        # the model's malignancy log-odds before calibration, recovered from the stored map
        z = (log_odds(fp.probs) - float(stored["b"])) / float(stored["a"])
        name = f"{Path(path).parent.name}/{Path(path).name}"[-28:]
        truth = float(y.mean())
        rows = [(f"stored ({fitted_prevalence(stored):.1%} cancers)", stored, predictor.threshold)]
        for factor in factors:
            moved = shift_prevalence(stored, min(truth * factor, 0.99))
            label = f"moved to {moved['prevalence']:.1%}" + (" (true)" if factor == 1 else f" ({factor:g}x)")
            rows.append((label, moved, shift_threshold(predictor.threshold, moved)))
        for label, calibration, threshold in rows:
            p = calibrated(z, calibration)
            m = summarise(y, p, threshold)
            print(f"{name:28} {label:24} {expected_calibration_error(y, p, 15):6.3f} {np.mean((p - y) ** 2):6.3f} "
                  f"{m['sensitivity']:6.3f} {m['specificity']:6.3f} {threshold:9.3f}")


if __name__ == "__main__":
    main()
