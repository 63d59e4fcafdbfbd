"""Upload intake: check each image, store it by content, open a case, send the job.

Callable without HTTP: `receive_uploads` is what the upload route runs. PNG and JPEG
files are stored as they came; a DICOM file (webapp/dicom.py) is de-identified and only
the PNG derived from it is stored, so the stored file, its sha256 and everything the
worker and the export read are the same kind of thing for every upload.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import PurePath

from flask import current_app
from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from webapp import dicom
from webapp.background import is_stuck, send_case
from webapp.extensions import db
from webapp.models import Case, User, audit, utcnow
from webapp.text import clean_filename

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}


class UploadRefused(Exception):
    """The whole request is refused or cut short; ``status`` is the HTTP answer (413, 429,
    503), ``message`` says what happened to each file, ``retry_after`` in seconds or None."""

    def __init__(self, status: int, title: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.title, self.message, self.retry_after = status, title, message, retry_after


class ImageRejected(ValueError):
    """A file that is not an acceptable image; the message says why, for the uploader."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


@dataclass
class PreparedImage:
    """What is stored for one accepted file, and the case fields that describe it."""
    data: bytes  # the bytes stored: the upload itself, or the PNG derived from a DICOM
    info: ImageInfo
    name: str  # the display name (for DICOM a neutral one: intake.neutral_dicom_name)
    case_fields: dict = field(default_factory=dict)


@dataclass
class UploadOutcome:
    accepted: list[Case] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (filename, reason)
    not_queued: list[Case] = field(default_factory=list)  # stored and queued, but the broker refused (outbox)
    duplicates: list[tuple[str, Case]] = field(default_factory=list)  # (filename, the case it already is)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def inspect_image(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is a complete PNG or JPEG within the limits; raise ImageRejected."""
    if not data:
        raise ImageRejected("the file is empty")
    if len(data) > max_bytes:
        raise ImageRejected(f"the file is {_mb(len(data))}; the limit is {_mb(max_bytes)} per image")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit; a bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
                if fmt not in ACCEPTED_FORMATS:
                    raise ImageRejected(f"it is a {fmt} image; only PNG and JPEG are accepted")
                # Checked from the header, before any pixel is decoded.
                if width * height > max_pixels:
                    raise ImageRejected(
                        f"the image has {width}×{height} pixels; the limit is {max_pixels:,} pixels")
                if width < 8 or height < 8:
                    raise ImageRejected(f"the image is only {width}×{height} pixels")
                img.verify()
            # verify() checks structure but not the pixel data: decode it all once.
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("it is not an image file (PNG, JPEG or DICOM expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"the image has too many pixels (limit {max_pixels:,})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"the image is damaged or incomplete ({exc})") from None
    return ImageInfo(fmt, width, height)


def prepare_upload(filename: str | None, data: bytes) -> PreparedImage:
    """Check one uploaded file and return what to store; raise ImageRejected.

    A DICOM file (the "DICM" magic at offset 128, or a ``.dcm`` name) is de-identified and
    becomes a PNG of its image (webapp/dicom.py); the same per-image byte and pixel limits
    apply to it. Anything else must be a PNG or JPEG (`inspect_image`)."""
    cfg = current_app.config
    name = display_name(filename)
    if dicom.looks_like_dicom(data, filename):
        if len(data) > cfg["MAX_IMAGE_BYTES"]:
            raise ImageRejected(f"the file is {_mb(len(data))}; the limit is {_mb(cfg['MAX_IMAGE_BYTES'])} per image")
        try:
            image = dicom.read_dicom(data, max_pixels=cfg["MAX_IMAGE_PIXELS"],
                                     patient_key_secret=cfg.get("DICOM_PATIENT_KEY_SECRET"),
                                     uid_salt=str(cfg["SECRET_KEY"]).encode(),
                                     max_expanded_bytes=cfg["DICOM_MAX_EXPANDED_BYTES"])
        except dicom.DicomRejected as exc:
            raise ImageRejected(str(exc)) from None
        # A PACS export often names files after the patient, in more spellings than any mask
        # catches ("Doe, Janette (12.04.1961).dcm"): a DICOM upload keeps no name of its own.
        name = neutral_dicom_name(image.png)
        return PreparedImage(image.png, ImageInfo("PNG", image.width, image.height), name, {
            "source_format": "DICOM", "dicom_meta": image.meta,
            "burned_in_annotation": image.burned_in_annotation, "patient_key": image.patient_key})
    info = inspect_image(data, cfg["MAX_IMAGE_BYTES"], cfg["MAX_IMAGE_PIXELS"])
    return PreparedImage(data, info, name)


