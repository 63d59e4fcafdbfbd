from __future__ import annotations

import csv
import io

from flask import (Blueprint, Response, abort, current_app, flash, redirect, render_template, request, send_file,
                   stream_with_context, url_for)
from flask_login import current_user
from sqlalchemy import select

from webapp.accounts import (AccountError, create_user, deactivate, failed_sign_ins, reset_password, set_role,
                              unlock)
from webapp.admin.forms import (ActivationForm, CreateUserForm, DeactivateForm, ResetPasswordForm, RoleForm,
                                UnlockForm)
from webapp.audit_log import (CASE_VIEW_AUDIT_MINUTES, AuditFilters, AuditQueryError, actor_name, audit_csv_rows,
                              audit_page, csv_cell, known_actions, parse_filters)
from webapp.auth.roles import role_required
from webapp.extensions import db
from webapp.model_card import model_card
from webapp.models import ROLES, ModelVersion, User, audit
from webapp.registry import RegistryError, find_version, promote, rollback
from webapp.review_stats import UnknownVersion, statistics_csv_rows, statistics_page

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _user(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        abort(404, description="No such user.")
    return user


def _render_users(form: CreateUserForm, status: int = 200):
    users = db.session.scalars(select(User).order_by(User.email)).all()
    minutes = current_app.config["LOGIN_LOCKOUT_MINUTES"]
    failures = {user.id: failed_sign_ins(user, minutes) for user in users}
    return render_template("admin/users.html", users=users, form=form, roles=ROLES, failures=failures,
                           lockout_minutes=minutes), status


@bp.get("/users")
@role_required("admin")
def users():
    return _render_users(CreateUserForm())


@bp.post("/users")
@role_required("admin")
def users_create():
    form = CreateUserForm()
    if not form.validate_on_submit():
        return _render_users(form, 400)
    try:
        # The admin typed this password: the user must replace it at the first sign-in.
        user = create_user(form.email.data, form.password.data, form.role.data, actor=current_user,
                           must_change_password=True)
    except AccountError as exc:
        field = form.password if "password" in str(exc) else form.email
        field.errors = [str(exc)]
        return _render_users(form, 400)
    flash(f"Created {user.email} ({user.role}).", "info")
    return redirect(url_for("admin.users"), 303)


@bp.post("/users/<int:user_id>/role")
@role_required("admin")
def users_set_role(user_id: int):
    user, form = _user(user_id), RoleForm()
    if not form.validate_on_submit():
        abort(400, description="Choose one of the listed roles.")
    try:
        set_role(user, form.role.data, actor=current_user)
        flash(f"{user.email} is now {user.role}.", "info")
    except AccountError as exc:
        flash(f"Role not changed: {exc}.", "error")
    return redirect(url_for("admin.users"), 303)


@bp.post("/users/<int:user_id>/deactivate")
@role_required("admin")
def users_deactivate(user_id: int):
    user = _user(user_id)
    return _button_action(DeactivateForm(), lambda: deactivate(user, actor=current_user),
                          lambda _: f"{user.email} can no longer sign in.", "Not deactivated", "admin.users")


@bp.post("/users/<int:user_id>/password")
@role_required("admin")
def users_reset_password(user_id: int):
    """Set a temporary password; the user must choose their own at the next sign-in."""
    user, form = _user(user_id), ResetPasswordForm()
    if not form.validate_on_submit():
        abort(400, description="Type a temporary password for the account.")
    try:
        reset_password(user, form.password.data, actor=current_user)
        flash(f"Password of {user.email} reset: their sessions ended, and at the next sign-in "
              "they must choose a new one. Give them the temporary password in person.", "info")
    except AccountError as exc:
        flash(f"Password not reset: {exc}.", "error")
    return redirect(url_for("admin.users"), 303)


@bp.post("/users/<int:user_id>/unlock")
@role_required("admin")
def users_unlock(user_id: int):
    user = _user(user_id)
    return _button_action(UnlockForm(), lambda: unlock(user, actor=current_user),
                          lambda n: f"{user.email} may sign in again from every address ({n} failed sign-in(s) forgotten).",
                          "Not unlocked", "admin.users")


@bp.get("/models")
@role_required("admin")
def models():
    versions = db.session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())).all()
    return render_template("admin/models.html", versions=versions, form=ActivationForm(),
                           cards={v.id: model_card(v) for v in versions})


