from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, send_file, url_for
from markupsafe import Markup, escape
from flask_login import current_user

from webapp.audit_log import record_case_view
from webapp.auth.roles import ANY_ROLE, role_required
from webapp.background import is_stuck
from webapp.caselist import SORTS, BadQuery, case_statuses, list_cases, parse_ids, review_cells, thumbnail_path
from webapp.cases.forms import RerunForm, UploadForm, WithdrawForm
from webapp.extensions import db
from webapp.intake import RerunRefused, receive_uploads, rerun_case
from webapp.models import CASE_STATUSES, LABELS, Case, audit, utcnow
from webapp.review.forms import BlindReadForm, ReviewForm
from webapp.reviews import (REVIEWER_ROLES, ReviewRejected, blinded_case_ids, blinded_for, needs_blind_read,
                            queue_progress, queue_sort, reading_seconds, review_panel)

bp = Blueprint("cases", __name__)

UPLOADERS = ("clinician", "admin")


def _visible_case(case_id: int) -> Case:
    """The case, if the current user may see it; 404 otherwise (existence is not revealed)."""
    case = db.session.get(Case, case_id)
    if case is None or not (current_user.sees_all_cases or case.uploader_id == current_user.id):
        abort(404, description="No such case, or it is not one of yours.")
    return case


def _may_rerun(case: Case) -> bool:
    return current_user.role == "admin" or case.uploader_id == current_user.id


def _may_withdraw(case: Case) -> bool:
    return case.withdrawn_at is None and _may_rerun(case)


@bp.get("/cases")
@role_required(*ANY_ROLE)
def case_list():
    args = request.args
    filters = {k: args.get(k) or None for k in ("status", "label", "reviewed")}
    sort = args.get("sort") or "newest"
    blinded = current_user.has_role(*REVIEWER_ROLES) and blinded_for(current_user)
    if blinded and (filters["label"] or sort.startswith("probability")):
        # Filtering or ordering by the model's output would reveal it before the blind read.
        abort(400, description="In blinded review mode the case list cannot be filtered or "
                               "sorted by the model's output.")
    try:
        page = list_cases(current_user, **filters, sort=sort, after=args.get("after"),
                          before=args.get("before"), per_page=current_app.config["CASES_PER_PAGE"])
    except BadQuery as exc:
        abort(400, description=str(exc))
    hidden = blinded_case_ids(current_user, [c.id for c in page.cases])
    # Cases whose job looks lost: the list offers "Send again" to those who may re-run them.
    app = current_app._get_current_object()
    resendable = {c.id for c in page.cases if is_stuck(app, c) and _may_rerun(c)}
    return render_template("cases/list.html", page=page, filters=filters, sort=sort, sorts=SORTS,
                           statuses=CASE_STATUSES, labels=LABELS, hidden=hidden, blinded=blinded,
                           resendable=resendable, reviews=review_cells(current_user, [c.id for c in page.cases]),
                           poll_ms=current_app.config["STATUS_POLL_MS"])


@bp.route("/cases/upload", methods=["GET", "POST"])
@role_required(*UPLOADERS)
def upload():
    form = UploadForm()
    if not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("cases/upload.html", form=form), status
    files = [(f.filename, f.read()) for f in request.files.getlist(form.images.name) if f and f.filename]
    if not files:
        form.images.errors = ["Choose at least one PNG, JPEG or DICOM file."]
        return render_template("cases/upload.html", form=form), 400
    outcome = receive_uploads(files, form.note.data, current_user, allow_duplicate=form.allow_duplicate.data)
    for name, same in outcome.duplicates:
        link = Markup('<a href="{}">case {}</a>').format(url_for("cases.case_page", case_id=same.id), same.id)
        flash(Markup("{} is the same image as {}, so it was not stored again. To make a second case of it, "
                     "tick “Upload again” and send it once more.").format(escape(name), link), "info")
    for name, reason in outcome.rejected:
        flash(f"{name} was not accepted: {reason}.", "error")
    if outcome.not_queued:
        names = ", ".join(f"{c.original_filename} (case {c.id})" for c in outcome.not_queued)
        flash(f"Stored and waiting: {names}. The prediction service is not reachable just now; "
              "these cases are sent to it automatically as soon as it is back.", "info")
    if not outcome.accepted:
        if outcome.duplicates and not outcome.rejected:
            # Every file was already a case: nothing is wrong, go to the (first) one.
            return redirect(url_for("cases.case_page", case_id=outcome.duplicates[0][1].id), 303)
        return render_template("cases/upload.html", form=form), 400
    flash(f"{len(outcome.accepted)} image(s) received and queued for prediction.", "info")
    if len(outcome.accepted) == 1:
        return redirect(url_for("cases.case_page", case_id=outcome.accepted[0].id), 303)
    return redirect(url_for("cases.case_list"), 303)


