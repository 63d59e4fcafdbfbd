from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_user, logout_user

from webapp.accounts import AccountError, SignInLimits, authenticate, change_password, end_sessions
from webapp.auth.forms import ChangePasswordForm, LoginForm
from webapp.auth.roles import ANY_ROLE, role_required
from webapp.extensions import db, login_manager
from webapp.models import User, audit

bp = Blueprint("auth", __name__)


# The session records the account's session version at sign-in; raising the version in
# the database (sign-out, deactivation) turns every earlier cookie of that user away, even
# a copy saved before, since the cookie itself cannot be recalled.
SESSION_VERSION_KEY = "_session_version"

# The one answer to every refused sign-in, whatever the reason: it must not tell whether
# the account exists, is deactivated or is throttled.
SIGN_IN_REFUSED = ("Not signed in: wrong email or password, a deactivated account, or too many "
                   "failed attempts from here (then wait {minutes} minutes or ask an admin).")

# What a user who must change their password may still open.
_OPEN_DURING_FORCED_CHANGE = {"auth.change_password", "auth.logout", "static", "healthz"}


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The signed-in user of this request, or None when the account is deactivated or the
    session was ended (its version is older than the account's)."""
    user = db.session.get(User, int(user_id))
    if user is None or not user.active:
        return None
    return user if session.get(SESSION_VERSION_KEY) == user.session_version else None


def _limits() -> SignInLimits:
    cfg = current_app.config
    return SignInLimits(max_failures=cfg["LOGIN_MAX_FAILURES"],
                        max_address_failures=cfg["LOGIN_MAX_FAILURES_PER_ADDRESS"],
                        lockout_minutes=cfg["LOGIN_LOCKOUT_MINUTES"])


def _safe_next(target: str | None) -> str:
    # Only same-site paths: an attacker's ?next=https://evil.example must not redirect.
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("cases.case_list")


@bp.before_app_request
def _forced_password_change():
    """After an admin's reset (or an account an admin created) nothing opens until the
    user has chosen their own password."""
    if request.blueprint == "api":  # bearer tokens only there; the session plays no part
        return None
    if (request.endpoint not in _OPEN_DURING_FORCED_CHANGE and current_user.is_authenticated
            and current_user.must_change_password):
        return redirect(url_for("auth.change_password"), 303 if request.method != "GET" else 302)
    return None


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("cases.case_list"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        user = authenticate(form.email.data, form.password.data, request.remote_addr or "unknown", _limits())
        if user is not None:
            login_user(user)
            session[SESSION_VERSION_KEY] = user.session_version
            if user.must_change_password:
                flash("Choose your own password before you go on.", "info")
                return redirect(url_for("auth.change_password"))
            return redirect(_safe_next(request.args.get("next")))
        flash(SIGN_IN_REFUSED.format(minutes=current_app.config["LOGIN_LOCKOUT_MINUTES"]), "error")
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("auth/login.html", form=form), status


@bp.route("/account/password", methods=["GET", "POST"], endpoint="change_password")
@role_required(*ANY_ROLE)
def change_password_page():
    """The user's own password change (also where a forced change leads)."""
    form = ChangePasswordForm()
    if not form.validate_on_submit():
        return render_template("auth/password.html", form=form), 400 if request.method == "POST" else 200
    try:
        change_password(current_user, form.current.data, form.new.data, request.remote_addr or "unknown", _limits())
    except AccountError as exc:
        form.new.errors = list(form.new.errors) + [f"Not changed: {exc}."]
        return render_template("auth/password.html", form=form), 400
    # Every other session of the account ended; this one goes on with the new version.
    session[SESSION_VERSION_KEY] = current_user.session_version
    flash("Your password is changed; other sessions of your account were signed out.", "info")
    return redirect(url_for("cases.case_list"), 303)


@bp.post("/logout")
@role_required(*ANY_ROLE)
def logout():
    """Sign out: ends this session and every other session of the account (other
    browsers, copied cookies) by raising its session version."""
    end_sessions(current_user)
    audit("logout", actor=current_user)
    db.session.commit()
    logout_user()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.login"))
