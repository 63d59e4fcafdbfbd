#!/usr/bin/env python
"""Train from scratch (--weights none) on the BUSI ultrasound images and print the
validation figures and the training throughput against a bare train step.

    .venv/bin/python benchmarks/train_busi.py                 # ~25 min on 2 cores
    .venv/bin/python benchmarks/train_busi.py --minutes 2     # a quick look

The validation split keeps near-duplicate images (same lesion, consecutive frames) on one
side (see ml.data.near_duplicate_groups); a random split would flatter the model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from ml.model import build_model  # noqa: E402
from ml.train import TrainConfig, fit  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


class BareStep:
    """Adam + BCE train steps on in-memory tensors of the training shape: no data pipeline."""

    def __init__(self, batch_size: int, size: int):
        torch.manual_seed(0)
        self.batch_size = batch_size
        self.model = build_model("none").to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
        self.y = (torch.rand(batch_size) > 0.5).float()
        self.step()

    def step(self) -> None:
        loss = self.loss_fn(self.model(self.x).flatten(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def throughput(self, seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.step()
            n += self.batch_size
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent / "shared" / "data" / "busi"))
    ap.add_argument("--out", default=str(HERE / "runs" / "busi.pt"))
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    ap.add_argument("--epochs", type=int, default=200, help="upper bound; the time budget usually decides")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights (0 = off)")
    ap.add_argument("--random-split", action="store_true", help="do not group near-duplicates (inflated figures)")
    ap.add_argument("--save-demo", help="also write the best model as a float16 demo checkpoint here")
    ap.add_argument("--json", help="write the printed figures as JSON here")
    ap.add_argument("--demo-only", action="store_true",
                    help="skip training: only convert an existing --out checkpoint for --save-demo")
    args = ap.parse_args()

    if not Path(args.data).is_dir():
        sys.exit(f"no BUSI data at {args.data} (pass --data)")
    cfg = TrainConfig(data=args.data, out=args.out, epochs=args.epochs, img_size=args.img_size,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, patience=10_000,
                      time_limit_min=args.minutes, group_duplicates=not args.random_split,
                      weights="none", progress=False, ema=args.ema)
    if args.demo_only:
        return save_demo(cfg, args.save_demo)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, img {args.img_size}px, "
          f"batch {args.batch_size}, budget {args.minutes} min", flush=True)
    # This machine is shared, so speed drifts: sample the bare step between epochs and pair
    # each sample with the epoch just before it, rather than timing once before and after.
    bare = BareStep(args.batch_size, args.img_size)
    pairs: list[tuple[float, float]] = []

    t0 = time.perf_counter()

    def show(e) -> None:
        if e.epoch % 5 == 1:
            pairs.append((e.train_images / e.train_seconds, bare.throughput(4.0)))
        v = e.val
        print(f"epoch {e.epoch:3d} {time.perf_counter() - t0:6.0f}s lr {e.lr:.1e} train loss {e.train_loss:.3f}"
              f" | val roc_auc {v['roc_auc']:.3f} sens@0.5 {v['sensitivity']:.3f} spec@0.5 {v['specificity']:.3f}"
              f" ({e.train_images / e.train_seconds:.1f} img/s)", flush=True)

    result = fit(cfg, on_epoch=show)
    wall = time.perf_counter() - t0
    history = result["history"]
    pipeline = sum(p for p, _ in pairs) / len(pairs)
    bare_rate = sum(b for _, b in pairs) / len(pairs)
    ratio = sum(p / b for p, b in pairs) / len(pairs)
    m = result["val_metrics"]["at_threshold"]
    split = load_checkpoint(args.out)["meta"]["split"]
    figures = {
        "val_roc_auc": m["roc_auc"], "val_pr_auc": m["pr_auc"], "threshold": m["threshold"],
        "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"],
        "val_roc_auc_last_epoch": history[-1].val["roc_auc"],
        "best_epoch": result["best_epoch"], "epochs_run": len(history), "minutes": wall / 60,
        "n_train": split["n_train"], "n_val": split["n_val"], "grouped_split": split["grouped_near_duplicates"],
        "train_img_per_s": pipeline, "bare_step_img_per_s": bare_rate, "throughput_ratio": ratio,
        "throughput_samples": len(pairs),
    }
    print("\n== BUSI from scratch (--weights none) ==")
    print(f"split: {split['n_train']} train / {split['n_val']} val, "
          f"{'near-duplicates grouped' if split['grouped_near_duplicates'] else 'random'}, seed {args.seed}")
    print(f"epochs run: {len(history)} in {wall / 60:.1f} min; best epoch {result['best_epoch']}")
    print(f"validation ROC-AUC: {m['roc_auc']:.3f} (target >= 0.90); PR-AUC {m['pr_auc']:.3f}")
    print(f"at the operating threshold {m['threshold']:.3f} (target sensitivity 0.90): "
          f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}")
    print(f"training throughput: {pipeline:.1f} img/s vs bare step {bare_rate:.1f} img/s on in-memory "
          f"tensors, mean of {len(pairs)} paired samples: ratio {ratio:.2f} (target >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.save_demo:
        save_demo(cfg, args.save_demo)


def save_demo(cfg: TrainConfig, demo_path: str) -> None:
    """Store the best model as float16 and re-pick its operating threshold with the
    float16 weights on the same validation split (the split is rebuilt from the seed)."""
    from ml.data import cache_images, near_duplicate_groups, scan_folder, train_val_split
    from ml.metrics import summarise, threshold_for_sensitivity
    from ml.train import evaluate

    payload = load_checkpoint(cfg.out)
    model = build_model("none")
    model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    meta = dict(payload["meta"], demo=True, note="research demo, not for clinical use",
                made_by=" ".join(sys.argv))
    save_checkpoint(demo_path, model, meta, half=True)
    half_model, _ = load_model(demo_path)
    cache = cache_images(scan_folder(cfg.data), cfg.img_size)
    y = cache.targets.numpy().astype(int)
    groups = near_duplicate_groups(cache.images) if cfg.group_duplicates else None
    _, val_idx = train_val_split(y, cfg.val_split, cfg.seed, groups)
    probs, _ = evaluate(half_model, cache.images[val_idx], None, 64, torch.device("cpu"))
    threshold = threshold_for_sensitivity(y[val_idx], probs, cfg.target_sensitivity)
    meta["threshold"] = threshold
    meta["val_metrics"] = dict(meta["val_metrics"], at_threshold=summarise(y[val_idx], probs, threshold),
                               threshold_picked_on="float16 weights")
    save_checkpoint(demo_path, model, meta, half=True)
    m = meta["val_metrics"]["at_threshold"]
    print(f"demo checkpoint (float16): {demo_path}; threshold {threshold:.4f}: val roc_auc {m['roc_auc']:.3f}, "
          f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}")


if __name__ == "__main__":
    main()
