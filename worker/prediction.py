"""The work behind `predict_case`: load the case, predict and explain, store the result.

Runs inside the Flask app context. Importing this module does not import torch; the first
prediction does.
"""
from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass

import numpy as np
from flask import current_app
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from webapp.extensions import db
from webapp.models import Case, ModelVersion, Prediction, utcnow

log = logging.getLogger(__name__)

NO_ACTIVE_MODEL = ("No active model: an admin must register one (python manage.py models "
                   "register PATH) before cases can be read. Re-run this case afterwards.")


@dataclass
class _Loaded:
    version_id: int
    checksum: str
    predictor: object


class ModelCache:
    """The active model, loaded once per worker process and replaced when the active
    version changes (checked on every task, so a promotion needs no restart)."""

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()  # threaded pools: load once, not once per thread

    def get(self, version: ModelVersion):
        """The Predictor for ``version``; raises ml.MLError when its file cannot be loaded."""
        with self._lock:
            loaded = self._loaded
            if loaded is None or loaded.version_id != version.id or loaded.checksum != version.checksum:
                import hashlib

                from ml import MLError
                from ml.inference import Predictor

                path = current_app.extensions["file_store"].path(version.file_key)
                # Never load a file that is not the one registered (swapped or damaged on
                # disk): a checkpoint is code-adjacent, and its output informs clinicians.
                digest = hashlib.sha256()
                if path.is_file():  # a missing file is the loader's to report, as before
                    with open(path, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
                if path.is_file() and digest.hexdigest() != version.checksum:
                    log.error("model version %s: %s has sha256 %s, registered %s", version.name, path,
                              digest.hexdigest(), version.checksum)
                    raise MLError("its file on disk does not match the registered checksum (sha256); it was "
                                  "replaced, truncated or damaged after registration, so it was not loaded")
                log.info("loading model version %s from %s", version.name, path)
                self._loaded = loaded = _Loaded(version.id, version.checksum, Predictor.from_checkpoint(
                    path, device=current_app.config["WORKER_DEVICE"]))
            return loaded.predictor

    @property
    def loaded_version_id(self) -> int | None:
        return self._loaded.version_id if self._loaded else None


model_cache = ModelCache()


def active_version() -> ModelVersion | None:
    return db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))


def mark_failed(case_id: int, message: str) -> None:
    """Record a failure on the case in its own transaction (after rolling back any other)."""
    db.session.rollback()
    case = db.session.get(Case, case_id)
    if case is None:
        return
    case.status = "failed"
    case.error = message
    case.finished_at = utcnow()
    db.session.commit()


def mark_retrying(case_id: int, message: str) -> None:
    """Show a case whose job will be retried as queued, with the reason. Best effort: the
    error being retried may be the database itself, and then the old status stays."""
    try:
        db.session.rollback()
        case = db.session.get(Case, case_id)
        if case is not None and case.status == "running":
            case.status, case.error = "queued", message
            db.session.commit()
    except Exception:  # noqa: BLE001 - never let the bookkeeping hide the original error
        db.session.rollback()
        log.warning("could not mark case %s as waiting for a retry", case_id)


def open_bounded(path, max_side: int) -> Image.Image:
    """Decode the stored image with its longer side at most ``max_side`` pixels.

    The model reads a few hundred pixels and the viewer scales the heatmap onto the
    image, so full resolution only costs memory: a 6300 x 6300 image drawn at full size
    (RGB, heatmap, overlay) takes gigabytes. JPEG decodes at 1/2, 1/4 or 1/8 scale
    directly (draft); PNG cannot, so it is decoded and reduced at once, before anything
    else is made from it.
    """
    img = Image.open(path)
    try:
        if max_side and max(img.size) > max_side:
            if img.format == "JPEG":
                scale = max_side / max(img.size)
                img.draft(img.mode, (max(1, int(img.width * scale)), max(1, int(img.height * scale))))
            img.load()
            if img.mode.startswith("I;16"):
                # 16-bit: widened to 32-bit integers (what reduce() takes) and reduced before
                # its range is stretched to 8 bits, so the float conversion runs on the small
                # image (at 6300 x 6300 it took 1.7 GB at full size).
                converted = img.convert("I")
                img.close()
                img = converted
            elif img.mode not in ("L", "RGB", "RGBA", "LA", "I", "F"):  # modes reduce() cannot take
                from ml.data import to_rgb

                converted = to_rgb(img)
                img.close()
                img = converted
            factor = max(img.size) // max_side
            if factor > 1:  # integer box reduction: fast and needs no full-size copy
                reduced = img.reduce(factor)
                img.close()
                img = reduced
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.BILINEAR)
        else:
            img.load()
    except BaseException:
        img.close()
        raise
    return img


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: these PNGs are written once per case, on the job's critical path.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _coloured(heatmap: np.ndarray) -> Image.Image:
    """The heatmap as a transparent colour layer (RGBA) for the page's opacity slider: low
    values let the image through; the hottest region is outlined where configured."""
    from ml.render import coloured_heatmap

    return coloured_heatmap(heatmap, outline=current_app.config.get("HEATMAP_OUTLINE", True))


