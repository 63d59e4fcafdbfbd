#!/usr/bin/env python
"""How many reviewed cases does a new hospital need? A base model from two sites is adapted
to the third with 0, 25, 50, 100 and all of a pool of reviewed cases.

    .venv/bin/python benchmarks/site_adaptation.py --base reports/sites30/busi+breast-lesions-usg.pt
    .venv/bin/python benchmarks/site_adaptation.py --base MODEL.pt --finetune-minutes 0   # recalibration only

The third site (default BUS-UCLM) is split by patient into a reviewed pool and a test part.
For each number of reviewed cases (drawn from the pool at random, the reviewers' label
being the folder's), two adaptations run through the product's own code:
  recalibrate  ml.adapt.recalibrate: new calibration and site threshold, same weights
               (what `manage.py recalibrate` does);
  retrain      ml.export.write_feedback_folder -> merge_training_data with the two base
               sites (the test part as the locked set) -> ml.ensemble.fine_tune from the
               base weights for --finetune-minutes (per network: an ensemble base has each
               member fine-tuned and recombined), judged at the threshold it registers with
               (set on its own validation split, as `manage.py retrain` registers it);
  adapt-bn     (with --adapt-bn) ml.adapt.recalibrate with site_images: the batch-normalisation
               statistics re-estimated on the whole pool's images first (the site's uploads so
               far, reviewed or not; their labels unused), then calibration and site threshold
               on the reviewed cases (what `manage.py recalibrate --adapt-bn` does);
  retrain+bn   (with --adapt-bn) the retrained model adapted as adapt-bn, its threshold set on
               the pool's cases it did not train on;
  retrain+recal the retrained model recalibrated on the pool's cases it did not train on
               (the site's reviews after the retrain: what `manage.py recalibrate` uses, since
               it leaves out cases a model was trained or validated on); only where the rest
               of the pool has enough of them.
Each prints the test part's ROC-AUC (malignant vs rest), and sensitivity/specificity at the
site threshold. The site threshold is set on the reviewed cases for --target-sensitivity,
with --confidence (ml.adapt.SITE_THRESHOLD_CONFIDENCE; 0: the in-sample rule).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import MLError  # noqa: E402
from ml.adapt import SITE_THRESHOLD_CONFIDENCE, recalibrate  # noqa: E402
from ml.evaluate import predict_folder  # noqa: E402
from ml.export import FeedbackImage, merge_training_data, write_feedback_folder  # noqa: E402
from ml.hashing import file_sha256  # noqa: E402
from ml.inference import Predictor  # noqa: E402
from ml.metrics import summarise  # noqa: E402
from ml.ensemble import fine_tune  # noqa: E402
from ml.train import TrainConfig  # noqa: E402

from benchmarks.train_sites import link_folder, patient_of, site_files  # noqa: E402


def split_by_patient(site: str, seed: int) -> tuple[list, list]:
    """(pool, test): whole patients to each side, about half the malignant patients each."""
    files = site_files(site)
    patients = sorted({patient_of(p, site) for _, p, _ in files})
    malignant = {patient_of(p, site) for _, p, c in files if c == "malignant"}
    rng = np.random.default_rng(seed)
    order = [p for p in rng.permutation(patients)]
    ranked = [p for p in order if p in malignant] + [p for p in order if p not in malignant]
    pool_patients = set(ranked[0::2])
    pool = [f for f in files if patient_of(f[1], site) in pool_patients]
    test = [f for f in files if patient_of(f[1], site) not in pool_patients]
    return pool, test


def judge(model: Path, test_dir: Path) -> dict:
    predictor = Predictor.from_checkpoint(model, "cpu")
    fp = predict_folder(predictor, test_dir)
    m = summarise(fp.y, fp.probs, predictor.threshold)
    return {k: m[k] for k in ("roc_auc", "sensitivity", "specificity", "threshold", "n", "n_positive")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkpoint trained on the other two sites")
    ap.add_argument("--site", default="bus-uclm")
    ap.add_argument("--counts", default="0,25,50,100,all")
    ap.add_argument("--finetune-minutes", type=float, default=3.0, help="0: recalibration only")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="a fixed number of epochs per network instead of --finetune-minutes (the same on any machine)")
    ap.add_argument("--target-sensitivity", type=float, default=0.90)
    ap.add_argument("--confidence", type=float, default=SITE_THRESHOLD_CONFIDENCE,
                    help="of keeping the target sensitivity on new cases (0: met on the reviewed cases)")
    ap.add_argument("--feedback-copies", type=int, default=1, help="each reviewed image this many times in the fine-tune")
    ap.add_argument("--adapt-bn", action="store_true",
                    help="also the adapt-bn path: statistics re-estimated on the pool's images, then recalibrated")
    ap.add_argument("--adapt-bn-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    confidence = args.confidence or None
    base_sites = [s for s in ("busi", "breast-lesions-usg", "bus-uclm") if s != args.site]
    pool, test = split_by_patient(args.site, args.seed)
    rng = np.random.default_rng(args.seed)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    print(f"{args.site}: pool {len(pool)} images ({sum(c == 'malignant' for *_, c in pool)} malignant), "
          f"test {len(test)} images ({sum(c == 'malignant' for *_, c in test)} malignant), split by patient")
    with tempfile.TemporaryDirectory(prefix="adapt-") as tmp:
        work = Path(tmp)
        test_dir = link_folder(work / "test", test)
        base_dir = link_folder(work / "base", [f for s in base_sites for f in site_files(s)])
        base_eval = judge(Path(args.base), test_dir)
        schedule = f"{args.finetune_epochs} epoch(s)" if args.finetune_epochs else f"{args.finetune_minutes} min"
        print(f"fine-tune: {schedule} per network, each reviewed image {args.feedback_copies}x; "
              f"site threshold: confidence {confidence or 'in-sample'}")
        print(f"{'reviewed':>8} {'path':12} {'ROC-AUC':>8} {'sens':>6} {'spec':>6} {'threshold':>9}")
        print(f"{0:8d} {'base model':12} {base_eval['roc_auc']:8.3f} {base_eval['sensitivity']:6.3f} "
              f"{base_eval['specificity']:6.3f} {base_eval['threshold']:9.3f}")

        def adapt(n: int, path: str, model: Path, cases: list, out: Path, uploads: list | None = None,
                  note: str = "") -> bool:
            """Row ``n`` of the table: ml.adapt.recalibrate ``model`` on ``cases`` (with ``uploads``: their statistics
            first), judge the result on the test part and print its row; False if it cannot."""
            try:
                recalibrate(model, [p for _, p, _ in cases], [int(c == "malignant") for *_, c in cases], out,
                            args.target_sensitivity, args.site, confidence, site_images=uploads,
                            site_weight=args.adapt_bn_weight)
            except MLError as exc:
                print(f"{n:8d} {path:12} (cannot: {exc})")
                return False
            m = judge(out, test_dir)
            print(f"{n:8d} {path:12} {m['roc_auc']:8.3f} {m['sensitivity']:6.3f} {m['specificity']:6.3f} "
                  f"{m['threshold']:9.3f}{note}", flush=True)
            return True

        for count in args.counts.split(","):
            n = len(pool) if count == "all" else int(count)
            if n == 0:
                continue
            reviewed = pool[:n]
            if sum(c == "malignant" for *_, c in reviewed) < 5:
                print(f"{n:8d} (fewer than 5 malignant among them: no site threshold can be set)")
                continue
            uploads = [p for _, p, _ in pool]
            adapt(n, "recalibrate", args.base, reviewed, work / f"recal-{n}.pt")
            if args.adapt_bn:
                adapt(n, "adapt-bn", args.base, reviewed, work / f"bn-{n}.pt", uploads)
            if args.finetune_minutes <= 0 and not args.finetune_epochs:
                continue
            # each case carries its patient, as a DICOM upload's pseudonym would: the fine-tune
            # keeps a patient's images on one side of its validation split
            items = [FeedbackImage(i + 1, p, c, file_sha256(p), "reviewer",
                                   patient_key=patient_of(p, args.site))
                     for i, (_, p, c) in enumerate(reviewed)]
            write_feedback_folder(items, work / f"feedback-{n}")
            merge_training_data(base_dir, work / f"feedback-{n}", test_dir, work / f"train-{n}",
                                feedback_copies=args.feedback_copies)
            tuned = work / f"tuned-{n}.pt"
            size = Predictor.from_checkpoint(args.base, "cpu").input_size
            fine_tune(TrainConfig(data=str(work / f"train-{n}"), out=str(tuned), epochs=args.finetune_epochs or 10_000,
                            weights=str(args.base), img_size=size, lr=3e-4, patience=10_000,
                            time_limit_min=None if args.finetune_epochs else args.finetune_minutes,
                            ema=0.99, seed=args.seed, progress=False))
            m = judge(tuned, test_dir)
            print(f"{n:8d} {'retrain':12} {m['roc_auc']:8.3f} {m['sensitivity']:6.3f} {m['specificity']:6.3f} {m['threshold']:9.3f}",
                  flush=True)
            later, note = pool[n:], f"  (on the other {len(pool) - n} pool cases)"
            if adapt(n, "retrain+recal", tuned, later, work / f"tuned-recal-{n}.pt", note=note) and args.adapt_bn:
                # the images the fine-tune trained on are left out of the statistics too
                adapt(n, "retrain+bn", tuned, later, work / f"tuned-bn-{n}.pt", uploads, note=note)

if __name__ == "__main__":
    main()
