"""Several trained networks as one model: the mean of their raw outputs. Members may differ
in architecture (ResNet18 beside EfficientNet-Lite0): both expose the same stages.

Independently trained networks make partly independent mistakes, and on a hospital none of
them saw, the mean of two ranks cases better than either one (docs/model-quality.md). The
ensemble is built to look like one ResNet to the rest of the code: its stages (``conv1``,
``layer1`` .. ``layer4``) run every member side by side on its own share of the channels, and
its ``fc`` averages the members' heads. So:

* ``features_and_logits`` gives layer4's activations of all members, concatenated
  (N x 512M x h x w), and the output is ``fc(mean_hw A)`` as for one ResNet;
* Grad-CAM at ``layer4`` explains the ensemble's own malignancy score: since that score is the
  mean of the members' logits, the map is the members' maps, each weighted by its share of
  the score, added before the ReLU; the closed-form head gradient still applies;
* a checkpoint stores the members as ``members.K.<resnet key>`` and its metadata says
  ``ensemble: {"members": [...]}``; calibration and threshold are the ensemble's own, fitted
  by :func:`combine` on the members' shared validation part.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ml import MLError
from ml.calibration import calibrated, fit_platt
from ml.checkpoint import MIXED, load_checkpoint, member_architectures, model_from_payload, save_checkpoint
from ml.hashing import file_sha256
from ml.metrics import expected_calibration_error, operating_point, summarise, threshold_for_sensitivity

log = logging.getLogger(__name__)

# What every member must share for their outputs to be averaged and explained together.
SHARED_META = ("num_outputs", "class_names", "positive_classes", "labels", "input_size",
               "resize", "mean", "std", "layer4_stride", "input_norm")


class _SideBySide(nn.Module):
    """One stage of every member, each on its own share of the input channels (``sizes``: the
    previous stage's output channels of each member; or, for the stem, each on the whole
    image); the outputs are concatenated along the channels.

    The members' modules are owned (and saved) by :class:`EnsembleNet`'s ``members``; they
    are kept here in a plain list so that they are not registered (and saved) twice."""

    def __init__(self, parts: Sequence[nn.Module], sizes: Sequence[int] | None = None):
        super().__init__()
        self.parts = list(parts)
        self.sizes = list(sizes) if sizes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x] * len(self.parts) if self.sizes is None else x.split(self.sizes, dim=1)
        return torch.cat([part(chunk) for part, chunk in zip(self.parts, inputs)], dim=1)


class _MeanHead(nn.Module):
    """The members' linear heads averaged: ``mean_k fc_k(pooled_k)``, which is one linear layer
    with the members' weights side by side divided by their number (``weight``)."""

    def __init__(self, heads: Sequence[nn.Linear]):
        super().__init__()
        self.parts = list(heads)
        self.in_features = sum(h.in_features for h in heads)
        self.out_features = heads[0].out_features

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([h.weight for h in self.parts], dim=1) / len(self.parts)

    @property
    def bias(self) -> torch.Tensor:
        return torch.stack([h.bias for h in self.parts]).mean(dim=0)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        chunks = pooled.split([h.in_features for h in self.parts], dim=1)
        return torch.stack([h(c) for h, c in zip(self.parts, chunks)]).mean(dim=0)


class EnsembleNet(nn.Module):
    """Member networks whose raw outputs are averaged, shaped like one ResNet (module doc)."""

    is_ensemble = True

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise MLError("an ensemble needs at least two members")
        strides = {getattr(m, "layer4_stride", 2) for m in members}
        heads = {m.fc.out_features for m in members}
        if len(strides) > 1 or len(heads) > 1:
            raise MLError("ensemble members must share the layer4 stride and the number of outputs")
        self.members = nn.ModuleList(members)
        self.conv1 = _SideBySide([nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool) for m in members])
        # features_and_logits applies bn1, relu and maxpool after conv1: here the stem did
        self.bn1, self.relu, self.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
        channels = _stage_channels(members)
        for k, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            setattr(self, name, nn.Sequential(_SideBySide([getattr(m, name) for m in members], channels[k])))
        self.architectures = [getattr(m, "architecture", "resnet18") for m in members]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = _MeanHead([m.fc for m in members])
        self.layer4_stride = strides.pop()
        positive = getattr(members[0], "positive_outputs", None)
        if positive is not None:
            self.positive_outputs = positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ml.model import features_and_logits

        return features_and_logits(self, x)[1]