@bp.get("/cases/<int:case_id>")
@role_required(*ANY_ROLE)
def case_page(case_id: int):
    case = _visible_case(case_id)
    try:  # ?queue=ORDER: reached from the review queue in that order ("Save & next" follows it)
        queue_sort(request.args.get("queue"))
    except ReviewRejected as exc:
        abort(400, description=f"{exc}.")
    page = render_case(case)
    record_case_view(case, current_user)  # who read which case: audited, throttled (webapp/audit_log.py)
    return page


def render_case(case: Case, status: int = 200, submitted: dict | None = None):
    """The case page; ``submitted`` refills a rejected review form (and keeps its reading
    start) so that the reviewer corrects it instead of starting again."""
    cfg = current_app.config
    submitted = dict(submitted or {})
    if submitted.get("opened"):
        try:  # keep the first opening time only if it is genuine; else the page's new one
            reading_seconds(submitted["opened"], case.id, current_user.id)
        except ReviewRejected:
            submitted.pop("opened")
    review = review_panel(case, current_user)
    # Blinded review: no model output until the reviewer has given their own label.
    prediction = None if review.hide_model_output else case.latest_prediction
    # The queue order this page was reached in (a link's ?queue= or the review form's field).
    queue = request.values.get("queue") or None
    try:
        queue = queue_sort(queue) if queue else None
    except ReviewRejected:
        queue = None
    # "12 of 40 left" while reading through the queue (counting is O(cases): not on every view).
    progress = queue_progress(current_user) if queue and current_user.has_role(*REVIEWER_ROLES) else None
    return render_template("cases/detail.html", case=case, prediction=prediction, review=review,
                           queue=queue, progress=progress,
                           review_form=ReviewForm(), blind_form=BlindReadForm(), submitted=submitted,
                           may_rerun=_may_rerun(case) and case.withdrawn_at is None, rerun_form=RerunForm(),
                           may_withdraw=_may_withdraw(case), withdraw_form=WithdrawForm(),
                           # queued/running with no sign of life: "Send again" is allowed
                           may_resend=_may_withdraw(case) and is_stuck(current_app._get_current_object(), case),
                           border_warning=cfg["BORDER_SHARE_WARNING"],
                           faithfulness_warning=cfg["FAITHFULNESS_WARNING"],
                           poll_ms=cfg["STATUS_POLL_MS"]), status


@bp.get("/cases/<int:case_id>/status")
@role_required(*ANY_ROLE)
def case_status(case_id: int):
    """JSON for the case page's polling script."""
    case = _visible_case(case_id)
    hidden = current_user.has_role(*REVIEWER_ROLES) and needs_blind_read(case, current_user)
    return {
        "id": case.id,
        "status": case.status,
        "finished": case.is_finished,
        "error": case.error,
        "label": None if hidden else case.label,
        "probability": None if hidden else case.probability,
        "updated_at": case.updated_at.isoformat() + "Z",
    }


