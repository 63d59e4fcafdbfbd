from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, send_file, url_for
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from webapp.accounts import (AccountError, create_user, deactivate, failed_sign_ins, reset_password, set_role,
                              unlock)
from webapp.admin.forms import (ActivationForm, CreateUserForm, DeactivateForm, ResetPasswordForm, RoleForm,
                                UnlockForm)
from webapp.auth.roles import role_required
from webapp.extensions import db
from webapp.model_card import model_card
from webapp.models import ROLES, AuditEvent, ModelVersion, User
from webapp.registry import RegistryError, find_version, promote, rollback

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
    return render_template("admin/models.html", versions=versions, form=ActivationForm())


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


@bp.get("/audit")
@role_required("admin")
def audit_log():
    events = db.session.scalars(
        select(AuditEvent).options(joinedload(AuditEvent.actor)).order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(200)).all()
    return render_template("admin/audit.html", events=events)
