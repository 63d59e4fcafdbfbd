"""One-file checkpoints: weights plus everything needed to use them later.

``ml/`` reads bottom-up: the architectures (:mod:`ml.efficientnet_lite`, :mod:`ml.model`,
:mod:`ml.ensemble_net`), then this module (files to networks and back), then
:mod:`ml.train` and :mod:`ml.ensemble` (fitting and combining them). No module imports one
above it.

Loading needs no training code. Files are read with ``torch.load(weights_only=True)`` so a
foreign pickle cannot run code, and the metadata is validated before a model is built.
"""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ml import ARCHITECTURES, MLError
from ml.ensemble_net import build_ensemble
from ml.model import build_model
from ml.torchfile import CheckpointError, read_checkpoint_file

__all__ = ["CheckpointError", "read_checkpoint_file", "save_checkpoint", "load_checkpoint", "load_model",
           "model_from_payload", "network_shape", "member_architectures", "ensemble_size", "positive_outputs"]

FORMAT = "breast-review-checkpoint"
FORMAT_VERSION = 1
REQUIRED_META = (
    "architecture", "class_names", "positive_classes", "labels", "input_size", "mean", "std",
    "threshold", "threshold_default",
)


def library_versions() -> dict[str, str]:
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any], *,
                    half: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``meta`` to ``path`` atomically (write then rename).

    ``half=True`` stores floating tensors as float16 (half the size; loading casts back to
    float32). ``extra`` carries training state (optimizer, scheduler, epoch, RNG) for resuming.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta = dict(meta)
    meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("versions", library_versions())
    meta["stored_dtype"] = "float16" if half else "float32"
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "state_dict": state}
    if extra:
        payload.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the validated payload of one of our checkpoints (``meta``, ``state_dict``, ...)."""
    payload = read_checkpoint_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a breast-review checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}: upgrade the app")
    meta = payload.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has no metadata")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path} metadata lacks {', '.join(missing)}")
    try:
        member_architectures(meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    size = meta["input_size"]
    if not (isinstance(size, int) and 16 <= size <= 4096):
        raise CheckpointError(f"{path}: input_size {size!r} is not a sensible image size")
    if not 0.0 <= float(meta["threshold"]) <= 1.0:
        raise CheckpointError(f"{path}: threshold {meta['threshold']!r} is outside [0, 1]")
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise CheckpointError(f"{path}: mean/std must have three channels")
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path} holds no weights")
    return payload


def positive_outputs(meta: dict[str, Any]) -> tuple[int, ...]:
    """Indices of the malignant classes among a multi-class checkpoint's outputs."""
    names = [c.lower() for c in meta["class_names"]]
    wanted = {c.lower() for c in meta["positive_classes"]}
    return tuple(i for i, c in enumerate(names) if c in wanted)


def network_shape(meta: dict[str, Any]) -> tuple[int, tuple[int, ...] | None, int, str, str]:
    """What :func:`ml.model.build_model` needs, besides weights, to rebuild a checkpoint's
    network: (num_outputs, positive outputs, layer4 stride, input normalisation,
    architecture), with the defaults of checkpoints written before each was recorded. For a
    mixed ensemble the architecture is its first member's (:func:`member_architectures`)."""
    num_outputs = int(meta.get("num_outputs") or 1)
    positive = positive_outputs(meta) if num_outputs > 1 else None
    return (num_outputs, positive, int(meta.get("layer4_stride") or 2), meta.get("input_norm") or "fixed",
            member_architectures(meta)[0])


MIXED = "mixed"   # an ensemble's "architecture" when its members differ


def member_architectures(meta: dict[str, Any]) -> list[str]:
    """The architecture of each network a checkpoint holds (one for a single network): an
    ensemble's members record theirs (``ensemble.members[k].architecture``); older checkpoints
    and uniform ensembles take the top-level ``architecture``."""
    arch = meta.get("architecture")
    rows = (meta.get("ensemble") or {}).get("members") or []
    archs = [row.get("architecture") or arch for row in rows if isinstance(row, dict)] or [arch]
    if arch == MIXED and not rows:
        raise CheckpointError("architecture 'mixed' is only valid for an ensemble")
    for a in archs:
        if a not in ARCHITECTURES:
            raise CheckpointError(f"architecture {a!r} is not supported (known: {', '.join(ARCHITECTURES)})")
    if arch != MIXED and any(a != arch for a in archs):
        raise CheckpointError(f"architecture {arch!r} differs from the members' {archs}")
    return archs


def ensemble_size(meta: dict[str, Any]) -> int:
    """How many networks an ensemble checkpoint holds (1 for a single network)."""
    members = (meta.get("ensemble") or {}).get("members") or []
    if meta.get("ensemble") and (not isinstance(members, list) or len(members) < 2):
        raise CheckpointError("an ensemble checkpoint must list at least two members")
    return max(1, len(members))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the network described by a checkpoint, load its weights, and return (model, meta).

    The model is in eval mode, float32, on ``device``; an ensemble checkpoint gives an
    :class:`ml.ensemble_net.EnsembleNet` (its members' outputs averaged).
    """
    payload = load_checkpoint(path)
    return model_from_payload(payload, path, device), payload["meta"]


def model_from_payload(payload: dict[str, Any], path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network of a payload :func:`load_checkpoint` returned (for callers that also need
    the rest of it: one read of the file); ``path`` names it in errors."""
    meta = payload["meta"]
    try:
        shape = network_shape(meta)
        model = (build_ensemble(ensemble_size(meta), *shape[:4], archs=member_architectures(meta))
                 if meta.get("ensemble") else build_model("none", *shape))
    except MLError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {meta['architecture']} ({str(exc).splitlines()[0]})") from exc
    model.to(device).eval()
    return model
