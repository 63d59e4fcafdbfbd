"""The model registry's database side: record a checkpoint as a ModelVersion, activate it.

Checking that a file really is a usable checkpoint needs torch, so callers (the
`manage.py models` commands) do that with `ml/` and hand the checkpoint's metadata here.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from flask import current_app
from sqlalchemy import select, update

from webapp.extensions import db
from webapp.models import AuditEvent, ModelVersion, User, audit, utcnow

# Bulky training records stay in the checkpoint file, not in every registry row.
_META_LEFT_OUT = ("history", "skipped_files", "split")


class RegistryError(ValueError):
    """A registration or activation that cannot be done; the message says why."""


# Names appear in URLs (/admin/models/<name>) and file names: no "/", spaces or controls.
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_version_name(name: str) -> None:
    """Raise RegistryError unless ``name`` is 1-64 letters, digits, '.', '_' or '-',
    starting with a letter or digit."""
    if not _VERSION_NAME.fullmatch(name or ""):
        raise RegistryError(f"the version name {name!r} is not allowed: use 1 to 64 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit")


def _metrics(meta: dict[str, Any]) -> dict[str, float]:
    """The validation figures at the operating threshold, flat, numbers only."""
    val = meta.get("val_metrics") or {}
    source = val.get("at_threshold", val) if isinstance(val, dict) else {}
    return {k: float(v) for k, v in source.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fingerprint(meta: dict[str, Any]) -> str | None:
    value = meta.get("data_fingerprint")
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) == 64 else hashlib.sha256(text.encode()).hexdigest()


def register_model_version(path: str | Path, meta: dict[str, Any], *, name: str | None = None,
                           activate: bool = False, notes: str | None = None,
                           actor: User | None = None, parent: ModelVersion | None = None) -> ModelVersion:
    """Copy a checked checkpoint into the file store and record it (one transaction).

    ``meta`` is the checkpoint's metadata as `ml` read it. The same file twice is refused
    (RegistryError naming the existing version). With ``activate`` it becomes the version
    workers use from their next task.
    """
    if name is not None:
        check_version_name(name)
    data = Path(path).read_bytes()
    checksum = hashlib.sha256(data).hexdigest()
    existing = db.session.scalar(select(ModelVersion).where(ModelVersion.checksum == checksum))
    if existing is not None:
        raise RegistryError(f"this file is already registered as version {existing.name}")
    count = db.session.scalar(select(db.func.count()).select_from(ModelVersion))
    name = name or f"v{count + 1}"
    if db.session.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
        raise RegistryError(f"a version named {name!r} already exists")
    key, _ = current_app.extensions["file_store"].put(data, "models", ".pt")
    version = ModelVersion(
        name=name, file_key=key, checksum=checksum, threshold=float(meta["threshold"]),
        input_size=meta.get("input_size"), metrics=_metrics(meta),
        meta=json.loads(json.dumps({k: v for k, v in meta.items() if k not in _META_LEFT_OUT}, default=str)),
        notes=notes, registered_by_id=actor.id if actor else None,
        parent_id=parent.id if parent else None, data_fingerprint=_fingerprint(meta))
    db.session.add(version)
    db.session.flush()
    audit("model.register", actor=actor, target=version, checksum=checksum)
    if activate:
        _activate(version, actor)
    db.session.commit()
    return version


def _activate(version: ModelVersion, actor: User | None, rollback: bool = False) -> None:
    previous = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    # Clear first and flush: the one-active unique index must never see two.
    db.session.execute(update(ModelVersion).where(ModelVersion.is_active.is_(True)).values(is_active=False))
    db.session.flush()
    version.is_active = True
    version.activated_at = utcnow()
    extra = {"rollback": True} if rollback else {}
    audit("model.activate", actor=actor, target=version, previous=previous.name if previous else None, **extra)


def activate_version(version: ModelVersion, actor: User | None = None) -> None:
    """Make ``version`` the active one (the previous active version is kept, inactive)."""
    if version.is_active:
        return
    _activate(version, actor)
    db.session.commit()


def find_version(name_or_id: str) -> ModelVersion | None:
    version = db.session.scalar(select(ModelVersion).where(ModelVersion.name == name_or_id))
    if version is None and name_or_id.isdigit():
        version = db.session.get(ModelVersion, int(name_or_id))
    return version


def gate_refusal(version: ModelVersion) -> list[str] | None:
    """The promotion gate's reasons if ``retrain`` registered ``version`` without promoting
    it (refused, or ``--promote never``); None when no gate stands against it."""
    promotion = (version.meta or {}).get("promotion") or {}
    if promotion.get("promote") is False:
        return list(promotion.get("reasons") or ["refused by the promotion gate"])
    return None


def promote(name_or_id: str, actor: User | None = None, force: bool = False) -> ModelVersion:
    """Make a registered version active by hand (audited); RegistryError if unknown.

    A version the promotion gate did not promote needs ``force``; without it the error
    lists the gate's reasons. The override and those reasons are audited.
    """
    version = find_version(name_or_id)
    if version is None:
        raise RegistryError(f"no model version {name_or_id!r}; see 'manage.py models list'")
    if version.is_active:
        raise RegistryError(f"{version.name} is already the active model")
    refused = gate_refusal(version)
    if refused and not force:
        raise RegistryError(f"{version.name} was not promoted by the promotion gate ({'; '.join(refused)}); "
                            "promote it anyway with --force")
    previous = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    details = {"gate_overridden": refused} if refused else {}
    audit("model.promote", actor=actor, target=version, mode="manual", previous=previous.name if previous else None,
          **details)
    activate_version(version, actor)
    return version


def activation_history() -> list[ModelVersion]:
    """The versions that are active, then were active before, newest first, as rollbacks
    see it: each rollback removes the version it rolled back from, so rolling back twice
    walks two steps back instead of returning to where it started."""
    events = db.session.scalars(select(AuditEvent).where(
        AuditEvent.action == "model.activate", AuditEvent.target_type == "model_version")
        .order_by(AuditEvent.id)).all()
    stack: list[int] = []
    for event in events:
        if (event.details or {}).get("rollback") and stack:
            stack.pop()  # the version rolled back from
            if stack and stack[-1] == event.target_id:
                continue
        if stack and stack[-1] == event.target_id:
            continue
        previous = find_version((event.details or {}).get("previous") or "") if not stack else None
        if previous is not None:  # active before any recorded activation (set by hand)
            stack.append(previous.id)
        stack.append(event.target_id)
    versions = [db.session.get(ModelVersion, i) for i in reversed(stack)]
    return [v for v in versions if v is not None]


def rollback(actor: User | None = None) -> ModelVersion:
    """Make the version that was active before the current one active again (audited)."""
    active = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    if active is None:
        raise RegistryError("no model is active, so there is nothing to roll back")
    history = activation_history()
    earlier = [v for v in history[1:] if v.id != active.id] if history and history[0].id == active.id else []
    if not earlier:
        raise RegistryError(f"{active.name} has no earlier active version to roll back to")
    previous = earlier[0]
    audit("model.rollback", actor=actor, target=previous, from_version=active.name)
    _activate(previous, actor, rollback=True)
    db.session.commit()
    return previous