def _stage_channels(members: Sequence[nn.Module]) -> list[list[int]]:
    """For each of layer1..layer4, each member's input channels (its previous stage's output),
    read off a tiny forward pass (the stride-2 stem needs at least a few pixels)."""
    sizes = []
    with torch.no_grad():
        for m in members:
            was_training = m.training
            m.eval()
            x, row = torch.zeros(1, 3, 64, 64), []
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            for name in ("layer1", "layer2", "layer3"):
                row.append(x.shape[1])
                x = getattr(m, name)(x)
            row.append(x.shape[1])
            m.train(was_training)
            sizes.append(row)
    return [list(col) for col in zip(*sizes)]


def build_ensemble(n_members: int, num_outputs: int, positive: tuple[int, ...] | None, stride: int,
                   input_norm: str = "fixed", archs: Sequence[str] | None = None) -> EnsembleNet:
    """An ensemble of ``n_members`` randomly initialised networks, ``archs[k]`` each (default
    all ResNet18; weights are loaded after)."""
    from ml.model import build_model

    archs = list(archs or ["resnet18"] * n_members)
    if len(archs) != n_members:
        raise MLError(f"{n_members} members but {len(archs)} architectures")
    return EnsembleNet([build_model("none", num_outputs, positive, stride, input_norm, a) for a in archs])


def _union_seen(metas: Sequence[dict[str, Any]]) -> dict[str, list[str]] | None:
    """Every image any member trained or validated on, once (the leakage guard's record)."""
    seen: dict[str, str] = {}
    for meta in metas:
        record = meta.get("seen_images")
        if not record:
            return None  # one member without a record: the ensemble cannot vouch for it
        for sha, dhash in zip(record["sha256"], record["dhash"]):
            seen.setdefault(sha, dhash)
    return {"sha256": list(seen), "dhash": list(seen.values())}


