"""Training: plain `train_one_epoch` / `evaluate` functions and `fit`, which runs a whole
seeded, resumable training and writes the best checkpoint by validation ROC-AUC."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml import MLError
from ml.augment import augment_batch, erase_lesions, mix_styles, random_convolution, scanner_shift
from ml.checkpoint import CheckpointError, read_checkpoint_file, save_checkpoint
from ml.data import (IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES, CachedImages, cache_images,
                     compile_group_pattern, load_masks, named_groups, near_duplicate_groups, normalise,
                     scan_folder, stratified_folds, train_val_split)
from ml.calibration import calibrated, fit_platt
from ml.metrics import expected_calibration_error, operating_point, summarise, threshold_for_sensitivity
from ml.model import build_model, features_and_logits, model_malignancy_logit, select_device

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every option of a training run; stored in the checkpoint so a run can be reproduced."""

    data: str
    out: str
    val_split: float = 0.2
    epochs: int = 30
    weights: str = "none"
    arch: str | None = None           # ml.ARCHITECTURES; None: the starting checkpoint's, else resnet18
    img_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    split_seed: int | None = None     # seed of the train/validation split; None: ``seed`` (members of one ensemble share a split)
    folds: int = 0
    target_sensitivity: float = 0.90
    # the stored threshold keeps target_sensitivity on new cancers with this probability
    # (ml.metrics.threshold_for_sensitivity); None or 0: met on the validation part (the
    # default: at 0.8 a few model-blind validation cancers pull the threshold down to a
    # specificity near zero, docs/ml.md)
    threshold_confidence: float | None = None
    # also write the model of these epochs (``snapshot_path``), whatever its validation score:
    # members of a snapshot ensemble (ml.ensemble.combine), on the run's one split
    snapshot_epochs: tuple[int, ...] = ()
    patience: int = 15
    device: str | None = None
    positive_classes: list[str] | None = None
    group_duplicates: bool = True
    group_pattern: str | None = None  # regex on file names naming the patient: one patient, one side of the split
    pos_weight: str = "auto"          # "auto" (balanced classes), "none", or a number (binary only)
    classes: str = "auto"             # "auto": one output per class folder when there are 3+, else one logit; "binary"
    augment: bool = True
    scanner_augment: bool = False     # also mimic other scanners (ml.augment.scanner_shift)
    aspect_augment: float = 1.0       # > 1: random width/height stretch up to this ratio (ml.augment)
    masks: str | None = None          # folder of lesion masks named as the images: lesion-attention loss
    mask_weight: float = 1.0          # weight of that loss beside the classification loss
    mask_margin: int = 0              # grid cells around the lesion that also count as inside (its surroundings)
    erase_lesions: float = 0.0        # probability of training a masked image as a lesion-free "normal"
    mixstyle: float = 0.0             # probability per batch of mixing feature styles after layer1 and layer2 (ml.augment.mix_styles)
    randconv: float = 0.0             # probability per image of a random-filter texture (ml.augment.random_convolution)
    layer4_stride: int | None = None  # 1: an 8 x 8 last feature map at 128 px; None: the start weights' (else 2)
    input_norm: str | None = None     # "image": each image standardised first (ml.model.INPUT_NORMS); None: the start weights' (else "fixed")
    resize: str | None = None         # "square-bilinear" or "letterbox-bilinear" (ml.data.RESIZE_MODES); None: the start weights' (else square)
    label_smoothing: float = 0.0      # cross-entropy label smoothing (three-class runs)
    ema: float = 0.0                  # decay of an exponential moving average of the weights; 0 = off
    time_limit_min: float | None = None
    resume: bool = False
    strict: bool = False
    progress: bool = True


