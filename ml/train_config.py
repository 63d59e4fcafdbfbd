"""What a training run is asked to do: `TrainConfig` (every option, stored in the checkpoint),
`check_config` (the ranges and choices the command line enforces), `EpochLog` (one epoch's
record) and what the options mean once the class folders are known: whether the run is
multi-class (`multi_class`), its loss weights and the target of a lesion-free image.
:mod:`ml.train` runs the configured training and re-exports these names.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ml import MLError

log = logging.getLogger("ml.train")  # the run's warnings keep the logger they had in ml.train


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


def _normal_target(class_names: list[str], several: bool) -> int | float:
    """The training target of a lesion-free image: the ``normal`` class, or 0 for one logit."""
    if not several:
        return 0.0
    names = [c.lower() for c in class_names]
    if "normal" not in names:
        raise MLError(f"erasing lesions needs a 'normal' class to train them as; the classes are "
                      f"{', '.join(class_names)}")
    return names.index("normal")
