"""Account management used by both the admin pages and `manage.py users`.

Each function makes one change plus its audit event and commits them together; a
rejected change raises AccountError with a message for the person who asked.
"""
from __future__ import annotations

import re

from sqlalchemy import func, select

from webapp.extensions import db
from webapp.models import ROLES, User, audit, utcnow

MIN_PASSWORD_LENGTH = 10
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class AccountError(ValueError):
    """A requested account change that cannot be made; the message says why."""


def normalise_email(email: str) -> str:
    return (email or "").strip().lower()


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == normalise_email(email)))


def authenticate(email: str, password: str) -> User | None:
    """The active user with this email and password, or None. Records the sign-in."""
    user = find_user(email)
    if user is None or not user.active or not user.check_password(password or ""):
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
    audit("user.deactivate", actor=actor, target=user)
    db.session.commit()


def has_admin() -> bool:
    return db.session.scalar(select(func.count()).select_from(User).where(User.role == "admin")) > 0
