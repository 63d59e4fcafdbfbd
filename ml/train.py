"""Training: `fit`, which runs a whole seeded, resumable training (a single split or k-fold
cross-validation) and writes the best checkpoint by validation ROC-AUC, with `run_split`
(one split's epochs, validation, calibration and checkpoints), what a checkpoint records
(the starting weights' origin and metadata, the images seen) and how the training data are
read and split (`load_training_data`).

The options are :mod:`ml.train_config` and the epoch itself (`train_one_epoch`, `evaluate`,
the schedule and the lesion-attention loss) is :mod:`ml.train_loop`; both are re-exported
here, so ``from ml.train import ...`` keeps working for every name.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ml import MLError
from ml.checkpoint import CheckpointError, read_checkpoint_file, save_checkpoint
from ml.data import (IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES, CachedImages, cache_images,
                     compile_group_pattern, load_masks, named_groups, near_duplicate_groups,
                     scan_folder, stratified_folds, train_val_split)
from ml.calibration import calibrated, fit_platt
from ml.metrics import expected_calibration_error, operating_point, summarise, threshold_for_sensitivity
from ml.model import build_model, select_device
from ml.train_config import (EpochLog, TrainConfig, _class_weights, _normal_target, _pos_weight,
                             check_config, multi_class)
from ml.train_config import MIN_CLASS_IMAGES  # noqa: F401 (re-exported)
from ml.train_loop import WarmupCosine, evaluate_logits, seed_everything, train_one_epoch
from ml.train_loop import (class_directions, evaluate, lesion_attention_loss,  # noqa: F401 (re-exported)
                           model_outputs, style_mixing)

log = logging.getLogger(__name__)


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("loss", "accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def _checkpoint_meta(cfg: TrainConfig, cache: CachedImages, fingerprint: dict, class_names: list[str],
                     positive_classes: list[str], val_metrics: dict, threshold: float,
                     split: dict, epoch: int, history: list[EpochLog], num_outputs: int = 1,
                     calibration: dict | None = None, seen_images: dict | None = None,
                     layer4_stride: int = 2, input_norm: str = "fixed", arch: str = "resnet18",
                     origin: dict | None = None) -> dict[str, Any]:
    return {
        "architecture": arch, "weights_origin": origin,
        "num_outputs": num_outputs, "calibration": calibration,
        "layer4_stride": layer4_stride, "input_norm": input_norm,
        "seen_images": seen_images,
        "class_names": class_names, "positive_classes": positive_classes,
        "labels": list(LABEL_NAMES), "input_size": cfg.img_size,
        "resize": cache.resize, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "threshold": threshold, "threshold_default": 0.5,
        "target_sensitivity": cfg.target_sensitivity, "threshold_confidence": cfg.threshold_confidence or None,
        "val_metrics": val_metrics, "data_fingerprint": fingerprint, "split": split,
        "seed": cfg.seed, "epoch": epoch, "args": asdict(cfg),
        "skipped_files": [str(p) for p, _ in cache.skipped],
        "history": [asdict(h) for h in history],
    }


def start_meta(weights: str) -> dict[str, Any]:
    """The metadata of the starting weights when they are one of our checkpoints, else {}.
    A fine-tune asks several times (geometry, resize mode); the file is read once per
    version of it (path, size and modification time)."""
    if weights in ("none", "imagenet") or not Path(weights).is_file():
        return {}
    stat = Path(weights).stat()
    return dict(_read_start_meta(str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read_start_meta(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    try:
        payload = read_checkpoint_file(Path(path))
    except CheckpointError:
        return {}
    meta = payload.get("meta") if isinstance(payload, dict) else None
    return meta if isinstance(meta, dict) else {}


def weights_arch(weights: str) -> str:
    """The architecture of the starting weights when they are one of our checkpoints (a
    fine-tune keeps its parent's network), else ResNet18."""
    arch = start_meta(weights).get("architecture") or "resnet18"
    if arch == "mixed":
        # a fine-tune of a mixed ensemble starts each member from itself (ml.ensemble.fine_tune)
        raise MLError(f"{weights} is an ensemble of several architectures: fine-tune its members one by one")
    return arch


def weights_origin(weights: str, arch: str) -> dict[str, Any]:
    """Where a run's starting weights came from, for its checkpoint: random, the ImageNet file
    (package, version, sha256), or the parent checkpoint (its own origin kept)."""
    if weights in ("none", None):
        return {"source": "random"}
    if weights == "imagenet":
        from ml.model import imagenet_weights_origin

        return imagenet_weights_origin(arch)
    from ml.hashing import file_sha256

    parent = start_meta(weights)
    return {"source": "checkpoint", "file": Path(weights).name,
            "sha256": file_sha256(weights) if Path(weights).is_file() else None,
            "parent_origin": parent.get("weights_origin")}


def weights_layer4_stride(weights: str) -> int:
    """The layer4 stride of the starting weights when they are one of our checkpoints (a
    fine-tune keeps its parent's geometry), else torchvision's 2."""
    return int(start_meta(weights).get("layer4_stride") or 2)


def weights_input_norm(weights: str) -> str:
    """The input normalisation of the starting weights when they are one of our checkpoints
    (a fine-tune sees images as its parent did), else "fixed"."""
    return start_meta(weights).get("input_norm") or "fixed"


def resize_mode(cfg: TrainConfig) -> str:
    """How images become the square input: ``cfg.resize``, else the starting checkpoint's (a
    fine-tune keeps its parent's), else squashed."""
    from ml.data import check_resize

    return check_resize(cfg.resize or start_meta(cfg.weights).get("resize") or "square-bilinear")


def snapshot_path(out: str | Path, epoch: int) -> Path:
    """Where ``TrainConfig.snapshot_epochs`` writes the model of ``epoch`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.e{epoch}{out.suffix}")


def seen_images(cache: CachedImages, indices: np.ndarray) -> dict[str, list[str]]:
    """sha256 and difference hash (hex) of the images at ``indices``: the leakage guard's record."""
    from ml.data import difference_hash
    from ml.hashing import file_sha256

    hashes = difference_hash(cache.images[indices]) if len(indices) else np.zeros((0, 256), dtype=bool)
    return {"sha256": [file_sha256(cache.paths[i]) for i in indices],
            "dhash": [np.packbits(h).tobytes().hex() for h in hashes]}


def run_split(cfg: TrainConfig, cache: CachedImages, train_idx: np.ndarray, val_idx: np.ndarray,
              out: Path, fingerprint: dict, class_names: list[str], positive_classes: list[str],
              split_info: dict, on_epoch: Callable[[EpochLog], None] | None = None) -> dict[str, Any]:
    """Train on ``train_idx``, validate on ``val_idx`` each epoch, keep the best checkpoint by
    validation ROC-AUC at ``out``; resumable from ``out``.resume.pt. Returns a summary.

    The saved checkpoint carries a Platt calibration fitted on the validation split at the
    best epoch, and its threshold is on that calibrated scale."""
    device = select_device(cfg.device)
    generator = seed_everything(cfg.seed)
    several = multi_class(cfg, class_names, cache.classes)
    num_outputs = len(class_names) if several else 1
    positive_idx = tuple(class_names.index(c) for c in positive_classes)
    labels = cache.classes if several else cache.targets
    x_train, y_train = cache.images[train_idx], labels[train_idx]
    x_val, y_val = cache.images[val_idx], cache.targets[val_idx]
    y_val_labels = labels[val_idx]
    stride = cfg.layer4_stride or weights_layer4_stride(cfg.weights)
    input_norm = cfg.input_norm or weights_input_norm(cfg.weights)
    arch = cfg.arch or weights_arch(cfg.weights)
    origin = weights_origin(cfg.weights, arch)   # hashes the starting file: once per run, not per save
    model = build_model(cfg.weights, num_outputs, positive_idx if several else None, stride, input_norm, arch)
    masks, has_mask = (load_masks(cache.paths, cfg.masks, cache.images.shape[-1], cache.resize)
                       if cfg.masks else (None, None))
    if has_mask is not None:
        log.info("lesion masks for %d of %d images (%d in the training part)",
                 int(has_mask.sum()), len(has_mask), int(has_mask[train_idx].sum()))
    normal_target = _normal_target(class_names, several) if cfg.erase_lesions > 0 else None
    model = model.to(device, memory_format=torch.channels_last)
    # Validated and saved instead of the raw weights when on: a smoother model on small data.
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema else None)
    scored = ema.module if ema is not None else model
    if several:
        weights = _class_weights(y_train, num_outputs) if cfg.pos_weight == "auto" else None
        criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                        label_smoothing=cfg.label_smoothing)
        eval_criterion = nn.CrossEntropyLoss()
    else:
        pw = _pos_weight(cfg.pos_weight, y_train)
        criterion = nn.BCEWithLogitsLoss(pos_weight=None if pw is None else pw.to(device))
        eval_criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, len(train_idx) // cfg.batch_size)
    budget_s = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    schedule = WarmupCosine(steps * cfg.epochs, warmup_steps=steps, time_budget_s=budget_s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    resume_path = out.with_name(out.name + ".resume.pt")

    history: list[EpochLog] = []
    best = {"roc_auc": -1.0, "epoch": 0}
    start_epoch, stale = 1, 0
    if cfg.resume and resume_path.exists():
        state = read_checkpoint_file(resume_path)
        if state.get("split", {}).get("val_sha") != split_info["val_sha"]:
            raise CheckpointError(f"{resume_path} belongs to another split or data set; delete it to start over")
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = [EpochLog(**h) for h in json.loads(state["history"])]
        best, stale = json.loads(state["best"]), int(state["stale"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resume_path, start_epoch)

    trained_on: dict | None = None  # the leakage guard's record, computed once
    started = time.monotonic()
    schedule.started = started
    epoch = start_epoch
    while epoch <= cfg.epochs:
        t0 = time.perf_counter()
        loss, acc, seen = train_one_epoch(model, x_train, y_train, optimizer, scheduler, criterion,
                                          cfg.batch_size, generator, device, augment=cfg.augment,
                                          progress=cfg.progress, desc=f"epoch {epoch}/{cfg.epochs}", ema=ema,
                                          scanner=cfg.scanner_augment,
                                          masks=None if masks is None else masks[train_idx],
                                          has_mask=None if has_mask is None else has_mask[train_idx],
                                          mask_weight=cfg.mask_weight, mask_margin=cfg.mask_margin,
                                          max_aspect=cfg.aspect_augment,
                                          erase_lesions_p=cfg.erase_lesions, normal_target=normal_target,
                                          mixstyle_p=cfg.mixstyle, randconv_p=cfg.randconv)
        train_seconds = time.perf_counter() - t0
        val_logit, val_loss = evaluate_logits(scored, x_val, y_val_labels, 2 * cfg.batch_size, device,
                                              criterion=eval_criterion)
        probs = 1.0 / (1.0 + np.exp(-val_logit))
        metrics = summarise(y_val.numpy(), probs, 0.5)
        metrics["loss"] = val_loss
        entry = EpochLog(epoch, optimizer.param_groups[0]["lr"], loss, acc, train_seconds, seen,
                         {k: v for k, v in metrics.items() if k != "confusion"})
        history.append(entry)
        if on_epoch:
            on_epoch(entry)
        log.info("epoch %d train loss=%.3f acc=%.3f | val %s", epoch, loss, acc, _fmt(metrics))
        improved = metrics["roc_auc"] > best["roc_auc"]
        if improved or epoch in cfg.snapshot_epochs:
            y_np = y_val.numpy()
            calibration = fit_platt(val_logit, y_np)
            p_cal = calibrated(val_logit, calibration)
            threshold = threshold_for_sensitivity(y_np, p_cal, cfg.target_sensitivity, cfg.threshold_confidence or None)
            at_op = operating_point(y_np, p_cal, threshold, cfg.target_sensitivity)
            at_op["ece"] = expected_calibration_error(y_np, p_cal)
            at_op["ece_uncalibrated"] = expected_calibration_error(y_np, probs)
            val_metrics = {"at_threshold": at_op, "at_0.5": metrics, "loss": val_loss}
            if trained_on is None:
                trained_on = seen_images(cache, np.concatenate([train_idx, val_idx]))
            meta = _checkpoint_meta(cfg, cache, fingerprint, class_names, positive_classes,
                                    val_metrics, threshold, split_info, epoch, history, num_outputs,
                                    calibration, trained_on, layer4_stride=stride, input_norm=input_norm,
                                    arch=arch, origin=origin)
            if epoch in cfg.snapshot_epochs:
                save_checkpoint(snapshot_path(out, epoch), scored, meta)
            if improved:
                best = {"roc_auc": metrics["roc_auc"], "epoch": epoch, "threshold": threshold,
                        "val_metrics": val_metrics}
                save_checkpoint(out, scored, meta)
        stale = 0 if improved else stale + 1
        torch.save({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "stale": stale,
                    "history": json.dumps([asdict(h) for h in history]), "best": json.dumps(best),
                    "split": {"val_sha": split_info["val_sha"]}}, resume_path)
        if stale >= cfg.patience:
            log.info("early stop: no ROC-AUC gain in %d epochs", cfg.patience)
            break
        if cfg.time_limit_min and (time.monotonic() - started) / 60 >= cfg.time_limit_min:
            log.info("time limit of %.1f min reached after epoch %d", cfg.time_limit_min, epoch)
            break
        epoch += 1
    resume_path.unlink(missing_ok=True)
    return {"best_epoch": best["epoch"], "best_roc_auc": best["roc_auc"],
            "threshold": best.get("threshold"), "val_metrics": best.get("val_metrics"),
            "history": history, "checkpoint": str(out)}


@dataclass
class TrainingData:
    """A training folder read and grouped as :func:`fit` splits it."""
    index: Any
    cache: CachedImages
    fingerprint: dict[str, Any]
    y: np.ndarray                  # 1 = malignant, per image
    groups: np.ndarray | None      # images that must stay on one side of the split
    split_seed: int


def load_training_data(cfg: TrainConfig) -> TrainingData:
    """Scan, read and group ``cfg.data`` exactly as training does (the split depends on it)."""
    index = scan_folder(cfg.data, cfg.positive_classes)
    if cfg.group_pattern:  # a bad pattern fails before the images are read
        compile_group_pattern(cfg.group_pattern)
    resize = resize_mode(cfg)   # a bad mode fails before the images are read
    cache = cache_images(index, cfg.img_size, strict=cfg.strict, progress=cfg.progress, resize=resize)
    fingerprint = index.fingerprint()
    if cache.skipped:
        fingerprint["n_skipped"] = len(cache.skipped)
    groups = near_duplicate_groups(cache.images) if cfg.group_duplicates else None
    if cfg.group_pattern:
        groups = named_groups(cache.paths, cfg.group_pattern, groups)
    return TrainingData(index, cache, fingerprint, cache.targets.numpy().astype(int), groups,
                        cfg.seed if cfg.split_seed is None else cfg.split_seed)


def validation_indices(cfg: TrainConfig, data: TrainingData) -> np.ndarray:
    """The validation part of a single-split run (what :func:`fit` validates and calibrates on)."""
    return train_val_split(data.y, cfg.val_split, data.split_seed, data.groups)[1]


def split_hash(val_idx: np.ndarray) -> str:
    """The short hash a checkpoint records of its validation part (``split.val_sha``)."""
    return hashlib.sha256(",".join(map(str, val_idx.tolist())).encode()).hexdigest()[:16]


def fit(cfg: TrainConfig, on_epoch: Callable[[EpochLog], None] | None = None) -> dict[str, Any]:
    """Load the data once, split it (or run k-fold cross-validation) and train.

    With ``folds >= 2`` every fold is trained and its checkpoint written as
    ``OUT.foldK.pt``; ``OUT`` gets the fold with the best validation ROC-AUC and the
    summary carries each metric's mean and standard deviation across folds. A single split's
    summary names its validation images (``val_paths``), so a caller can judge parts of them.
    """
    out = Path(cfg.out)
    check_config(cfg)
    if cfg.erase_lesions > 0 and not cfg.masks:
        raise MLError("erasing lesions needs lesion masks (--masks)")
    data = load_training_data(cfg)
    index, cache, fingerprint, y, groups, split_seed = (data.index, data.cache, data.fingerprint, data.y,
                                                        data.groups, data.split_seed)
    n_groups = len(np.unique(groups)) if groups is not None else len(y)

    def split_info(val_idx: np.ndarray, fold: int | None) -> dict:
        val_sha = split_hash(val_idx)
        return {"val_fraction": cfg.val_split, "folds": cfg.folds, "fold": fold,
                "grouped_near_duplicates": cfg.group_duplicates, "group_pattern": cfg.group_pattern,
                "n_groups": int(n_groups),
                "n_train": int(len(y) - len(val_idx)), "n_val": int(len(val_idx)),
                "seed": split_seed, "val_sha": val_sha}

    common = dict(cache=cache, fingerprint=fingerprint, class_names=index.class_names,
                  positive_classes=index.positive_classes)
    if cfg.folds and cfg.folds >= 2:
        folds = stratified_folds(y, cfg.folds, split_seed, groups)
        results = []
        for k, val_idx in enumerate(folds, start=1):
            train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
            fold_out = out.with_name(f"{out.stem}.fold{k}{out.suffix}")
            log.info("fold %d/%d: %d train, %d val", k, cfg.folds, len(train_idx), len(val_idx))
            res = run_split(cfg, train_idx=train_idx, val_idx=val_idx, out=fold_out,
                            split_info=split_info(val_idx, k), on_epoch=on_epoch, **common)
            results.append(res)
        best = max(results, key=lambda r: r["best_roc_auc"])
        out.write_bytes(Path(best["checkpoint"]).read_bytes())
        summary = {"folds": results, "checkpoint": str(out), "cv": cv_summary(results)}
        return summary
    train_idx, val_idx = train_val_split(y, cfg.val_split, split_seed, groups)
    result = run_split(cfg, train_idx=train_idx, val_idx=val_idx, out=out,
                       split_info=split_info(val_idx, None), on_epoch=on_epoch, **common)
    result["skipped_files"] = [str(p) for p, _ in cache.skipped]
    result["val_paths"] = [str(cache.paths[i]) for i in val_idx]
    return result


def cv_summary(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each operating-point metric across folds."""
    keys = ("roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "f1", "accuracy")
    out = {}
    for k in keys:
        vals = np.array([r["val_metrics"]["at_threshold"][k] for r in results if r["val_metrics"]], dtype=float)
        out[k] = {"mean": float(np.nanmean(vals)), "sd": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out
