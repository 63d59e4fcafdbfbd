"""The JSON API, version 1: the same work as the pages, for programs, with bearer tokens.

Every route takes ``Authorization: Bearer <token>`` and nothing else: a session cookie
is ignored here, which is why the blueprint may be exempt from CSRF (a browser attaches
cookies to a forged request by itself, never an Authorization header). The token acts as
one user and that user's role decides, exactly as on the pages: clinicians upload and
read their own cases, reviewers and admins read every case, reviewers and admins review.
Errors are JSON ``{"error": ..., "message": ...}`` with the matching status code.
"""
from __future__ import annotations

from functools import wraps
from typing import Any, Callable

from flask import Blueprint, abort, current_app, g, jsonify, request, send_file, url_for
from sqlalchemy import select
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.exc import InterfaceError, OperationalError

from webapp.audit_log import record_case_view
from webapp.api.openapi import openapi_document
from webapp.api.tokens import TokenError, user_for_secret
from webapp.extensions import db
from webapp.formatting import verdict_words
from webapp.intake import receive_uploads
from webapp.models import CASE_STATUSES, Case, ModelVersion, Prediction, Review, User
from webapp.reviews import (REVIEWER_ROLES, ReviewForbidden, ReviewRejected, current_review, needs_blind_read,
                            reading_token, submit_review)
from webapp.text import has_forbidden_characters

bp = Blueprint("api", __name__, url_prefix="/api/v1")

ANY_ROLE = ("clinician", "reviewer", "admin")
UPLOADERS = ("clinician", "admin")
# Case numbers are 32-bit integers in PostgreSQL; a larger one names no case (404, not a
# database error).
_MAX_ID = 2**31 - 1


def _error(status: int, error: str, message: str, **extra: Any):
    response = jsonify(error=error, message=message, **extra)
    response.status_code = status
    return response


