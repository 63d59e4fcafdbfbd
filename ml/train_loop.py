"""The optimisation inside one training run, on tensors already in memory: seeding, the
warm-up + cosine learning-rate schedule, the lesion-attention loss (class directions and the
share of the activation map outside the lesion), MixStyle hooks, `train_one_epoch` (one
augmented pass with its optimizer steps) and the evaluation passes (`model_outputs`,
`evaluate`, `evaluate_logits`). It knows nothing of folders, splits or checkpoints: that is
:mod:`ml.train`, which calls these and re-exports them.
"""
from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.augment import augment_batch, erase_lesions, mix_styles, random_convolution, scanner_shift
from ml.data import IMAGENET_MEAN, IMAGENET_STD, normalise
from ml.model import features_and_logits, model_malignancy_logit


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