def check_members(metas: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    """MLError unless the members can be averaged: same classes, geometry and preprocessing,
    trained on the same data with the same validation part (so that the ensemble's
    calibration is fitted on images none of them trained on), none an ensemble itself."""
    if len(metas) < 2:
        raise MLError("an ensemble needs at least two member checkpoints")
    first = metas[0]
    for meta, name in zip(metas, names):
        if meta.get("ensemble"):
            raise MLError(f"{name} is already an ensemble: give its members instead")
        split = meta.get("split") or {}
        if split.get("folds") or not split.get("val_sha"):
            raise MLError(f"{name} was not trained on one train/validation split (cross-validation or an "
                          "old checkpoint): its validation part cannot be recovered")
        for key in SHARED_META:
            if meta.get(key) != first.get(key):
                raise MLError(f"{name} differs from {names[0]} in {key} ({meta.get(key)!r} against "
                              f"{first.get(key)!r}): members must share it")
        if split["val_sha"] != first["split"]["val_sha"] or \
                (meta.get("data_fingerprint") or {}) != (first.get("data_fingerprint") or {}):
            raise MLError(f"{name} was validated on other images than {names[0]}: train the members on the same "
                          "data with the same --split-seed, so that one validation part is unseen by all")


def combine(paths: Sequence[str | Path], data: str | Path, out: str | Path, *,
            target_sensitivity: float | None = None, device: str | None = None,
            half: bool | None = None, threshold_confidence: float | None = None,
            archs: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``out``: the ensemble of the member checkpoints ``paths``, with a Platt calibration
    and an operating threshold (for ``target_sensitivity``, default the members') fitted on
    their shared validation part of ``data`` (the folder they were trained on), by the
    threshold rule ``threshold_confidence`` (0: the in-sample rule; None: the members' own,
    as recorded in their metadata). ``archs``: the architectures members may have (None: any).

    Returns ``{"meta": .., "val_paths": .., "checkpoint": ..}``: the new metadata (its
    ``val_metrics`` holds the ensemble's validation figures and ``ensemble.members`` each
    member's file hash, seed, epoch and validation ROC-AUC) and the validation images.
    """
    from ml.model import model_malignancy_logit, select_device
    from ml.train import TrainConfig, load_training_data, model_outputs, split_hash, validation_indices

    paths = [Path(p) for p in paths]
    payloads = [load_checkpoint(p) for p in paths]
    metas = [p["meta"] for p in payloads]
    check_members(metas, [p.name for p in paths])
    for meta, path in zip(metas, paths):
        if archs and (meta.get("architecture") or "resnet18") not in archs:
            raise MLError(f"{path.name} is a {meta.get('architecture')} network, not one of --arch {', '.join(archs)}")
    first = metas[0]
    known = {f.name for f in fields(TrainConfig)}
    args = {k: v for k, v in (first.get("args") or {}).items() if k in known}
    cfg = TrainConfig(**dict(args, data=str(data), out=str(out), progress=False, device=device))
    prepared = load_training_data(cfg)
    val_idx = validation_indices(cfg, prepared)
    seen = set((first.get("seen_images") or {}).get("sha256") or ())
    same_images = not seen or all(file_sha256(prepared.cache.paths[i]) in seen for i in val_idx)
    if split_hash(val_idx) != first["split"]["val_sha"] or not same_images or \
            prepared.fingerprint.get("sha256") != (first.get("data_fingerprint") or {}).get("sha256"):
        raise MLError(f"{data} is not the folder the members were trained on (its validation part differs): "
                      "give that folder, with the same images")
    dev = select_device(device)
    members = [model_from_payload(payload, path, dev) for payload, path in zip(payloads, paths)]
    model = EnsembleNet(members).to(dev).eval()
    y = prepared.y[val_idx]
    # each member's raw outputs once: the ensemble's are their mean (what EnsembleNet computes)
    outputs = [model_outputs(m, prepared.cache.images[val_idx], 64, dev, first["mean"], first["std"]) for m in members]
    logits = model_malignancy_logit(model, torch.stack(outputs).mean(dim=0)).double().numpy()
    target = float(target_sensitivity if target_sensitivity is not None else first.get("target_sensitivity", 0.90))
    calibration = fit_platt(logits, y)
    probs = calibrated(logits, calibration)
    confidence = first.get("threshold_confidence") if threshold_confidence is None else threshold_confidence
    threshold = threshold_for_sensitivity(y, probs, target, confidence or None)
    at_op = operating_point(y, probs, threshold, target)
    at_op["ece"] = expected_calibration_error(y, probs)
    member_rows = []
    for path, meta, member, output in zip(paths, metas, members, outputs):
        z = model_malignancy_logit(member, output).double().numpy()
        member_rows.append({"file": path.name, "sha256": file_sha256(path), "seed": meta.get("seed"),
                            "architecture": meta.get("architecture") or "resnet18",
                            "weights_origin": meta.get("weights_origin"),
                            "epoch": meta.get("epoch"), "val_roc_auc": summarise(y, calibrated(z, None), 0.5)["roc_auc"],
                            "created_at": meta.get("created_at")})
    # the first member's record (data, split, recipe), less what belongs to one network alone
    meta = {k: v for k, v in first.items()
            if k not in ("history", "created_at", "versions", "stored_dtype", "seed", "epoch")}
    archs = {row["architecture"] for row in member_rows}
    meta.update({
        "architecture": archs.pop() if len(archs) == 1 else MIXED,
        "calibration": calibration, "threshold": threshold, "target_sensitivity": target,
        "threshold_confidence": confidence or None, "val_metrics": {"at_threshold": at_op}, "seen_images": _union_seen(metas),
        "ensemble": {"members": member_rows, "combined": "mean of the members' raw outputs",
                     "n_val": int(len(val_idx))},
    })
    if half is None:
        half = all(m.get("stored_dtype") == "float16" for m in metas)
    save_checkpoint(out, model, meta, half=half)
    log.info("ensemble of %d written to %s: validation ROC-AUC %.3f", len(paths), out, at_op["roc_auc"])
    return {"meta": meta, "val_paths": [str(prepared.cache.paths[i]) for i in val_idx], "checkpoint": str(out)}


def member_state(state: dict[str, torch.Tensor], member: int = 0) -> dict[str, torch.Tensor]:
    """One member's weights (ResNet18 keys) out of an ensemble checkpoint's state dict."""
    prefix = f"members.{member}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_ensemble_state(state: dict[str, Any]) -> bool:
    return any(k.startswith("members.") for k in state)


def split_members(payload: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write each network of an ensemble checkpoint's ``payload`` (:func:`load_checkpoint`) to
    ``folder`` as a checkpoint of its own (the ensemble's metadata, less ``ensemble``, with the
    member's seed and epoch)."""
    from ml.checkpoint import network_shape
    from ml.model import build_model

    meta = payload["meta"]
    rows = (meta.get("ensemble") or {}).get("members") or []
    if len(rows) < 2:
        raise MLError("not an ensemble checkpoint: it lists no members")
    shape = network_shape(meta)[:4]
    archs = member_architectures(meta)
    folder = Path(folder)
    written = []
    for k, row in enumerate(rows):
        network = build_model("none", *shape, archs[k])
        network.load_state_dict({key: v.float() for key, v in member_state(payload["state_dict"], k).items()})
        member_meta = {key: v for key, v in meta.items() if key not in ("ensemble", "created_at", "stored_dtype")}
        member_meta.update(seed=row.get("seed"), epoch=row.get("epoch"), architecture=archs[k],
                           weights_origin=row.get("weights_origin"))
        written.append(save_checkpoint(folder / f"member{k}.pt", network, member_meta))
    return written


def fine_tune(cfg: Any) -> dict[str, Any]:
    """``ml.train.fit(cfg)``, except that when ``cfg.weights`` is an ensemble checkpoint every
    member is fine-tuned (seed ``cfg.seed + k``, one shared split) and the results are combined
    into an ensemble at ``cfg.out``, calibrated on that split. Each member gets the whole
    ``cfg`` budget (epochs or minutes). Returns fit's summary, or for an ensemble
    ``{"members": [fit summaries], "checkpoint": .., "val_metrics": ..}``."""
    from dataclasses import replace

    from ml.train import fit, start_meta

    # the starting weights' metadata, read once and cached (fit() asks for it again)
    if not (start_meta(str(cfg.weights)).get("ensemble") or {}).get("members"):
        return fit(cfg)
    out = Path(cfg.out)
    folder = out.with_name(out.stem + ".members")
    starts = split_members(load_checkpoint(cfg.weights), folder / "start")
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    results, outs = [], []
    for k, start in enumerate(starts):
        member_out = folder / f"tuned{k}.pt"
        log.info("fine-tuning member %d of %d", k + 1, len(starts))
        results.append(fit(replace(cfg, weights=str(start), out=str(member_out), seed=cfg.seed + k,
                                   split_seed=split_seed)))
        outs.append(member_out)
    combined = combine(outs, cfg.data, out, target_sensitivity=cfg.target_sensitivity, device=cfg.device,
                       threshold_confidence=cfg.threshold_confidence)
    return {"members": results, "checkpoint": str(out), "val_metrics": combined["meta"]["val_metrics"],
            "val_paths": combined["val_paths"]}
