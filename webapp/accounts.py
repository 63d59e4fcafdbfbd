"""Account management used by both the admin pages and `manage.py users`.

Each function makes one change plus its audit event and commits them together; a
rejected change raises AccountError with a message for the person who asked.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from sqlalchemy import delete, func, select
from werkzeug.security import check_password_hash, generate_password_hash

from webapp.extensions import db
from webapp.models import ROLES, SignInAttempt, User, audit, utcnow
from webapp.text import has_forbidden_characters

MIN_PASSWORD_LENGTH = 12
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
# Passwords fewer than this many different characters ("aaaaaaaaaaaa") are refused as common.
_MIN_DISTINCT_CHARACTERS = 4
_COMMON_PASSWORDS_FILE = Path(__file__).with_name("common_passwords.txt")


class AccountError(ValueError):
    """A requested account change that cannot be made; the message says why."""


def normalise_email(email: str) -> str:
    return (email or "").strip().lower()


def find_user(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == normalise_email(email)))


@lru_cache(maxsize=1)
def _common_passwords() -> frozenset[str]:
    lines = _COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


# zxcvbn's estimate of the guesses an attacker needs, at least this power of ten: its score 4
# ("strong protection from an offline slow-hash attack"). Score 3 admitted "Summer2025!!"
# (10^8.3 guesses: a season, a year and punctuation, the first thing a cracker tries).
MIN_GUESSES_LOG10 = 10.0
# Words of this product that an attacker would try first.
_SITE_WORDS = ("breast", "review", "breastreview", "ultrasound", "radiology", "hospital")


def _email_words(email: str | None) -> list[str]:
    if not email:
        return []
    local, _, domain = email.lower().partition("@")
    return [email.lower(), local, domain, *re.split(r"[._+\-]", local), *domain.split(".")]


def check_password_rule(password: str, email: str | None = None) -> None:
    """The one password rule of the web pages and the command line; raises AccountError.

    At least 12 characters, not only blank characters, not on the shipped list of common
    passwords (webapp/common_passwords.txt, compared without case), not made of fewer than
    four different characters, and at least 10^10 guesses by zxcvbn's estimate (dictionary
    words, names, dates, keyboard runs, repeats and l33t all count as cheap), with the
    account's own e-mail address and this product's words counted as known.
    """
    password = password or ""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise AccountError("the password is only spaces or other blank characters")
    if password.lower() in _common_passwords() or len(set(password.lower())) < _MIN_DISTINCT_CHARACTERS:
        raise AccountError("the password is too common or too simple; a few unrelated words make a good one")
    from zxcvbn import zxcvbn

    estimate = zxcvbn(password[:100], user_inputs=[*_email_words(email), *_SITE_WORDS])
    if estimate["guesses_log10"] < MIN_GUESSES_LOG10:
        hint = (estimate.get("feedback") or {}).get("warning") or ""
        raise AccountError("the password is too easy to guess" + (f" ({hint.rstrip('.').lower()})" if hint else "")
                           + "; three or four unrelated words make a good one")


# ------------------------------------------------------------------ signing in

@lru_cache(maxsize=1)
def _decoy_hash() -> str:
    # Checked against when the email is unknown, so that every attempt costs the same hash.
    return generate_password_hash(secrets.token_hex(16))


@dataclass(frozen=True)
class SignInLimits:
    max_failures: int = 5  # per (email, address); 0: no throttling at all
    max_address_failures: int = 100  # per address, over all emails (a hospital's NAT is many people)
    lockout_minutes: int = 15
    known_address_days: int = 30  # a success from an address this recently exempts that email there


def _throttled(email: str, address: str, limits: SignInLimits) -> bool:
    """Whether ``address`` may not try ``email`` now: too many failures for this email from
    this address (since its last success there), or from this address over all emails --
    the second only for an email never signed in from this address in the last
    ``known_address_days``, so that one person guessing behind a hospital's NAT does not
    lock out every colleague who works behind it."""
    if not limits.max_failures:
        return False
    since = utcnow() - timedelta(minutes=limits.lockout_minutes)
    last_success = db.session.scalar(select(func.max(SignInAttempt.created_at)).where(
        SignInAttempt.email == email, SignInAttempt.address == address, SignInAttempt.succeeded.is_(True)))
    pair_since = max(since, last_success) if last_success else since
    pair = db.session.scalar(select(func.count()).select_from(SignInAttempt).where(
        SignInAttempt.email == email, SignInAttempt.address == address,
        SignInAttempt.succeeded.is_(False), SignInAttempt.created_at > pair_since))
    if pair >= limits.max_failures:
        return True
    if not limits.max_address_failures:
        return False
    if last_success and last_success > utcnow() - timedelta(days=limits.known_address_days):
        return False
    overall = db.session.scalar(select(func.count()).select_from(SignInAttempt).where(
        SignInAttempt.address == address, SignInAttempt.succeeded.is_(False), SignInAttempt.created_at > since))
    return overall >= limits.max_address_failures


def _forget_old_attempts(limits: SignInLimits) -> None:
    # Failures older than the window no longer count; successes are kept as long as they
    # make an address known (_throttled). The audit log keeps the history.
    minutes = max(limits.lockout_minutes, 1)
    db.session.execute(delete(SignInAttempt).where(
        SignInAttempt.succeeded.is_(False), SignInAttempt.created_at < utcnow() - timedelta(minutes=minutes)))
    db.session.execute(delete(SignInAttempt).where(
        SignInAttempt.created_at < utcnow() - timedelta(days=max(limits.known_address_days, 1))))


def authenticate(email: str, password: str, address: str, limits: SignInLimits = SignInLimits()) -> User | None:
    """The active user with this email and password, or None; records the attempt.

    Every refusal looks the same to the caller (unknown email, wrong password, deactivated
    account, too many failures) and costs the same password-hash work, so that neither the
    answer nor its time tells whether an account exists. The reason is audited for admins.
    Failures are counted per (email as typed, client address) and per address: an attacker
    who fails from their address is refused there, while the account's owner, from
    another address, still signs in.
    """
    email = normalise_email(email)[:254]
    address = (address or "unknown")[:64]
    user = find_user(email)
    known = user is not None and user.active
    # The hash always runs, right password or not, known account or not.
    password_ok = check_password_hash(user.password_hash if known else _decoy_hash(), password or "")
    throttled = _throttled(email, address, limits)
    if known and password_ok and not throttled:
        user.last_login_at = utcnow()
        db.session.add(SignInAttempt(email=email, address=address, succeeded=True))
        audit("login", actor=user, target=user, address=address)
        db.session.commit()
        return user
    _forget_old_attempts(limits)
    reason = ("throttled" if throttled else "unknown email" if user is None
              else "deactivated" if not user.active else "wrong password")
    db.session.add(SignInAttempt(email=email, address=address, succeeded=False))
    # Unknown emails are recorded too (without a target) so an admin sees guessing.
    audit("login.failed", target=user, email=email, address=address, reason=reason)
    db.session.commit()
    return None


def failed_sign_ins(user: User, minutes: int) -> int:
    """Failed sign-ins for ``user``'s email, from any address, in the last ``minutes``."""
    return db.session.scalar(select(func.count()).select_from(SignInAttempt).where(
        SignInAttempt.email == user.email, SignInAttempt.succeeded.is_(False),
        SignInAttempt.created_at > utcnow() - timedelta(minutes=minutes)))


