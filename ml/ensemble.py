"""Combining trained networks into one ensemble checkpoint (:func:`combine`), splitting one
into its members (:func:`split_members`) and fine-tuning every member (:func:`fine_tune`).

The network itself, the mean of its members' raw outputs shaped like one ResNet, is
:class:`ml.ensemble_net.EnsembleNet` (re-exported here). Its calibration and threshold are
the ensemble's own, fitted by :func:`combine` on the members' shared validation part.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch

from ml import MLError
from ml.calibration import calibrated, fit_platt
from ml.checkpoint import (MIXED, load_checkpoint, member_architectures, model_from_payload, network_shape,
                           save_checkpoint)
from ml.ensemble_net import EnsembleNet, build_ensemble  # noqa: F401 -- re-exported for callers
from ml.hashing import file_sha256
from ml.metrics import expected_calibration_error, operating_point, summarise, threshold_for_sensitivity
from ml.model import build_model, is_ensemble_state, member_state, model_malignancy_logit, select_device  # noqa: F401
from ml.train import TrainConfig, fit, load_training_data, model_outputs, split_hash, start_meta, validation_indices

log = logging.getLogger(__name__)

# What every member must share for their outputs to be averaged and explained together.
SHARED_META = ("num_outputs", "class_names", "positive_classes", "labels", "input_size",
               "resize", "mean", "std", "layer4_stride", "input_norm")


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


def split_members(payload: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write each network of an ensemble checkpoint's ``payload`` (:func:`load_checkpoint`) to
    ``folder`` as a checkpoint of its own (the ensemble's metadata, less ``ensemble``, with the
    member's seed and epoch)."""
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
