from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user

from webapp.auth.roles import role_required
from webapp.cases.routes import render_case
from webapp.extensions import db
from webapp.models import Case
from webapp.review.forms import BlindedSettingForm, BlindReadForm, ReviewForm
from webapp.review_stats import UnknownVersion, statistics_page
from webapp.reviews import (DEFAULT_QUEUE_SORT, QUEUE_SORTS, REVIEWER_ROLES, ReviewRejected, blinded_for,
                            next_in_queue, queue_progress, queue_sort, record_blind_read, review_queue,
                            set_blinded_review, submit_review)

bp = Blueprint("reviews", __name__)


def _case(case_id: int) -> Case:
    case = db.session.get(Case, case_id)
    if case is None:
        abort(404, description="No such case.")
    return case


def _sort(value: str | None) -> str:
    """The queue order a form or link carries (the default when none); 400 for an unknown one."""
    try:
        return queue_sort(value)
    except ReviewRejected as exc:
        abort(400, description=f"{exc}.")


def _case_url(case_id: int, sort: str | None) -> str:
    return url_for("cases.case_page", case_id=case_id, queue=sort or None)


def _to_next(after_case_id: int, sort: str, skipped: bool = False):
    """Redirect to the reviewer's next case in the queue order, or to the queue when none is left."""
    following = next_in_queue(current_user, sort, after_case_id)
    if following is None:
        flash("No other case is waiting in your queue." if skipped else
              "Queue done: every finished case has your review.", "info")
        return redirect(url_for("reviews.queue", sort=sort), 303)
    return redirect(_case_url(following, sort), 303)


def _form_checked(form) -> None:
    if not form.validate_on_submit():
        errors = "; ".join(f"{getattr(form, name).label.text}: {', '.join(msgs)}" for name, msgs in form.errors.items())
        abort(400, description=f"The review form was not accepted ({errors or 'incomplete'}). "
                               "Nothing was saved; go back, correct it and submit again.")


@bp.get("/reviews")
@role_required(*REVIEWER_ROLES)
def queue():
    sort = request.args.get("sort") or DEFAULT_QUEUE_SORT
    try:
        page = int(request.args.get("page") or 1)
        items, more = review_queue(current_user, sort, page, current_app.config["REVIEW_QUEUE_PER_PAGE"])
    except (ValueError, ReviewRejected) as exc:
        abort(400, description=str(exc) if isinstance(exc, ReviewRejected) else "the page must be a number")
    left, total = queue_progress(current_user)
    return render_template("reviews/queue.html", items=items, more=more, page=page, sort=sort, sorts=QUEUE_SORTS,
                           left=left, total=total,
                           blinded=blinded_for(current_user), site_blinded=current_app.config["REVIEW_BLINDED"],
                           setting_form=BlindedSettingForm(blinded=current_user.blinded_review))


@bp.post("/cases/<int:case_id>/review")
@role_required(*REVIEWER_ROLES)
def review(case_id: int):
    case, form = _case(case_id), ReviewForm()
    _form_checked(form)
    sort = _sort(form.queue.data)
    try:
        saved = submit_review(case, current_user, form.verdict.data, form.label.data, form.confidence.data,
                              form.comment.data, form.opened.data)
    except ReviewRejected as exc:
        flash(f"Review not saved: {exc}.", "error")
        return render_case(case, 400, submitted=request.form)
    flash(f"Review of case #{case.id} saved ({saved.verdict}, {saved.label}).", "info")
    if form.save_next.data:  # "Save & next": on through the queue, in the order it was opened in
        return _to_next(case.id, sort)
    return redirect(_case_url(case.id, form.queue.data), 303)


@bp.post("/cases/<int:case_id>/review/blind")
@role_required(*REVIEWER_ROLES)
def blind_read(case_id: int):
    case, form = _case(case_id), BlindReadForm()
    _form_checked(form)
    _sort(form.queue.data)
    try:
        record_blind_read(case, current_user, form.label.data, form.confidence.data, form.opened.data)
    except ReviewRejected as exc:
        flash(f"Label not saved: {exc}.", "error")
        return render_case(case, 400, submitted=request.form)
    flash("Your label is saved. Now compare it with the model's output and confirm your review.", "info")
    return redirect(_case_url(case.id, form.queue.data), 303)


@bp.get("/reviews/next")
@role_required(*REVIEWER_ROLES)
def next_case():
    """Next case without saving: the one after ``after`` in the queue order ``queue``."""
    try:
        after = int(request.args.get("after", ""))
    except ValueError:
        abort(400, description="after must be a case number")
    return _to_next(after, _sort(request.args.get("queue")), skipped=True)


@bp.post("/reviews/settings")
@role_required(*REVIEWER_ROLES)
def settings():
    form = BlindedSettingForm()
    _form_checked(form)
    set_blinded_review(current_user, bool(form.blinded.data))
    flash("Blinded review is " + ("on." if form.blinded.data else "off."), "info")
    return redirect(url_for("reviews.queue"), 303)


@bp.get("/admin/review-statistics")
@role_required("admin")
def statistics():
    """Agreement, kappa, sensitivity and specificity with 95 % intervals; ?version=NAME for
    one model version's reviews only (the CSV is /admin/review-statistics.csv)."""
    try:
        context = statistics_page(request.args.get("version") or None)
    except UnknownVersion as exc:
        abort(404, description=f"No model version {exc}.")
    return render_template("reviews/statistics.html", **context)