def predict_case(case_id: int) -> str:
    """Predict and explain one case with the active model; return the case's final status.

    Idempotent: a case already done for the active version is left alone, and a re-run
    updates the one Prediction row per (case, model version). Errors a user or admin can
    fix (no active model, bad checkpoint, unreadable image) fail the case with a message;
    other exceptions propagate so that the task can retry them.
    """
    from ml import MLError

    case = db.session.get(Case, case_id)
    if case is None:
        log.warning("case %s no longer exists; nothing to do", case_id)
        return "missing"
    version = active_version()
    if version is None:
        mark_failed(case_id, NO_ACTIVE_MODEL)
        return "failed"
    existing = db.session.scalar(select(Prediction).where(
        Prediction.case_id == case_id, Prediction.model_version_id == version.id))
    if existing is not None and case.status == "done":
        return "done"  # a duplicate delivery of a finished job

    case.status, case.started_at, case.error = "running", utcnow(), None
    case.attempts += 1
    db.session.commit()

    cfg = current_app.config
    store = current_app.extensions["file_store"]
    try:
        predictor = model_cache.get(version)
    except MLError as exc:
        mark_failed(case_id, f"The active model {version.name} could not be loaded: {exc}. "
                             "An admin must register a working model; then re-run this case.")
        return "failed"
    try:
        with open_bounded(store.path(case.image_key), cfg["WORKER_IMAGE_MAX_SIDE"]) as img:
            from ml.explain import explain_images

            result = explain_images(predictor, [img], method=cfg["EXPLAIN_METHOD"],
                                    target_layer=cfg.get("EXPLAIN_LAYER") or None,
                                    outline=cfg.get("HEATMAP_OUTLINE", True),
                                    border_warning_at=cfg["BORDER_SHARE_WARNING"])[0]
    except (MLError, OSError) as exc:
        if isinstance(exc, OSError) and not store.exists(case.image_key):
            raise  # storage not mounted (yet): transient, let the task retry
        mark_failed(case_id, f"The image could not be analysed: {exc}")
        return "failed"

    heatmap_key, _ = store.put(_png(_coloured(result.heatmap)), "heatmaps", ".png")
    overlay_key, _ = store.put(_png(result.overlay), "overlays", ".png")
    values = dict(probability=float(result.probability), label=result.label,
                  threshold=float(result.threshold), method=result.method, heatmap_key=heatmap_key,
                  overlay_key=overlay_key, faithfulness=result.faithfulness,
                  border_share=float(result.border_share), predicted_class=result.predicted_class,
                  class_probabilities=result.class_probabilities,
                  timings={k: round(float(v), 1) for k, v in result.timings.items()})
    _save(case_id, version.id, values)
    return "done"


def _save(case_id: int, version_id: int, values: dict) -> None:
    """Write the prediction and the case's result in one transaction (insert or update)."""
    for attempt in (1, 2):
        prediction = db.session.scalar(select(Prediction).where(
            Prediction.case_id == case_id, Prediction.model_version_id == version_id))
        if prediction is None:
            prediction = Prediction(case_id=case_id, model_version_id=version_id)
            db.session.add(prediction)
        for name, value in values.items():
            setattr(prediction, name, value)
        prediction.updated_at = utcnow()
        case = db.session.get(Case, case_id)
        case.status, case.error, case.finished_at = "done", None, utcnow()
        case.label, case.probability = values["label"], values["probability"]
        try:
            db.session.commit()
            return
        except IntegrityError:
            # Another worker inserted the same (case, version) row first: update that one.
            db.session.rollback()
            if attempt == 2:
                raise