def _unauthorized(message: str, invalid: bool):
    response = _error(401, "Unauthorized", message)
    challenge = 'Bearer realm="api"'
    if invalid:
        challenge += ', error="invalid_token"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def token_required(*roles: str) -> Callable:
    """Require a live bearer token whose user has one of ``roles`` (401 without a working
    token, 403 for another role). The user is `g.api_user`; `flask_login.current_user` is
    never consulted here."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapped(*args, **kwargs):
            scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
            secret = secret.strip()
            if scheme.lower() != "bearer" or not secret:
                return _unauthorized("Send an API token as 'Authorization: Bearer <token>'; an admin creates "
                                     "tokens with 'manage.py tokens create'.", invalid=False)
            try:
                user = user_for_secret(secret)
            except TokenError as exc:
                return _unauthorized(f"Not accepted: {exc}.", invalid=True)
            if not user.has_role(*roles):
                abort(403, description=f"A {user.role}'s token may not do this; it needs the role "
                                       f"{' or '.join(roles)}.")
            g.api_user = user
            return view(*args, **kwargs)

        # Read by tests/webapp/test_route_rules.py: every route must name its roles.
        wrapped.required_roles = roles
        return wrapped

    return decorator


def unavailable_reason(exc: Exception) -> str:
    """What a database error means for the client: a full disk (SQLite says "database or disk
    is full"; PostgreSQL "No space left on device") is not a database that cannot be reached."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if "disk is full" in text or "no space left" in text or "disk full" in text:
        return "The server's disk is full, so nothing could be stored"
    if "locked" in text:
        return "The database is busy (locked by another writer)"
    return "The database cannot be reached just now"


@bp.errorhandler(OperationalError)
@bp.errorhandler(InterfaceError)
def _database_unavailable(exc):
    current_app.logger.warning("API: database unavailable: %s", exc.__class__.__name__)
    db.session.rollback()
    response = _error(503, "Service Unavailable", unavailable_reason(exc) + "; nothing was changed. Try again shortly.")
    response.headers["Retry-After"] = "30"
    return response


# ------------------------------------------------------------------ representations

def _time(value) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def _prediction_json(case: Case, prediction: Prediction) -> dict[str, Any]:
    return {
        "probability": prediction.probability,
        "label": prediction.label,
        "verdict": verdict_words(prediction.label),
        "threshold": prediction.threshold,
        "predicted_class": prediction.predicted_class,
        "class_probabilities": prediction.class_probabilities,
        "model_version": prediction.model_version.name,
        "method": prediction.method,
        "faithfulness": prediction.faithfulness,
        "border_share": prediction.border_share,
        "created_at": _time(prediction.created_at),
        "updated_at": _time(prediction.updated_at),
        "heatmap_url": url_for("api.case_file", case_id=case.id, kind="heatmap") if prediction.heatmap_key else None,
        "overlay_url": url_for("api.case_file", case_id=case.id, kind="overlay") if prediction.overlay_key else None,
    }


#: The DICOM facts the API gives (a case's `dicom_meta` holds these and nothing else
#: identifying: webapp/dicom.py keeps a whitelist).
DICOM_FIELDS = ("modality", "manufacturer", "model", "laterality", "view", "body_part", "pixel_spacing_mm",
                "pixel_spacing_source", "frames", "frame_shown", "photometric", "bits_stored", "voi", "inverted",
                "burned_in_annotation", "transfer_syntax")


def _dicom_json(case: Case) -> dict[str, Any] | None:
    if case.source_format != "DICOM":
        return None
    meta = case.dicom_meta or {}
    data = {name: meta.get(name) for name in DICOM_FIELDS}
    data["frames"] = int(data["frames"] or 1)
    data["frame_shown"] = int(data["frame_shown"] or 1)
    data["inverted"] = bool(data["inverted"])
    data["patient_key"] = case.patient_key
    return data


def _case_json(case: Case, user: User) -> dict[str, Any]:
    prediction = case.latest_prediction
    is_reviewer = user.has_role(*REVIEWER_ROLES)
    hidden = bool(prediction) and is_reviewer and needs_blind_read(case, user)
    ready = case.status == "done" and prediction is not None
    return {
        "id": case.id,
        "status": case.status,
        "finished": case.is_finished,
        "error": case.error,
        "original_filename": case.original_filename,
        "image_format": case.image_format,
        "source_format": case.source_format or case.image_format,
        "dicom": _dicom_json(case),
        "width": case.width,
        "height": case.height,
        "note": case.note,
        "uploader": case.uploader.email,
        "created_at": _time(case.created_at),
        "updated_at": _time(case.updated_at),
        "started_at": _time(case.started_at),
        "finished_at": _time(case.finished_at),
        "review_count": case.review_count,
        "prediction": None if hidden or prediction is None else _prediction_json(case, prediction),
        "prediction_hidden": hidden,
        # For reviewers: sent back with a review, it lets the reading time be measured.
        "review_token": reading_token(case.id, user.id) if is_reviewer and ready and not hidden else None,
        "url": url_for("api.case_detail", case_id=case.id),
        "image_url": url_for("api.case_file", case_id=case.id, kind="image"),
    }


def _review_json(review: Review) -> dict[str, Any]:
    return {
        "id": review.id,
        "case_id": review.case_id,
        "reviewer": review.reviewer.email,
        "verdict": review.verdict,
        "label": review.label,
        "detailed_label": review.detailed_label,
        "confidence": review.confidence,
        "comment": review.comment,
        "reading_seconds": review.reading_seconds,
        "revision": review.revision,
        "model_version": review.model_version.name if review.model_version else None,
        "model_label": review.model_label,
        "submitted_at": _time(review.submitted_at),
    }


def _model_json(version: ModelVersion, user: User) -> dict[str, Any]:
    meta = version.meta or {}
    data = {
        "name": version.name,
        "is_active": bool(version.is_active),
        "threshold": version.threshold,
        "input_size": version.input_size,
        "class_names": list(meta.get("class_names") or []) or None,
        "created_at": _time(version.created_at),
        "activated_at": _time(version.activated_at),
        "parent": version.parent.name if version.parent else None,
    }
    if user.role == "admin":  # as on the pages: figures and notes are for admins
        data["metrics"] = dict(version.metrics or {})
        data["notes"] = version.notes
    return data


# ------------------------------------------------------------------ helpers

def _visible_case(case_id: int) -> Case:
    """The case if the token's user may see it; 404 otherwise (existence is not revealed),
    410 for a withdrawn case its user may see (it is kept in the records, not served)."""
    user = g.api_user
    case = db.session.get(Case, case_id) if case_id <= _MAX_ID else None
    if case is None or not (user.sees_all_cases or case.uploader_id == user.id):
        abort(404, description="No such case, or it is not one of yours.")
    if case.withdrawn_at is not None:
        abort(410, description=f"Case {case.id} was withdrawn on {case.withdrawn_at:%Y-%m-%d %H:%M} UTC by its "
                               "uploader or an admin; it is kept in the records but no longer served or reviewed.")
    return case


def _int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        abort(400, description=f"'{name}' must be a whole number from {low} to {high}.")
    return number


def _text_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        abort(400, description=f"'{name}' must be a string.")
    if has_forbidden_characters(value):
        abort(400, description=f"'{name}' contains characters that are not allowed (NUL, other control "
                               "characters or text-direction controls).")
    return value


# ------------------------------------------------------------------ routes

@bp.get("/openapi.json")
@token_required(*ANY_ROLE)
def openapi():
    return openapi_document()


@bp.get("/me")
@token_required(*ANY_ROLE)
def me():
    user = g.api_user
    return {"id": user.id, "email": user.email, "role": user.role}


@bp.get("/models")
@token_required(*ANY_ROLE)
def models():
    versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(),
                                                                 ModelVersion.id.desc())).all()
    return {"models": [_model_json(v, g.api_user) for v in versions]}