def _button_action(form, action, success, failure: str, back_to: str):
    """A one-button admin form: check its CSRF token, run ``action``, flash ``success(result)``
    or ``failure: reason`` (nothing is changed on failure), and go back to ``back_to``."""
    if not form.validate_on_submit():
        abort(400, description="The form was incomplete; reload the page and try again.")
    try:
        flash(success(action()), "info")
    except (AccountError, RegistryError) as exc:
        flash(f"{failure}: {exc}.", "error")
    return redirect(url_for(back_to), 303)


def _change_active(change, success: str):
    return _button_action(ActivationForm(), change, lambda version: success.format(name=version.name),
                          "Nothing changed", "admin.models")


@bp.post("/models/<name>/promote")
@role_required("admin")
def model_promote(name: str):
    version = _version(name)
    force = bool(request.form.get("force"))
    return _change_active(lambda: promote(version.name, actor=current_user, force=force),
                          "{name} is now the active model: workers use it from their next case.")


@bp.post("/models/rollback")
@role_required("admin")
def model_rollback():
    return _change_active(lambda: rollback(actor=current_user),
                          "Rolled back: {name} is the active model again.")


def _version(name: str) -> ModelVersion:
    version = find_version(name)
    if version is None:
        abort(404, description=f"No model version {name!r}.")
    return version


@bp.get("/models/<name>")
@role_required("admin")
def model_detail(name: str):
    return render_template("admin/model_detail.html", card=model_card(_version(name)))


@bp.get("/models/<name>/roc.png")
@role_required("admin")
def model_roc(name: str):
    key = (_version(name).meta or {}).get("roc_key")
    store = current_app.extensions["file_store"]
    if not key or not store.exists(key):
        abort(404, description="This version has no ROC curve (it was not evaluated by 'manage.py retrain').")
    return send_file(store.path(key), mimetype="image/png", max_age=3600)


def _audit_filters() -> AuditFilters:
    try:
        return parse_filters(request.args)
    except AuditQueryError as exc:
        abort(400, description=str(exc))


@bp.get("/audit")
@role_required("admin")
def audit_log():
    """The audit log, newest first, filtered by actor, action, case and date range; 200
    events a page, older pages by keyset."""
    filters = _audit_filters()
    try:
        page = audit_page(filters, before=request.args.get("before") or None)
    except AuditQueryError as exc:
        abort(400, description=str(exc))
    actors = db.session.scalars(select(User.email).order_by(User.email)).all()
    actions = known_actions()
    families = sorted({a.split(".")[0] + "." for a in actions})
    return render_template("admin/audit.html", page=page, events=page.events, filters=filters,
                           args=filters.as_args(), actions=actions, families=families, actors=actors,
                           actor_name=actor_name,
                           view_minutes=CASE_VIEW_AUDIT_MINUTES, first_page=not request.args.get("before"))


def _csv_response(rows, filename: str) -> Response:
    """Stream ``rows`` (lists of values) as a CSV download, every cell guarded against
    spreadsheet formulas (``csv_cell``)."""
    def generate():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in rows:
            writer.writerow([csv_cell(value) for value in row])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()

    return Response(stream_with_context(generate()), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@bp.get("/audit.csv")
@role_required("admin")
def audit_csv():
    """Every event matching the filters, as CSV (cells that a spreadsheet would run as a
    formula are prefixed with an apostrophe). The export itself is audited."""
    filters = _audit_filters()
    audit("audit.export", actor=current_user, filters=filters.as_args())
    db.session.commit()
    return _csv_response(audit_csv_rows(filters), "audit-log.csv")


@bp.get("/review-statistics.csv")
@role_required("admin")
def review_statistics_csv():
    """Every figure of the review statistics page (?version=NAME as on the page), one row
    each, with its 95 % interval and the cases behind each disagreement. Audited."""
    version = request.args.get("version") or None
    try:
        page = statistics_page(version)
    except UnknownVersion as exc:
        abort(404, description=f"No model version {exc}.")
    rows = statistics_csv_rows(page["stats"], page["per_version"])
    audit("review_statistics.export", actor=current_user, version=version or "all")
    db.session.commit()
    return _csv_response(rows, f"review-statistics-{version or 'all'}.csv")
