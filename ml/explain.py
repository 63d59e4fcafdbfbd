"""Where the model looked: Grad-CAM, Grad-CAM++ and Score-CAM heatmaps with the prediction.

Two levels:

* :func:`explain` -- tensors in, tensors out: ``(probabilities, heatmaps)`` for a normalised
  batch, heatmaps in [0, 1] at the input resolution. The probability and the Grad-CAM /
  Grad-CAM++ map come from one forward pass.
* :func:`explain_images` -- what the worker calls: a :class:`~ml.inference.Predictor` and
  images (paths or PIL) in, one :class:`ExplanationResult` per image out, with the heatmap
  at the original image size, a colour overlay, a grayscale heatmap image, a faithfulness
  score (deletion test) and the share of heatmap mass in the border band.

The explained score is the model's single logit (the "cancer" score; its sigmoid is the
probability). Methods, formulas and figures: ``docs/explain.md``. The layer hooks, the
choice of layer and each method's channel weights are :mod:`ml.cam` (re-exported here);
this module weights the activations into maps and everything after.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ml import MLError
from ml.cam import (AUTO_LAYER, LayerCapture, _analytic_head_weight, _logits, _minmax, _score_gradient_rows,
                    auto_layer, gradcam_weights, gradcampp_weights, resolve_layer, scorecam_weights)
from ml.cam import AUTO_MIN_GRID, folded_copy, scorecam_channel_scores  # noqa: F401 (re-exported)

METHODS = ("gradcam", "gradcam++", "scorecam")
# a fusion is named by its layers joined with "+", e.g. "layer3+layer4"
FUSION_SEPARATOR = "+"


# ---------------------------------------------------------------- maps from channel weights

def cam_grid(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c w_c A_c) at the layer's own grid (N x h x w)."""
    return F.relu(torch.einsum("nc,nchw->nhw", weights.float(), activations.float()))


