"""API tokens: created and revoked by an admin, each acting as one user with that user's role.

A token is ``brv_`` plus 43 random URL-safe characters (256 bits). Only its sha256 is
stored, so a copy of the database gives no usable token; the secret is shown once, when it
is created. Looking a token up by its hash needs no constant-time comparison: an attacker
who times the lookup learns about hashes, not about secrets.

Callable without HTTP: `manage.py tokens ...` and the API's authentication use these.
"""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select

from webapp.extensions import db
from webapp.models import ApiToken, User, audit, utcnow

TOKEN_PREFIX = "brv_"
# A token's last use is written at most this often: not one database write per request.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


class TokenError(ValueError):
    """A token that cannot be created, revoked or used; the message says why."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(user: User, name: str, *, actor: User | None = None,
                 expires_days: int | None = None) -> tuple[ApiToken, str]:
    """Create a token acting as ``user``; returns the row and the secret (shown once, never stored)."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise TokenError("give the token a name of 1 to 100 characters (what or who uses it)")
    if not user.active:
        raise TokenError(f"{user.email} is deactivated; a token for them would not work")
    if expires_days is not None and expires_days < 1:
        raise TokenError("a token must live at least one day")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=name, token_hash=hash_secret(secret), prefix=secret[:10],
                     created_by_id=actor.id if actor else None,
                     expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None)
    db.session.add(token)
    db.session.flush()
    audit("api_token.create", actor=actor, target=token, user=user.email, name=name, prefix=token.prefix,
          expires_at=token.expires_at.isoformat() if token.expires_at else None)
    db.session.commit()
    return token, secret


def revoke_token(token: ApiToken, *, actor: User | None = None) -> None:
    """Revoke a token for good: it is refused from the next request on."""
    if token.revoked_at is not None:
        raise TokenError(f"token {token.id} was already revoked")
    token.revoked_at = utcnow()
    audit("api_token.revoke", actor=actor, target=token, user=token.user.email, name=token.name,
          prefix=token.prefix)
    db.session.commit()


def list_tokens(include_revoked: bool = False) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(db.session.scalars(query))


def user_for_secret(secret: str) -> User:
    """The active user a live token acts as; TokenError (one vague message) otherwise."""
    token = db.session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))
    now = utcnow()
    # The same answer for unknown, revoked, expired and deactivated: a client learns only
    # that this token does not work.
    if (token is None or token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now)
            or not token.user.active):
        raise TokenError("the token is unknown, revoked or expired, or its account is deactivated")
    if token.last_used_at is None or now - token.last_used_at > _LAST_USED_RESOLUTION:
        token.last_used_at = now
        db.session.commit()
    return token.user