@bp.get("/cases")
@token_required(*ANY_ROLE)
def case_list():
    """The cases the token's user may see, newest first, withdrawn ones left out (as in
    the page's list); ``limit`` per page, the next page from the ``next`` link."""
    user = g.api_user
    status = request.args.get("status") or None
    if status is not None and status not in CASE_STATUSES:
        abort(400, description=f"'status' must be one of {', '.join(CASE_STATUSES)}.")
    limit = _int_arg("limit", 25, 1, 100)
    before = _int_arg("before", None, 1, _MAX_ID)
    query = (select(Case).options(joinedload(Case.uploader),
                                  selectinload(Case.predictions).joinedload(Prediction.model_version))
             .where(Case.withdrawn_at.is_(None)))
    if not user.sees_all_cases:
        query = query.where(Case.uploader_id == user.id)
    if status:
        query = query.where(Case.status == status)
    if before:
        query = query.where(Case.id < before)
    cases = list(db.session.scalars(query.order_by(Case.id.desc()).limit(limit + 1)))
    more = len(cases) > limit
    cases = cases[:limit]
    next_url = url_for("api.case_list", status=status, limit=limit, before=cases[-1].id) if more else None
    return {"cases": [_case_json(c, user) for c in cases], "next": next_url}


@bp.post("/cases")
@token_required(*UPLOADERS)
def case_create():
    """Upload one or more images (multipart field ``images``); one case per accepted file."""
    files = [(f.filename or "unnamed", f.read()) for f in request.files.getlist("images")]
    if not files:
        abort(400, description="Send the images as multipart/form-data in the field 'images' "
                               "(one or more PNG, JPEG or DICOM files).")
    note = request.form.get("note")
    outcome = receive_uploads(files, note, g.api_user)
    rejected = [{"filename": name, "reason": reason} for name, reason in outcome.rejected]
    if not outcome.accepted:
        return _error(400, "No image accepted", "None of the files is an acceptable image; see 'rejected'.",
                      rejected=rejected)
    waiting = {c.id for c in outcome.not_queued}
    cases = []
    for case in outcome.accepted:
        data = _case_json(case, g.api_user)
        # False: stored, but the prediction service was unreachable; it is sent automatically later.
        data["sent_to_worker"] = case.id not in waiting
        cases.append(data)
    response = jsonify(cases=cases, rejected=rejected)
    response.status_code = 201
    if len(cases) == 1:
        response.headers["Location"] = cases[0]["url"]
    return response


@bp.get("/cases/<int:case_id>")
@token_required(*ANY_ROLE)
def case_detail(case_id: int):
    case = _visible_case(case_id)
    body = _case_json(case, g.api_user)
    record_case_view(case, g.api_user)  # as the case page does: audited, throttled (webapp/audit_log.py)
    return body


_KEYS = {"heatmap": "heatmap_key", "overlay": "overlay_key"}


@bp.get("/cases/<int:case_id>/<any(image, heatmap, overlay):kind>")
@token_required(*ANY_ROLE)
def case_file(case_id: int, kind: str):
    """The stored image, or the latest prediction's heatmap or overlay (PNG)."""
    case = _visible_case(case_id)
    user = g.api_user
    if kind == "image":
        key = case.image_key
    else:
        if user.has_role(*REVIEWER_ROLES) and needs_blind_read(case, user):
            abort(403, description="Blinded review: give your own label on the case page before the heatmap is shown.")
        prediction = case.latest_prediction
        key = getattr(prediction, _KEYS[kind]) if prediction else None
    store = current_app.extensions["file_store"]
    if not key or not store.exists(key):
        abort(404, description=f"This case has no {kind} yet (status: {case.status}).")
    return send_file(store.path(key), conditional=True, max_age=0)


@bp.post("/cases/<int:case_id>/reviews")
@token_required(*REVIEWER_ROLES)
def review_create(case_id: int):
    """Agree or disagree with the case's latest prediction (a second post revises the review)."""
    case = _visible_case(case_id)
    user = g.api_user
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, description="Send a JSON object: {\"verdict\": \"agree\" or \"disagree\", \"confidence\": ..., "
                               "\"label\": ..., \"comment\": ...}.")
    fields = {name: _text_field(body, name) for name in ("verdict", "label", "confidence", "comment", "review_token")}
    if case.status != "done" or case.latest_prediction is None:
        abort(409, description=f"This case has no finished prediction to review yet (status: {case.status}).")
    if needs_blind_read(case, user):
        abort(403, description="Blinded review: give your own label on the case page first; the API does not "
                               "take blind reads.")
    earlier = current_review(case.id, user.id)
    first = earlier is None or earlier.verdict is None
    try:
        review = submit_review(case, user, fields["verdict"], fields["label"], fields["confidence"],
                               fields["comment"], fields["review_token"], timed=fields["review_token"] is not None)
    except ReviewForbidden as exc:  # the decorator already refused other roles
        abort(403, description=str(exc))
    except ReviewRejected as exc:
        abort(400, description=f"Not recorded: {exc}.")
    response = jsonify(_review_json(review))
    response.status_code = 201 if first else 200
    return response