@dataclass
class EpochLog:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    train_seconds: float
    train_images: int
    val: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class WarmupCosine:
    """Linear warm-up then cosine decay to 1% of the base rate, per batch.

    With ``time_budget_s`` the decay follows the wall clock instead of the step count, so a
    time-limited run ends at a low rate however fast this (possibly shared) machine runs.
    """

    def __init__(self, total_steps: int, warmup_steps: int, time_budget_s: float | None = None):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.time_budget_s = time_budget_s
        self.started = time.monotonic()

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.time_budget_s:
            progress = min(1.0, (time.monotonic() - self.started) / self.time_budget_s)
        else:
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def class_directions(fc_weight: torch.Tensor, output: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Per image, the fc direction whose activation map explains its class: for a one-logit
    model the logit's row; for K classes the gradient of the class's log-odds against the
    other classes, W_c - sum_j q_j W_j with q the softmax over the others (held fixed). For
    the malignant class this is exactly the direction of the malignancy logit the worker's
    heatmap explains."""
    if classes is None:
        return fc_weight[0].expand(len(output), -1)
    others = torch.ones_like(output, dtype=torch.bool)
    others[torch.arange(len(output)), classes] = False
    q = torch.softmax(output.detach().masked_fill(~others, float("-inf")), dim=1)
    return fc_weight[classes] - q @ fc_weight


def lesion_attention_loss(features: torch.Tensor, directions: torch.Tensor, masks: torch.Tensor,
                          margin: int = 0) -> torch.Tensor:
    """Mean share of the class activation map outside the lesion.

    ``features`` N x C x h x w (layer4), ``directions`` N x C (:func:`class_directions`),
    ``masks`` N x 1 x H x W in [0, 1]. The map is relu(direction . A), the closed-form
    Grad-CAM of a pooled linear head; a cell counts as lesion when any of it is (max-pooled
    mask over 0.5), so a small lesion is not asked to fill a coarse cell alone. ``margin``
    cells around the lesion (a square neighbourhood) count as inside too: its margin, halo
    and posterior shadowing are findings in themselves. 0 when all of the map is on the
    lesion, 1 when none is."""
    cam = torch.relu(torch.einsum("nc,nchw->nhw", directions, features.float()))
    inside = (F.adaptive_max_pool2d(masks.float(), cam.shape[-2:]) >= 0.5).float()
    if margin > 0:
        inside = F.max_pool2d(inside, 2 * margin + 1, stride=1, padding=margin)
    inside = inside[:, 0]
    total = cam.sum(dim=(1, 2))
    outside = (cam * (1.0 - inside)).sum(dim=(1, 2))
    return (outside / (total + 1e-6)).mean()


@contextlib.contextmanager
def style_mixing(model: nn.Module, generator: torch.Generator, p: float):
    """While open, layer1's and layer2's outputs pass through :func:`ml.augment.mix_styles`
    whenever the yielded switch's ``"on"`` is true (the caller draws it per batch with
    probability ``p``). The hooks exist only inside the block, so evaluation, the EMA copy and
    the saved model never see them; with ``p`` = 0 nothing is hooked."""
    switch = {"on": False}
    hooks = [layer.register_forward_hook(
        lambda module, inputs, output: mix_styles(output, generator) if switch["on"] else None)
        for layer in (model.layer1, model.layer2)] if p > 0 else []
    try:
        yield switch
    finally:
        for hook in hooks:
            hook.remove()


def train_one_epoch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scheduler, criterion: nn.Module,
                    batch_size: int, generator: torch.Generator, device: torch.device,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: bool = True,
                    progress: bool = False, desc: str = "train",
                    ema: torch.optim.swa_utils.AveragedModel | None = None,
                    scanner: bool = False, masks: torch.Tensor | None = None,
                    has_mask: torch.Tensor | None = None,
                    mask_weight: float = 0.0, mask_margin: int = 0, max_aspect: float = 1.0,
                    erase_lesions_p: float = 0.0, normal_target: float | int | None = None,
                    mixstyle_p: float = 0.0, randconv_p: float = 0.0) -> tuple[float, float, int]:
    """One pass over (uint8 images, targets) in shuffled batches; returns (mean loss,
    accuracy, images seen). Targets are 0/1 floats for a one-logit model (accuracy at 0.5)
    or class indices for a multi-class one (accuracy of the arg-max). A final batch of
    one is dropped (BatchNorm). ``ema``, when given, is updated after every optimizer step.

    With ``masks`` (N x 1 x H x W uint8, 255 = lesion), ``has_mask`` (N bool) and
    ``mask_weight`` > 0, :func:`lesion_attention_loss` (with ``mask_margin``) is added for the
    images with a mask (augmented with the same geometric transform as their image).

    With ``erase_lesions_p`` > 0 (and masks), each image with a mask is, with that
    probability, replaced by :func:`ml.augment.erase_lesions`' lesion-free copy and trained
    as ``normal_target`` (the normal class), without the attention loss.

    With ``mixstyle_p`` > 0, each batch is, with that probability, trained with
    :func:`ml.augment.mix_styles` applied to the outputs of layer1 and layer2
    (:func:`style_mixing`). With ``randconv_p`` > 0, each image is, with that probability,
    filtered by :func:`ml.augment.random_convolution` after the other augmentations."""
    use_masks = masks is not None and has_mask is not None and mask_weight > 0
    use_erase = masks is not None and has_mask is not None and erase_lesions_p > 0 and normal_target is not None
    model.train()
    order = torch.randperm(len(images), generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches = batches[:-1]
    total_loss, correct, seen = 0.0, 0, 0
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    with style_mixing(model, generator, mixstyle_p) as mixing:
        for idx in batches:
            x, y = images[idx], targets[idx]
            guided = has_mask[idx] if has_mask is not None else None
            if use_erase and bool(has_mask[idx].any()):
                chosen = has_mask[idx] & (torch.rand(len(idx), generator=generator) < erase_lesions_p)
                if bool(chosen.any()):
                    x, erased = erase_lesions(x, masks[idx], chosen, generator)
                    y = torch.where(erased, torch.as_tensor(normal_target, dtype=y.dtype), y)
                    guided = guided & ~erased
            m = masks[idx] if use_masks and bool(has_mask[idx].any()) else None
            if m is not None:
                x, m = (augment_batch(x, generator, masks=m, max_aspect=max_aspect) if augment
                        else (x.float(), m.float() / 255.0))
            else:
                x = augment_batch(x, generator, max_aspect=max_aspect) if augment else x.float()
            if scanner:
                x = scanner_shift(x, generator)
            if randconv_p > 0:
                x = random_convolution(x, generator, randconv_p)
            # normalise() takes uint8-range values; float input is fine
            x = normalise(x, mean, std).to(device, non_blocking=True)
            y = y.to(device)
            if mixstyle_p > 0:   # drawn per batch; no draw at all when MixStyle is off
                mixing["on"] = bool(torch.rand(1, generator=generator) < mixstyle_p)
            if m is not None:
                features, output = features_and_logits(model, x)
            else:
                output = model(x)
            logits = output.flatten() if output.shape[1] == 1 else output
            loss = criterion(logits, y)
            if m is not None:
                keep = guided.to(device)
                if logits.ndim == 1:
                    keep = keep & (y > 0.5)  # one logit: only the positive class has a lesion map to guide
                if bool(keep.any()):
                    rows = class_directions(model.fc.weight, output[keep], None if logits.ndim == 1 else y[keep])
                    loss = loss + mask_weight * lesion_attention_loss(features[keep], rows, m.to(device)[keep],
                                                                       mask_margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            if scheduler is not None:
                scheduler.step()
            n = len(idx)
            total_loss += loss.item() * n
            predicted = (logits.detach() >= 0).float() if logits.ndim == 1 else logits.detach().argmax(dim=1)
            correct += int((predicted == y).sum())
            seen += n
    return total_loss / max(seen, 1), correct / max(seen, 1), seen


@torch.inference_mode()
def model_outputs(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Raw outputs (N x K logits, float32, CPU) for uint8 ``images``: eval mode, no augmentation."""
    model.eval()
    outputs = [model(normalise(images[i:i + batch_size].to(device), mean, std)).float().cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0, model.fc.out_features)


