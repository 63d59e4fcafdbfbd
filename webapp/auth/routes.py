from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from webapp.accounts import SignInThrottled, authenticate, end_sessions
from webapp.auth.forms import LoginForm
from webapp.extensions import db, login_manager
from webapp.models import User, audit

bp = Blueprint("auth", __name__)


# The session records the account's session version at sign-in; raising the version in
# the database (sign-out, deactivation) turns every earlier cookie of that user away, even
# a copy saved before, since the cookie itself cannot be recalled.
SESSION_VERSION_KEY = "_session_version"


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The signed-in user of this request, or None when the account is deactivated or the
    session was ended (its version is older than the account's)."""
    user = db.session.get(User, int(user_id))
    if user is None or not user.active:
        return None
    return user if session.get(SESSION_VERSION_KEY) == user.session_version else None


def _safe_next(target: str | None) -> str:
    # Only same-site paths: an attacker's ?next=https://evil.example must not redirect.
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return url_for("cases.case_list")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("cases.case_list"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        try:
            user = authenticate(form.email.data, form.password.data,
                                max_failures=current_app.config["LOGIN_MAX_FAILURES"],
                                lockout_minutes=current_app.config["LOGIN_LOCKOUT_MINUTES"])
        except SignInThrottled as exc:
            flash(f"Not signed in: {exc}.", "error")
            return render_template("auth/login.html", form=form), 429
        if user is not None:
            login_user(user)
            session[SESSION_VERSION_KEY] = user.session_version
            return redirect(_safe_next(request.args.get("next")))
        flash("Wrong email or password, or the account is deactivated.", "error")
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("auth/login.html", form=form), status


@bp.post("/logout")
@login_required
def logout():
    """Sign out: ends this session and every other session of the account (other
    browsers, copied cookies) by raising its session version."""
    end_sessions(current_user)
    audit("logout", actor=current_user)
    db.session.commit()
    logout_user()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.login"))
