"""Account management used by both the admin pages and `manage.py users`.

Each function makes one change plus its audit event and commits them together; a
rejected change raises AccountError with a message for the person who asked.
"""
from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import func, select

from webapp.extensions import db
from webapp.models import ROLES, AuditEvent, User, audit, utcnow

MIN_PASSWORD_LENGTH = 10
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class AccountError(ValueError):
    """A requested account change that cannot be made; the message says why."""


class SignInThrottled(AccountError):
    """Too many failed sign-ins for one account in a short time; the message says how long."""


def normalise_email(email: str) -> str:
    return (email or "").strip().lower()


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == normalise_email(email)))


def recent_failures(user: User, window: timedelta) -> int:
    """Failed sign-ins for ``user`` within ``window`` and since their last successful one."""
    since = utcnow() - window
    if user.last_login_at is not None and user.last_login_at > since:
        since = user.last_login_at
    return db.session.scalar(select(func.count()).select_from(AuditEvent).where(
        AuditEvent.action == "login.failed", AuditEvent.target_type == "user",
        AuditEvent.target_id == user.id, AuditEvent.created_at > since))


def authenticate(email: str, password: str, max_failures: int = 5, lockout_minutes: int = 15) -> User | None:
    """The active user with this email and password, or None. Records the sign-in, and
    every failure (audited). After ``max_failures`` failures within ``lockout_minutes`` an
    account refuses even the right password until the window has passed (SignInThrottled),
    which turns password guessing into a few tries an hour."""
    user = find_user(email)
    window = timedelta(minutes=lockout_minutes)
    if user is not None and max_failures and recent_failures(user, window) >= max_failures:
        raise SignInThrottled(f"too many failed sign-ins for this account; try again in {lockout_minutes} minutes "
                              "or ask an admin")
    if user is None or not user.active or not user.check_password(password or ""):
        # Unknown emails are recorded too (without a target) so an admin sees guessing.
        audit("login.failed", target=user, email=normalise_email(email)[:254])
        db.session.commit()
        return None
    user.last_login_at = utcnow()
    audit("login", actor=user, target=user)
    db.session.commit()
    return user


def create_user(email: str, password: str, role: str = "clinician", actor: User | None = None) -> User:
    """Create an active user. Raises AccountError for a bad email, role or password."""
    email = normalise_email(email)
    if not _EMAIL.match(email):
        raise AccountError(f"{email!r} is not an email address")
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if find_user(email) is not None:
        raise AccountError(f"a user with email {email} already exists")
    user = User(email=email, role=role, active=True)
    user.set_password(password)
    db.session.add(user)
    db.session.flush()  # the audit event needs the new id
    audit("user.create", actor=actor, target=user, role=role)
    db.session.commit()
    return user


def _active_admins() -> int:
    return db.session.scalar(select(func.count()).select_from(User).where(User.role == "admin", User.active.is_(True)))


def set_role(user: User, role: str, actor: User | None = None) -> None:
    """Change a user's role; refuses to demote the last active admin."""
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if user.role == role:
        return
    if user.role == "admin" and user.active and _active_admins() <= 1:
        raise AccountError("this is the last active admin; make another admin first")
    old = user.role
    user.role = role
    audit("user.set_role", actor=actor, target=user, old=old, new=role)
    db.session.commit()


def deactivate(user: User, actor: User | None = None) -> None:
    """Stop a user from signing in (their cases stay); refuses the last active admin."""
    if not user.active:
        return
    if user.role == "admin" and _active_admins() <= 1:
        raise AccountError("this is the last active admin; make another admin first")
    user.active = False
    end_sessions(user)
    audit("user.deactivate", actor=actor, target=user)
    db.session.commit()


def end_sessions(user: User) -> None:
    """End every session of ``user`` from its next request on (the caller commits)."""
    user.session_version = (user.session_version or 0) + 1


def has_admin() -> bool:
    return db.session.scalar(select(func.count()).select_from(User).where(User.role == "admin")) > 0
