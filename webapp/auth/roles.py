"""Role checks: every route names the roles that may use it."""
from __future__ import annotations

from functools import wraps
from typing import Callable

from flask import abort
from flask_login import current_user, login_required


def role_required(*roles: str) -> Callable:
    """Require a signed-in, active user with one of ``roles``; others get 403."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        @login_required
        def wrapped(*args, **kwargs):
            if not current_user.has_role(*roles):
                abort(403, description="Your account's role does not allow this page.")
            return view(*args, **kwargs)

        # Read by tests/webapp/test_route_rules.py: every route must name its roles.
        wrapped.required_roles = roles
        return wrapped

    return decorator


ANY_ROLE = ("clinician", "reviewer", "admin")