def display_name(filename: str | None) -> str:
    """The file's own name without any folder part, control or format characters (NUL,
    escapes, right-to-left override), dates or identifier-like tokens
    (:func:`mask_identifier_tokens`), for display only."""
    name = PurePath(clean_filename(filename or "").replace("\\", "/")).name.strip()
    return (mask_identifier_tokens(name) or "unnamed")[:255]


# Dates in the spellings file names use: 1961-04-12, 12.04.1961, 04/12/61, 19610412.
_DATE = re.compile(r"(?<!\d)(?:(?:19|20)\d\d[-._/]\d{1,2}[-._/]\d{1,2}|\d{1,2}[-._/]\d{1,2}[-._/](?:19|20)?\d\d"
                   r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?!\d)")
# A token (between spaces, underscores, dots, commas, brackets) that mixes letters with four
# or more digits (mrn7741xqz, MRN-7741-XQZ), or a bare number of six digits or more.
_TOKEN = re.compile(r"[^\s_.,()\[\]{}]+")


def _identifier_like(token: str) -> bool:
    digits = sum(ch.isdigit() for ch in token)
    letters = any(ch.isalpha() for ch in token)
    return (letters and digits >= 4) or (not letters and digits >= 6)


def mask_identifier_tokens(name: str) -> str:
    """``name`` with dates and identifier-like tokens replaced by "x" (the extension kept).
    Names are not guessed: a DICOM upload keeps no file name at all (:func:`neutral_dicom_name`)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not ext.isalnum() or len(ext) > 5:
        stem, dot, ext = name, "", ""
    stem = _DATE.sub("x", stem)
    stem = _TOKEN.sub(lambda m: "x" if _identifier_like(m.group()) else m.group(), stem)
    return stem + dot + ext


def neutral_dicom_name(png: bytes) -> str:
    """What a DICOM upload is called: nothing from the uploaded file name, only a short
    digest of the de-identified image (so two uploads can be told apart)."""
    return f"DICOM image {hashlib.sha256(png).hexdigest()[:8]}"


def existing_case(digest: str, uploader: User) -> Case | None:
    """The oldest case, not withdrawn, holding the same image (sha256) that ``uploader``
    may open; a case they may not see is not revealed, so theirs becomes a new case."""
    query = select(Case).where(Case.image_sha256 == digest, Case.withdrawn_at.is_(None))
    if not uploader.sees_all_cases:
        query = query.where(Case.uploader_id == uploader.id)
    return db.session.scalar(query.order_by(Case.id).limit(1))


def receive_uploads(files: list[tuple[str, bytes]], note: str | None, uploader: User, *,
                    allow_duplicate: bool = True) -> UploadOutcome:
    """Open one queued case per acceptable file and send its prediction job.

    With ``allow_duplicate=False`` a file whose image is already a case the uploader may
    see opens nothing: it is listed in ``duplicates`` with that case instead (the pages do
    this unless the uploader asks to upload again; the API keeps the default).

    Each case is committed on its own (with its audit event) before its job is sent, so
    a bad file, or a broker that is down, never undoes the other files. A case whose job
    the broker refused stays queued in the outbox (`not_queued`); the sweep sends it once
    the broker is back.
    """
    cfg = current_app.config
    store = current_app.extensions["file_store"]
    outcome = UploadOutcome()
    note = (note or "").strip()[:2000] or None
    _check_rate(files, uploader)
    for index, (filename, data) in enumerate(files):
        try:
            prepared = prepare_upload(filename, data)
        except ImageRejected as exc:
            outcome.rejected.append((display_name(filename), str(exc)))
            continue
        info, name = prepared.info, prepared.name
        key = None
        try:
            if not allow_duplicate:
                # The sha256 of the stored file: for a DICOM, of the PNG of its image, so
                # the same image is a duplicate whatever its (de-identified) tags.
                same = existing_case(hashlib.sha256(prepared.data).hexdigest(), uploader)
                if same is not None:
                    outcome.duplicates.append((name, same))
                    continue
            key, digest, created = store.put_new(prepared.data, "images", ACCEPTED_FORMATS[info.format])
            # Marked as dispatched before the job is sent, so that the sweep leaves it alone;
            # `send_case` puts it back in the outbox if the broker refuses.
            case = Case(uploader_id=uploader.id, status="queued", image_sha256=digest, image_key=key,
                        image_format=info.format, original_filename=name, width=info.width,
                        height=info.height, note=note, dispatched_at=utcnow(), **prepared.case_fields)
            db.session.add(case)
            db.session.flush()
            audit("case.upload", actor=uploader, target=case, sha256=digest,
                  **({"source": "DICOM"} if prepared.case_fields else {}))
            db.session.commit()
        except (OSError, OperationalError) as exc:
            db.session.rollback()
            if key is not None and created:
                _remove_unreferenced(store, key)
            log.warning("upload of %s stopped: %s", name, exc)
            raise _unavailable(outcome, [display_name(f) for f, _ in files[index:]],
                               "storage" if isinstance(exc, OSError) else "database") from exc
        outcome.accepted.append(case)
        if not send_case(current_app._get_current_object(), case.id):
            outcome.not_queued.append(case)
    return outcome


def _check_rate(files: list[tuple[str, bytes]], uploader: User) -> None:
    """Refuse the request (413 or 429) before anything is stored when it has too many
    files, or when the user has sent too many images in the last minute."""
    cfg = current_app.config
    cap = cfg["MAX_FILES_PER_UPLOAD"]
    if cap and len(files) > cap:
        raise UploadRefused(413, "Too many files",
                            f"{len(files)} files were sent at once; the limit is {cap} per upload, "
                            "so nothing was stored. Send them in smaller groups.")
    per_minute = cfg["UPLOADS_PER_USER_PER_MINUTE"]
    if per_minute:
        recent = db.session.scalar(select(func.count(Case.id)).where(
            Case.uploader_id == uploader.id, Case.created_at >= utcnow() - timedelta(seconds=60)))
        if recent + len(files) > per_minute:
            raise UploadRefused(429, "Too many uploads",
                                f"You have sent {recent} image(s) in the last minute and the limit is "
                                f"{per_minute} per minute, so none of these {len(files)} file(s) was "
                                "stored. Wait a minute and send them again.", retry_after=60)


def _remove_unreferenced(store, key: str) -> None:
    """Delete a file this request wrote when no case row refers to it (no orphan files);
    best effort, as the database may be what failed."""
    try:
        if db.session.scalar(select(func.count(Case.id)).where(Case.image_key == key)) == 0:
            store.path(key).unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        db.session.rollback()
        log.warning("could not check or remove %s after a failed upload", key)


def _unavailable(outcome: UploadOutcome, not_saved: list[str], what: str) -> UploadRefused:
    """The 503 for a request cut short, saying exactly which files became cases."""
    cause = ("the image storage is full or not writable" if what == "storage"
             else "the database is busy or unavailable")
    parts = [f"The upload could not be completed: {cause}."]
    if outcome.accepted:
        parts.append("Saved: " + ", ".join(f"{c.original_filename} (case {c.id})" for c in outcome.accepted) + ".")
    parts.append("Not saved: " + ", ".join(not_saved) + ".")
    if outcome.duplicates:
        parts.append("Already a case, so not stored again: "
                     + ", ".join(f"{n} (case {c.id})" for n, c in outcome.duplicates) + ".")
    if outcome.rejected:
        parts.append("Not accepted: " + ", ".join(f"{n} ({r})" for n, r in outcome.rejected) + ".")
    retry = current_app.config["RETRY_AFTER_S"]
    parts.append(f"Send the files that were not saved again in {retry} seconds or later.")
    return UploadRefused(503, "Service temporarily unavailable", " ".join(parts), retry_after=retry)


class RerunRefused(ValueError):
    """The case cannot be re-run now; the message says why."""


def rerun_case(case: Case, actor: User) -> bool:
    """Queue a case again (the prediction uses the active model); True if the broker took
    the job, False if it waits in the outbox.

    A finished case can always be re-run. A case still queued or running is sent again
    only when its job looks lost (no progress for the visibility timeout, or waiting in
    the outbox), or when an admin insists; a duplicate job gives no second result.
    """
    app = current_app._get_current_object()
    pending = case.status in ("queued", "running")
    if pending and actor.role != "admin" and not is_stuck(app, case):
        minutes = max(1, round(app.config["BROKER_VISIBILITY_TIMEOUT"] / 60))
        raise RerunRefused(
            "the case is already waiting for or running its prediction; if nothing changes "
            f"within {minutes} minute(s) it is sent again automatically, or you can re-run it then")
    was = case.status
    case.status = "queued"
    case.error = None
    case.started_at = case.finished_at = None
    case.dispatched_at = utcnow()
    audit("case.rerun", actor=actor, target=case, was=was)
    db.session.commit()
    return send_case(app, case.id)