def unlock(user: User, actor: User | None = None) -> int:
    """Forget the failed sign-ins for ``user``'s email (every address), so that no address
    is throttled for it any more; returns how many were forgotten. Audited."""
    failures = db.session.execute(delete(SignInAttempt).where(
        SignInAttempt.email == user.email, SignInAttempt.succeeded.is_(False))).rowcount
    audit("user.unlock", actor=actor, target=user, failures_cleared=failures)
    db.session.commit()
    return failures


# ------------------------------------------------------------------ passwords

def change_password(user: User, current: str, new: str, address: str = "unknown",
                    limits: SignInLimits = SignInLimits()) -> None:
    """The user's own change: the current password, then the rule; the new one must differ.

    Ends the user's other sessions (the caller re-stamps its own). A wrong current password
    counts as a failed sign-in, so a stolen session cannot be used to guess the password.
    """
    if _throttled(user.email, address, limits) or not user.check_password(current or ""):
        db.session.add(SignInAttempt(email=user.email, address=(address or "unknown")[:64], succeeded=False))
        audit("user.change_password.failed", actor=user, target=user, address=address)
        db.session.commit()
        raise AccountError("the current password is wrong")
    check_password_rule(new, user.email)
    if user.check_password(new):
        raise AccountError("the new password must differ from the current one")
    user.set_password(new)
    user.must_change_password = False
    end_sessions(user)
    audit("user.change_password", actor=user, target=user)
    db.session.commit()


def reset_password(user: User, temporary: str, actor: User | None = None) -> None:
    """An admin's reset: a temporary password that must be changed at the next sign-in.
    Ends the user's sessions and forgets their failed sign-ins."""
    check_password_rule(temporary, user.email)
    user.set_password(temporary)
    user.must_change_password = True
    end_sessions(user)
    db.session.execute(delete(SignInAttempt).where(
        SignInAttempt.email == user.email, SignInAttempt.succeeded.is_(False)))
    audit("user.reset_password", actor=actor, target=user)
    db.session.commit()


def create_user(email: str, password: str, role: str = "clinician", actor: User | None = None,
                must_change_password: bool = False) -> User:
    """Create an active user. Raises AccountError for a bad email, role or password.

    ``must_change_password``: the user must choose their own password at the first sign-in
    (accounts an admin creates on the users page)."""
    email = normalise_email(email)
    if not _EMAIL.match(email) or has_forbidden_characters(email):
        raise AccountError(f"{email!r} is not an email address")
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    check_password_rule(password, email)
    if find_user(email) is not None:
        raise AccountError(f"a user with email {email} already exists")
    user = User(email=email, role=role, active=True, must_change_password=must_change_password)
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