def scale_cam(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A grid of CAM values upsampled (bilinear) to ``size`` and scaled to [0, 1] per image."""
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(cam)


def weighted_cam(weights: torch.Tensor, activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU(sum_c w_c A_c) upsampled (bilinear) to ``size`` and scaled to [0, 1] per image."""
    return scale_cam(cam_grid(weights, activations), size)


# ---------------------------------------------------------------- entry point

@torch.no_grad()
def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
            target_layer: str | nn.Module | None = None, *, analytic_gradient: bool = True,
            scorecam_batch_size: int = 32, scorecam_score: str = "probability",
            fold_batchnorm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and heatmaps for a normalised batch ``images`` (N x 3 x H x W).

    Returns ``(probabilities, heatmaps)``: N sigmoid probabilities (float32) and N x H x W
    heatmaps in [0, 1] at the input resolution (an all-zero map when the CAM is zero
    everywhere). ``method`` is ``gradcam``, ``gradcam++`` or ``scorecam`` (exact: every
    channel scored).
    ``target_layer`` is a module, a dotted module name (``"layer3"``, ``"layer4.0.conv2"``),
    None for the last block of layer4, or a fusion of names joined by ``+``
    (``"layer3+layer4"``: see :func:`explain_fused`), or ``"auto"`` (:func:`auto_layer` at the
    batch's input size).

    Probabilities and Grad-CAM/Grad-CAM++ maps come from one forward pass. When the target
    feeds a global-average-pool + one-logit linear head (ResNet's layer4), the gradient is
    the closed form fc.weight / (H * W) and no backward pass runs (``analytic_gradient=False``
    forces autograd, for checking); for other layers autograd runs from the target layer on.
    Score-CAM's masked forwards run on a BatchNorm-folded copy (``fold_batchnorm``).
    The model must be in eval mode; it is not modified.
    """
    if method not in METHODS:
        raise MLError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if model.training:
        raise MLError("explain needs the model in eval mode (call model.eval())")
    if images.ndim != 4:
        raise MLError(f"images must be a N x C x H x W batch, not shape {tuple(images.shape)}")
    if target_layer == AUTO_LAYER:
        target_layer = auto_layer(model, int(images.shape[-1]))
    if isinstance(target_layer, str) and FUSION_SEPARATOR in target_layer:
        return explain_fused(model, images, method, target_layer.split(FUSION_SEPARATOR),
                             analytic_gradient=analytic_gradient, scorecam_batch_size=scorecam_batch_size,
                             scorecam_score=scorecam_score, fold_batchnorm=fold_batchnorm)
    layer = resolve_layer(model, target_layer)
    device = next(model.parameters()).device
    x = images.to(device=device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    size = tuple(x.shape[-2:])
    head = _analytic_head_weight(model, layer) if analytic_gradient else None

    if method.startswith("scorecam") or head is not None:
        with torch.inference_mode(), LayerCapture(layer) as capture:
            output = model(x)
            logits = _logits(output, model)
            activations = capture.captured()
        rows = _score_gradient_rows(output, model, head) if head is not None else None
        if method.startswith("scorecam"):
            weights = scorecam_weights(model, x, activations, scorecam_batch_size, scorecam_score,
                                       fold_batchnorm=fold_batchnorm)
            return torch.sigmoid(logits), weighted_cam(weights, activations, size)
        h, w = activations.shape[-2:]
        gradients = (rows / (h * w))[:, :, None, None].expand(activations.shape)
    else:
        with torch.inference_mode(False), LayerCapture(layer, track_grad=True) as capture:
            logits = _logits(model(x), model)
            activations = capture.captured()
            # each image's logit depends only on its own activations (eval mode), so one
            # backward of the sum gives every image's gradient
            (gradients,) = torch.autograd.grad(logits.sum(), activations)
        logits, activations = logits.detach(), activations.detach()
    combine = gradcam_weights if method == "gradcam" else gradcampp_weights
    weights = combine(activations.float(), gradients.float())
    return torch.sigmoid(logits), weighted_cam(weights, activations, size)


def explain_fused(model: nn.Module, images: torch.Tensor, method: str, layers: Sequence[str],
                  **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the [0, 1] maps of several layers (e.g. ``["layer3", "layer4"]``), rescaled to
    [0, 1]: the finer layer's grid with the coarser layer's emphasis.

    Each layer is explained by :func:`explain` on its own (one forward, plus a partial
    backward for a layer without the closed-form gradient, per layer); the probabilities
    are those of the first run, identical for every layer.
    """
    names = [name.strip() for name in layers]
    if len(names) < 2 or not all(names):
        raise MLError(f"a fusion needs two or more layer names joined by {FUSION_SEPARATOR!r}, "
                      f"not {FUSION_SEPARATOR.join(layers)!r}")
    probabilities, total = None, None
    for name in names:
        p, maps = explain(model, images, method, name, **options)
        probabilities = p if probabilities is None else probabilities
        total = maps if total is None else total + maps
    return probabilities, _minmax(total / len(names))


# ---------------------------------------------------------------- faithfulness and border

@dataclass(frozen=True)
class Faithfulness:
    """Deletion test of one heatmap: see :func:`deletion_test`."""

    score: float          # drop_top - drop_random
    drop_top: float       # probability drop with the top-``fraction`` of the heatmap removed
    drop_random: float    # mean drop with random blob-shaped regions of the same area removed


def _top_fraction_masks(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean masks marking the ``fraction`` of pixels with the highest value in each map."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    top = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view_as(maps)


def deletion_test(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor,
                  probabilities: torch.Tensor, fraction: float = 0.2, n_random: int = 3,
                  random_grid: int = 7, seed: int = 0, batch_size: int = 32) -> list[Faithfulness | None]:
    """Deletion test per image: how much the probability falls when the most-highlighted
    ``fraction`` of the pixels is replaced by the image's mean colour, against the mean fall
    when ``n_random`` random regions of the same area are replaced instead.

    ``score = drop_top - drop_random`` with ``drop = p(original) - p(with region removed)``.
    It is in [-1, 1]: clearly positive means the highlighted region matters more to the
    prediction than an arbitrary one of its size; near zero or negative means the heatmap
    explains little. Random regions are the top ``fraction`` of a smooth random field (noise
    on a ``random_grid`` square grid, upsampled), so they are blobs like a CAM's, not
    scattered pixels; ``seed`` makes the score repeatable. Images whose heatmap is constant
    get None. All extra forwards run in batches of ``batch_size``.
    """
    if not 0.0 < fraction < 1.0:
        raise MLError("fraction must be between 0 and 1")
    device = next(model.parameters()).device
    x = images.to(device=device, dtype=torch.float32)
    n, _, h, w = x.shape
    maps = heatmaps.to(device).float()
    generator = torch.Generator().manual_seed(seed)
    # the same random regions for every image, so a score does not depend on batch position
    noise = torch.rand(n_random, 1, random_grid, random_grid, generator=generator).to(device)
    fields = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    random_masks = _top_fraction_masks(fields, fraction).repeat(n, 1, 1)
    masks = torch.cat([_top_fraction_masks(maps, fraction), random_masks])
    source = torch.cat([x, x.repeat_interleave(n_random, dim=0)])
    fill = source.mean(dim=(2, 3), keepdim=True).expand_as(source)
    removed = torch.where(masks[:, None], fill, source).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        probs = torch.cat([torch.sigmoid(_logits(model(removed[i:i + batch_size]), model))
                           for i in range(0, len(removed), batch_size)])
    base = probabilities.to(device).float()
    drop_top = base - probs[:n]
    drop_random = (base.repeat_interleave(n_random) - probs[n:]).view(n, n_random).mean(dim=1)
    flat = maps.reshape(n, -1)
    constant = (flat.amax(dim=1) == flat.amin(dim=1)).tolist()
    return [None if constant[i] else
            Faithfulness(float(drop_top[i] - drop_random[i]), float(drop_top[i]), float(drop_random[i]))
            for i in range(n)]


def border_share(heatmap: np.ndarray, width: float = 0.1) -> float:
    """Share of the heatmap's total mass lying in the outer band of the image.

    The band is ``width`` of the height at the top and bottom and ``width`` of the width at
    the left and right (at least one pixel each when width > 0). 0 for an all-zero heatmap. A
    uniform heatmap gives the band's share of the area (0.36 for width 0.1); values well
    above that mean the model looked at the margins, where ultrasound exports carry text and
    caliper marks.
    """
    if not 0.0 <= width < 0.5:
        raise MLError("border width must be in [0, 0.5)")
    heatmap = np.asarray(heatmap, dtype=np.float64)
    total = heatmap.sum()
    if total <= 0:
        return 0.0
    h, w = heatmap.shape
    bh = 0 if width == 0 else max(1, int(round(width * h)))
    bw = 0 if width == 0 else max(1, int(round(width * w)))
    inner = heatmap[bh:h - bh, bw:w - bw].sum()
    return float(np.clip((total - inner) / total, 0.0, 1.0))


# ---------------------------------------------------------------- worker-facing API

@dataclass
class ExplanationResult:
    """Prediction and explanation of one image, at the image's original size."""

    probability: float                 # calibrated probability of malignancy (as Predictor.predict)
    label: str                         # predictor.label_for(probability)
    threshold: float                   # operating threshold the label used
    heatmap: np.ndarray                # float32 H x W in [0, 1], original image size
    overlay: Image.Image               # RGB, heatmap blended on the original image
    heatmap_image: Image.Image         # 'L' grayscale of ``heatmap``
    faithfulness: float | None         # deletion-test score (drop_top - drop_random), or None
    border_share: float                # share of heatmap mass in the border band, [0, 1]
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per image
    method: str = "gradcam"
    drop_top: float | None = None      # parts of the faithfulness score
    drop_random: float | None = None
    border_warning: bool = False       # border_share >= the border_warning_at option
    predicted_class: str | None = None                 # multi-class models: the most likely class
    class_probabilities: dict[str, float] | None = None


def explain_images(predictor: Any, images: Sequence[str | Path | Image.Image], method: str = "gradcam", *,
                   target_layer: str | None = None, batch_size: int = 8,
                   colormap: str = "viridis", opacity: float = 0.45, outline: bool = False,
                   faithfulness: bool = True, deletion_fraction: float = 0.2, n_random: int = 3,
                   border_width: float = 0.1, border_warning_at: float = 0.5,
                   scorecam_batch_size: int = 32) -> list[ExplanationResult]:
    """Predict and explain each image with ``predictor`` (an :class:`ml.inference.Predictor`).

    Images are paths or PIL images (DataError names an unreadable one), preprocessed exactly
    as ``predictor.predict`` does, so ``probability`` equals its prediction. Returns one
    :class:`ExplanationResult` per image, in order, with the heatmap, overlay and grayscale
    heatmap at the original size; the overlay is drawn by :func:`ml.render.overlay` (low
    values transparent; ``outline`` marks the hottest region). ``faithfulness=False`` skips the deletion test (its
    forwards cost about ``1 + n_random`` predictions per image) and leaves it None.
    ``target_layer="auto"`` picks the layer by :func:`auto_layer` (as :func:`explain` does).
    ``timings`` holds milliseconds per image for ``preprocess``, ``predict_explain``,
    ``faithfulness`` and ``render`` (batch stages shared equally among the batch).
    """
    from ml.data import load_image
    from ml.render import heatmap_image, overlay, resize_heatmap

    model = predictor.model
    results: list[ExplanationResult] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        n = len(chunk)
        t0 = time.perf_counter()
        originals = [load_image(im) for im in chunk]
        batch = predictor.to_batch(originals)
        t1 = time.perf_counter()
        first_output: list[torch.Tensor] = []  # the head's output of the first (unmasked) forward
        hook = model.fc.register_forward_hook(
            lambda _m, _i, out: None if first_output else first_output.append(out.detach().float()))
        try:
            probs, maps = explain(model, batch, method, target_layer, scorecam_batch_size=scorecam_batch_size)
        finally:
            hook.remove()
        t2 = time.perf_counter()
        output = first_output[0]
        shown = predictor.calibrated(output).tolist()  # what the page shows
        classes = predictor.classes_of(output)
        tests: list[Faithfulness | None] = [None] * n
        if faithfulness:
            tests = deletion_test(model, batch, maps, probs, deletion_fraction, n_random)
        t3 = time.perf_counter()
        shared = {"preprocess": (t1 - t0) * 1e3 / n, "predict_explain": (t2 - t1) * 1e3 / n,
                  "faithfulness": (t3 - t2) * 1e3 / n}
        maps_np = maps.cpu().numpy()
        for original, p, (cls, dist), hm, test in zip(originals, shown, classes, maps_np, tests):
            t4 = time.perf_counter()
            full = resize_heatmap(hm, original.size, predictor.resize)
            share = border_share(full, border_width)
            result = ExplanationResult(
                probability=p, label=predictor.label_for(p), threshold=float(predictor.threshold),
                heatmap=full, overlay=overlay(original, full, colormap, opacity, outline),
                heatmap_image=heatmap_image(full),
                faithfulness=None if test is None else test.score, border_share=share,
                method=method, drop_top=None if test is None else test.drop_top,
                drop_random=None if test is None else test.drop_random,
                border_warning=share >= border_warning_at, predicted_class=cls, class_probabilities=dist)
            result.timings = {**shared, "render": (time.perf_counter() - t4) * 1e3}
            results.append(result)
    return results
