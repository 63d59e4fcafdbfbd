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
probability). Methods, formulas and figures: ``docs/explain.md``.
"""
from __future__ import annotations

import threading
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

METHODS = ("gradcam", "gradcam++", "scorecam")
# a fusion is named by its layers joined with "+", e.g. "layer3+layer4"
FUSION_SEPARATOR = "+"


# ---------------------------------------------------------------- hooks

class LayerCapture:
    """Records one module's output during a forward pass; its hook lives only inside ``with``.

    With ``track_grad=True`` the captured output becomes the leaf of a fresh autograd graph
    and grad mode is switched on from that layer onwards, so a backward pass stops there and
    the layers before it record nothing (run the forward under ``torch.no_grad()``; the
    previous grad mode is restored on exit).

    The hook acts only on forwards run by the thread that entered the ``with``: a worker
    with a threaded pool shares one model between threads, and another thread's forward
    must neither overwrite the capture nor have its output replaced by this one's leaf.
    """

    def __init__(self, module: nn.Module, track_grad: bool = False):
        self.module = module
        self.track_grad = track_grad
        self.activation: torch.Tensor | None = None
        self._handle = None
        self._grad_mode = True
        self._thread: int | None = None

    def __enter__(self) -> "LayerCapture":
        self._grad_mode = torch.is_grad_enabled()
        self._thread = threading.get_ident()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if threading.get_ident() != self._thread:
            return None  # another thread's forward through the shared model: not ours
        if not isinstance(output, torch.Tensor):
            raise MLError(f"target layer {type(module).__name__} does not output one tensor")
        if self.track_grad:
            torch.set_grad_enabled(True)
            output = output.detach().requires_grad_(True)
            self.activation = output
            return output  # replaces the module's output: later layers build on the leaf
        self.activation = output
        return None

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        torch.set_grad_enabled(self._grad_mode)

    def captured(self) -> torch.Tensor:
        if self.activation is None:
            raise MLError("the target layer was not used by the model's forward pass")
        return self.activation


AUTO_LAYER = "auto"
# The finest last-stage grid worth explaining at layer4; below it "auto" picks layer2.
AUTO_MIN_GRID = 8


def auto_layer(model: nn.Module, input_size: int) -> str:
    """What ``EXPLAIN_LAYER=auto`` explains for a model at ``input_size``: ``layer4`` when its
    grid is at least AUTO_MIN_GRID cells a side (a layer4-stride-1 model at 128 px gives 8;
    Grad-CAM there needs no backward pass), else ``layer2`` (16 x 16 at 128 px)."""
    stride = 16 if getattr(model, "layer4_stride", 2) == 1 else 32
    return "layer4" if input_size // stride >= AUTO_MIN_GRID else "layer2"


def resolve_layer(model: nn.Module, target_layer: str | nn.Module | None) -> nn.Module:
    """The module to explain: a module, a dotted name from ``model.named_modules()``, or
    None for the last block of ``layer4``."""
    if isinstance(target_layer, nn.Module):
        return target_layer
    if target_layer is None:
        if isinstance(getattr(model, "layer4", None), nn.Sequential):
            return model.layer4[-1]
        raise MLError("model has no layer4: name the target layer")
    modules = dict(model.named_modules())
    name = target_layer
    if name not in modules:
        close = [n for n in modules if n and n.split(".")[0] == name.split(".")[0]][:8]
        raise MLError(f"model has no layer {name!r}" + (f" (e.g. {', '.join(close)})" if close else ""))
    return modules[name]


def _analytic_head_weight(model: nn.Module, layer: nn.Module) -> torch.Tensor | None:
    """fc weight (K x C) if ``layer``'s output goes straight into a global average pool and a
    linear layer (torchvision ResNet), else None.

    Then z_k = sum_c W_kc * mean_hw A_c + b_k, so d z_k / d A_c[h, w] = W_kc / (H * W) at
    every position, and the malignancy logit's gradient is (dm/dz) W / (H * W): known
    without a backward pass (see :func:`_score_gradient_rows`).
    """
    from torchvision.models import ResNet

    if getattr(model, "is_ensemble", False):  # ml.ensemble.EnsembleNet: its head is linear too
        return model.fc.weight if layer in (model.layer4, model.layer4[-1]) else None
    if not isinstance(model, ResNet) or type(model).forward is not ResNet.forward \
            or type(model)._forward_impl is not ResNet._forward_impl:
        return None
    if type(model.layer4) is not nn.Sequential or layer not in (model.layer4, model.layer4[-1]):
        return None
    pool, fc = model.avgpool, model.fc
    size = pool.output_size if isinstance(pool, nn.AdaptiveAvgPool2d) else None
    if size not in (1, (1, 1)) or not isinstance(fc, nn.Linear):
        return None
    return fc.weight


# ---------------------------------------------------------------- CAM formulas

def _logits(output: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The score every method explains: the malignancy logit (the logit itself for a
    one-logit model; log-odds of the malignant classes for a multi-class one)."""
    from ml.model import model_malignancy_logit

    if output.ndim != 2:
        raise MLError(f"explain needs an N x K output; output shape is {tuple(output.shape)}")
    return model_malignancy_logit(model, output)