@bp.post("/cases/<int:case_id>/rerun")
@role_required(*ANY_ROLE)
def rerun(case_id: int):
    case = _visible_case(case_id)
    if not _may_rerun(case):
        abort(403, description="Only the clinician who uploaded a case, or an admin, may re-run it.")
    if not RerunForm().validate_on_submit():
        abort(400, description="The re-run form was incomplete; reload the page and try again.")
    if case.withdrawn_at is not None:
        flash("Not re-run: this case was withdrawn.", "error")
        return redirect(url_for("cases.case_page", case_id=case.id), 303)
    try:
        queued = rerun_case(case, current_user)
    except RerunRefused as exc:
        flash(f"Not re-run: {exc}.", "error")
        return redirect(url_for("cases.case_page", case_id=case.id), 303)
    flash("Queued again." if queued else "Queued again; the prediction service is not reachable just now, "
          "so the case is sent to it automatically as soon as it is back.", "info")
    return redirect(url_for("cases.case_page", case_id=case.id), 303)


@bp.post("/cases/<int:case_id>/withdraw")
@role_required(*ANY_ROLE)
def withdraw(case_id: int):
    """Take back a mistaken upload: the row, its reviews and audit trail stay, but it
    leaves the lists, the review queue and the feedback export."""
    case = _visible_case(case_id)
    if not _may_rerun(case):
        abort(403, description="Only the clinician who uploaded a case, or an admin, may withdraw it.")
    if not WithdrawForm().validate_on_submit():
        abort(400, description="Tick the confirmation box to withdraw the case (or reload the page and try again).")
    if case.withdrawn_at is None:
        case.withdrawn_at = utcnow()
        case.withdrawn_by_id = current_user.id
        audit("case.withdraw", actor=current_user, target=case, sha256=case.image_sha256)
        db.session.commit()
    flash(f"Case {case.id} ({case.original_filename}) was withdrawn; it is kept in the records "
          "but no longer listed, queued for review or exported.", "info")
    return redirect(url_for("cases.case_list"), 303)


_KINDS = {"image": "image_key", "heatmap": "heatmap_key", "overlay": "overlay_key"}


@bp.get("/cases/<int:case_id>/<any(image, heatmap, overlay):kind>")
@role_required(*ANY_ROLE)
def case_file(case_id: int, kind: str):
    """The stored image, heatmap or overlay of a case, only for users who may see it."""
    case = _visible_case(case_id)
    if kind == "image":
        key = case.image_key
    else:
        if current_user.has_role(*REVIEWER_ROLES) and needs_blind_read(case, current_user):
            abort(403, description="Blinded review: give your own label before the heatmap is shown.")
        prediction = case.latest_prediction
        key = getattr(prediction, _KINDS[kind]) if prediction else None
    store = current_app.extensions["file_store"]
    if not key or not store.exists(key):
        abort(404, description=f"This case has no {kind} yet.")
    # Patient images: nothing may keep them, not even the browser after sign-out; every
    # response but static files is "no-store" (webapp/headers.py).
    return send_file(store.path(key), conditional=True, max_age=0)


@bp.get("/cases/status")
@role_required(*ANY_ROLE)
def case_list_status():
    """JSON for the case list's polling script: ``?ids=1,2,3`` (at most 100), one entry per
    case the user may see (others, withdrawn and unknown numbers are left out)."""
    try:
        ids = parse_ids(request.args.get("ids"))
    except BadQuery as exc:
        abort(400, description=str(exc))
    return {"cases": case_statuses(current_user, ids)}


@bp.get("/cases/<int:case_id>/thumbnail")
@role_required(*ANY_ROLE)
def case_thumbnail(case_id: int):
    """A small JPEG of the case's image for the list (made on first request, then kept)."""
    case = _visible_case(case_id)
    path = thumbnail_path(current_app.extensions["file_store"], case)
    if path is None:
        abort(404, description="This case has no thumbnail (its image cannot be read).")
    return send_file(path, mimetype="image/jpeg", conditional=True, max_age=0)
