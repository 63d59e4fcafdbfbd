"""The classifier: torchvision's ResNet18 with a single-logit head (cancer vs normal)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from ml import MLError

ARCHITECTURE = "resnet18"


class WeightsUnavailableError(MLError):
    """Raised when the requested starting weights cannot be obtained."""


def build_model(weights: str | Path | None = "none") -> nn.Module:
    """Return ResNet18 with its 1000-way fc replaced by one logit.

    ``weights`` is ``"none"`` (random init), ``"imagenet"`` (torchvision's weights API;
    downloads once and caches under TORCH_HOME) or a path to a local file: either a
    checkpoint written by this project or a plain torchvision ResNet18 state dict.
    """
    spec = "none" if weights is None else str(weights)
    if spec == "none":
        model = models.resnet18(weights=None)
    elif spec == "imagenet":
        model = _imagenet_resnet18()
    else:
        model = models.resnet18(weights=None)
        model.fc = nn.Linear(model.fc.in_features, 1)
        _load_local_weights(model, Path(spec))
        return model
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


def _imagenet_resnet18() -> nn.Module:
    try:
        return models.resnet18(weights=models.ResNet18_Weights.IMAGENET1K_V1)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise WeightsUnavailableError(
            "could not download the ImageNet ResNet18 weights (offline?): "
            "use --weights none to start from random weights, or --weights PATH for a local "
            f"weights file ({type(exc).__name__}: {exc})"
        ) from exc


def _load_local_weights(model: nn.Module, path: Path) -> None:
    """Load backbone weights from our checkpoint or a torchvision state dict.

    A 1000-class fc from an ImageNet state dict is dropped: only the backbone carries over.
    """
    from ml.checkpoint import read_checkpoint_file

    if not path.is_file():
        raise WeightsUnavailableError(
            f"--weights: no such file {path} (use 'none', 'imagenet' or a path to a weights file)"
        )
    payload = read_checkpoint_file(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"--weights: {path} holds no ResNet18 state dict")
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    if state.get("fc.weight") is not None and state["fc.weight"].shape[0] != 1:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"--weights: {path} does not fit ResNet18 "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )


def select_device(name: str | None = None) -> torch.device:
    """CUDA when available, else CPU; ``name`` ("cpu", "cuda", "cuda:1", "mps") overrides."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MLError(f"--device {name}: CUDA is not available on this machine")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
