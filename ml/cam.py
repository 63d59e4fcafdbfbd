"""What every CAM method needs before a heatmap is drawn: capturing a layer's output during a
forward pass (`LayerCapture`), choosing the layer (`auto_layer`, `resolve_layer`), the score
explained (the malignancy logit) with its closed-form gradient behind a linear head, and the
channel weights of Grad-CAM, Grad-CAM++ and Score-CAM (with Score-CAM's masked forwards on a
BatchNorm-folded copy). :mod:`ml.explain` turns these weights and the activations into
heatmaps, fuses layers and judges the maps; it re-exports every name here.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ml import MLError


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