def _score_gradient_rows(output: torch.Tensor, model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """d(malignancy logit)/d(pooled features) per image (N x C) for a linear head ``weight``.

    dm/dz_k is the softmax share of class k within the malignant classes (positive) or
    within the others (negative); one logit gives dm/dz = 1 and the row is the weight itself.
    """
    if output.shape[1] == 1:
        return weight.float().expand(output.shape[0], -1)
    positive = torch.zeros(output.shape[1], dtype=torch.bool, device=output.device)
    positive[list(model.positive_outputs)] = True
    z = output.float()
    dm = torch.where(positive, torch.softmax(z.masked_fill(~positive, float("-inf")), dim=1),
                     -torch.softmax(z.masked_fill(positive, float("-inf")), dim=1))
    return dm @ weight.float()


def gradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM channel weights (Selvaraju et al. 2017): spatial mean of d score / d A."""
    return gradients.mean(dim=(2, 3))


def gradcampp_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, closed form for Y = exp(S)).

    alpha_ij = g^2 / (2 g^2 + sum_ab A_ab * g^3) with g = dS/dA_ij, and
    w = sum_ij alpha_ij * relu(g_ij). The common factor exp(S) of the paper's derivatives is
    one positive number per image, which the final [0, 1] scaling removes, so it is dropped
    (it would also overflow for large logits). The closed form assumes S is piecewise linear
    in A (ReLU network), which holds exactly for the logit of a GAP + linear head.
    """
    g2 = gradients * gradients
    g3 = g2 * gradients
    total = activations.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * g2 + total * g3
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1), 0)
    return (alpha * F.relu(gradients)).sum(dim=(2, 3))


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1) - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1), 0)


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


# ---------------------------------------------------------------- Score-CAM

def folded_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the convolution before it.

    Same function (differences at float rounding, ~1e-6), fewer passes over memory: used for
    Score-CAM's hundreds of masked forwards. A model that torch.fx cannot trace is returned
    unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model).to(memory_format=torch.channels_last)
    except Exception:  # noqa: BLE001 -- untraceable control flow: run the model as it is
        return model
    # the traced copy keeps the modules, not the attributes we set on the model: which outputs
    # are malignant (a three-class head) and the layer4 stride
    for name in ("positive_outputs", "layer4_stride"):
        if hasattr(model, name):
            setattr(fused, name, getattr(model, name))
    return fused


def scorecam_channel_scores(model: nn.Module, x: torch.Tensor, activations: torch.Tensor,
                            channels: torch.Tensor, batch_size: int = 32,
                            score: str = "probability") -> torch.Tensor:
    """Score of each masked input X * s(Up(A_k)) for the (image, channel) pairs ``channels``
    (P x 2 long tensor); returns P scores.

    s() scales the upsampled map to [0, 1]; a constant map becomes the zero mask. The masked
    inputs of all images are run together in batches of ``batch_size``.
    """
    size = x.shape[-2:]
    out = torch.empty(len(channels), dtype=torch.float32, device=x.device)
    with torch.inference_mode():
        for start in range(0, len(channels), batch_size):
            pairs = channels[start:start + batch_size]
            image_idx, channel_idx = pairs[:, 0], pairs[:, 1]
            up = F.interpolate(activations[image_idx, channel_idx][:, None].float(), size=size,
                               mode="bilinear", align_corners=False)
            masks = _minmax(up[:, 0])[:, None]
            masked = (x[image_idx] * masks).contiguous(memory_format=torch.channels_last)
            logits = _logits(model(masked), model)
            out[start:start + len(pairs)] = torch.sigmoid(logits) if score == "probability" else logits
    return out


def scorecam_weights(model: nn.Module, x: torch.Tensor, activations: torch.Tensor,
                     batch_size: int = 32, score: str = "probability",
                     fold_batchnorm: bool = True) -> torch.Tensor:
    """Score-CAM channel weights (Wang et al. 2020): alpha = softmax_k(S_k) over channels,
    S_k = f(X * s(Up(A_k))) - f(X_b).

    f is the model's probability (the two-class softmax output the paper scores, which for
    one logit is its sigmoid) or, with ``score="logit"``, the raw logit. The baseline term
    f(X_b) is the same for every channel, and a softmax does not change under a shift, so it
    is not computed. Channels that are zero everywhere contribute nothing to sum alpha_k A_k
    and their share of the softmax denominator is a common positive factor that the final
    scaling removes, so they are skipped; other constant channels get the zero mask, whose
    input (all zeros) is the same for every image and is scored once.

    ``fold_batchnorm`` runs the masked forwards on :func:`folded_copy` of the model.
    """
    if score not in ("probability", "logit"):
        raise MLError(f"score must be 'probability' or 'logit', not {score!r}")
    if batch_size < 1:
        raise MLError("batch_size must be at least 1")
    n, c = activations.shape[:2]
    flat = activations.flatten(2)
    lo, hi = flat.amin(dim=2), flat.amax(dim=2)
    varying = hi > lo
    constant_nonzero = ~varying & (lo != 0)
    pairs = varying.nonzero()
    scores = torch.full((n, c), float("nan"), device=x.device)
    scorer = folded_copy(model) if fold_batchnorm and len(pairs) > batch_size else model
    scores[pairs[:, 0], pairs[:, 1]] = scorecam_channel_scores(scorer, x, activations, pairs, batch_size, score)
    if constant_nonzero.any():
        with torch.inference_mode():
            zero_logit = _logits(model(torch.zeros_like(x[:1])), model)[0]
        zero_score = torch.sigmoid(zero_logit) if score == "probability" else zero_logit
        scores = torch.where(constant_nonzero, zero_score, scores)
    # softmax over the channels that take part; the skipped all-zero ones get weight 0
    used = ~torch.isnan(scores)
    shifted = scores.masked_fill(~used, float("-inf"))
    shifted = shifted - shifted.amax(dim=1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    weights = torch.exp(shifted).masked_fill(~used, 0.0)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


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