def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None,
             batch_size: int, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD,
             criterion: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """Uncalibrated malignancy probabilities for uint8 ``images`` and the mean loss (with
    ``criterion`` and ``targets``: 0/1 for one logit, class indices for several)."""
    z, loss = evaluate_logits(model, images, targets, batch_size, device, mean, std, criterion)
    return torch.sigmoid(torch.from_numpy(z)).numpy(), loss


def evaluate_logits(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None,
                    batch_size: int, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    criterion: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """As ``evaluate``, but the malignancy logits (float64) themselves: calibration is fitted
    on these, without the precision lost by a sigmoid and its inverse near 0 and 1."""
    output = model_outputs(model, images, batch_size, device, mean, std)
    loss = 0.0
    if criterion is not None and targets is not None and len(output):
        with torch.inference_mode():
            loss = float(criterion(output.flatten() if output.shape[1] == 1 else output, targets.cpu()).item())
    return model_malignancy_logit(model, output).numpy().astype(np.float64), loss


def _pos_weight(spec: str, targets: torch.Tensor) -> torch.Tensor | None:
    if spec == "none":
        return None
    if spec == "auto":
        n_pos = float(targets.sum())
        return torch.tensor((len(targets) - n_pos) / max(n_pos, 1.0))
    try:
        return torch.tensor(float(spec))
    except ValueError as exc:
        raise MLError(f"--pos-weight must be 'auto', 'none' or a number, not {spec!r}") from exc


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("loss", "accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def _checkpoint_meta(cfg: TrainConfig, cache: CachedImages, fingerprint: dict, class_names: list[str],
                     positive_classes: list[str], val_metrics: dict, threshold: float,
                     split: dict, epoch: int, history: list[EpochLog], num_outputs: int = 1,
                     calibration: dict | None = None, seen_images: dict | None = None,
                     layer4_stride: int = 2, input_norm: str = "fixed", arch: str = "resnet18") -> dict[str, Any]:
    return {
        "architecture": arch, "weights_origin": weights_origin(cfg.weights, arch),
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


# A class folder with fewer images cannot be learnt as a class of its own: the run is binary.
MIN_CLASS_IMAGES = 10


def multi_class(cfg: TrainConfig, class_names: list[str], classes: torch.Tensor | None = None) -> bool:
    """Whether this run learns one output per class folder: 3+ folders, not --classes
    binary, and (given the images' ``classes``) at least MIN_CLASS_IMAGES in every folder."""
    if cfg.classes not in ("auto", "binary"):
        raise MLError(f"--classes must be 'auto' or 'binary', not {cfg.classes!r}")
    if cfg.classes == "binary" or len(class_names) < 3:
        return False
    if classes is not None:
        counts = torch.bincount(classes, minlength=len(class_names))
        if int(counts.min()) < MIN_CLASS_IMAGES:
            log.warning("a binary run: %s", ", ".join(f"{n} {c}" for c, n in zip(class_names, counts.tolist())
                                                        if n < MIN_CLASS_IMAGES) + f" (fewer than {MIN_CLASS_IMAGES} images)")
            return False
    return True


def _class_weights(classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Balanced weights n / (K * n_k): every class counts as much in the loss."""
    counts = torch.bincount(classes, minlength=n_classes).float().clamp_min(1.0)
    return counts.sum() / (n_classes * counts)


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


def _normal_target(class_names: list[str], several: bool) -> int | float:
    """The training target of a lesion-free image: the ``normal`` class, or 0 for one logit."""
    if not several:
        return 0.0
    names = [c.lower() for c in class_names]
    if "normal" not in names:
        raise MLError(f"erasing lesions needs a 'normal' class to train them as; the classes are "
                      f"{', '.join(class_names)}")
    return names.index("normal")


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
                                    arch=arch)
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


def check_config(cfg: TrainConfig) -> None:
    """The ranges the command line enforces, for a config built in Python (MLError names the option)."""
    ranges = {"mask_margin": (0, 3), "mask_weight": (0, math.inf), "erase_lesions": (0, 1), "mixstyle": (0, 1), "randconv": (0, 1), "ema": (0, 1 - 1e-12), "label_smoothing": (0, 0.5),
              "val_split": (1e-12, 1 - 1e-12), "aspect_augment": (1, 3)}
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise MLError(f"{name} {value!r} is out of range ({low:g} to {high:g})")
    from ml.model import INPUT_NORMS

    from ml import ARCHITECTURES

    choices = {"input_norm": (None, *INPUT_NORMS), "layer4_stride": (None, 1, 2), "arch": (None, *ARCHITECTURES)}
    for name, allowed in choices.items():  # before the images are read, not when the network is built
        if getattr(cfg, name) not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise MLError(f"{name} {getattr(cfg, name)!r} is not one of {shown}")


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
