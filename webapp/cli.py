"""`manage.py init`, `users ...`, `run`, `serve`, `sweep`, `tokens ...`: parse, then delegate.

The serving commands, `run` and `serve`, and their checks are `webapp.server_cli`
(re-exported here); this module has the database, account, outbox and token commands.
Nothing here imports torch: the worker that `run` starts is a separate process.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import click

from webapp.server_cli import run, serve
from webapp.server_cli import (MIN_SECRET_KEY_LENGTH, QuietRequestHandler, _LOCAL_HOSTS,  # noqa: F401 (re-exported)
                               _gunicorn_application, _interrupt, _runs_on_several_machines,
                               _schema_is_current, serve_refusal)


@contextmanager
def _app_context(config=None):
    from webapp import create_app

    app = create_app(config)
    with app.app_context():
        yield app


@click.command()
@click.option("--admin-email", help="Email of the first admin (else ADMIN_EMAIL, else a prompt).")
def init(admin_email: str | None) -> None:
    """Create or upgrade the database, then create the first admin if there is none.

    The admin's password comes from ADMIN_PASSWORD or a prompt; it is never printed.
    Safe to run again: it only applies new migrations.
    """
    import flask_migrate

    from webapp import MIGRATIONS_DIR
    from webapp.accounts import AccountError, create_user, has_admin

    with private_files(), _app_context() as app:  # the database it creates is ours alone
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        click.echo(f"database ready: {app.config['SQLALCHEMY_DATABASE_URI'].split('@')[-1]}")
        if has_admin():
            click.echo("an admin account exists; no account created")
            return
        email = admin_email or app.config["ADMIN_EMAIL"] or click.prompt("Email of the first admin")
        password = app.config["ADMIN_PASSWORD"] or click.prompt(
            "Password for the first admin", hide_input=True, confirmation_prompt=True)
        try:
            user = create_user(email, password, "admin")
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created admin {user.email}")


@click.group()
def users() -> None:
    """Create, list and manage accounts."""


def _read_password(prompt: str, from_stdin: bool) -> str:
    """A password from one line of standard input (``--password-stdin``, for scripts) or a
    hidden prompt typed twice; never from the command line, where shell history and the
    process list would keep it."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


@users.command("create")
@click.argument("email")
@click.option("--role", type=click.Choice(["clinician", "reviewer", "admin"]), default="clinician", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input.")
@click.option("--must-change/--no-must-change", default=False, show_default=True,
              help="Make the user choose their own password at the first sign-in.")
def users_create(email: str, role: str, password_stdin: bool, must_change: bool) -> None:
    """Create an account; the password is prompted for (or read from standard input)."""
    from webapp.accounts import AccountError, create_user

    password = _read_password(f"Password for {email}", password_stdin)
    with _app_context():
        try:
            user = create_user(email, password, role, must_change_password=must_change)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created {user.email} ({user.role})")


@users.command("reset-password")
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the temporary password from one line of standard input.")
def users_reset_password(email: str, password_stdin: bool) -> None:
    """Set a temporary password; the user must choose a new one at the next sign-in."""
    from webapp.accounts import AccountError, reset_password

    password = _read_password(f"Temporary password for {email}", password_stdin)
    with _app_context():
        user = _user_or_fail(email)
        try:
            reset_password(user, password)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"password of {user.email} reset; they must choose a new password at the next sign-in")


@users.command("unlock")
@click.argument("email")
def users_unlock(email: str) -> None:
    """Forget an account's failed sign-ins, so that no address is throttled for it."""
    from webapp.accounts import unlock

    with _app_context():
        user = _user_or_fail(email)
        count = unlock(user)
        click.echo(f"{user.email} may sign in again from every address ({count} failed sign-in(s) forgotten)")


@users.command("list")
def users_list() -> None:
    """List accounts: email, role, active, last sign-in."""
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import User

    with _app_context():
        for user in db.session.scalars(select(User).order_by(User.email)):
            last = user.last_login_at.strftime("%Y-%m-%d %H:%M") if user.last_login_at else "never"
            click.echo(f"{user.email:40} {user.role:10} {'active' if user.active else 'inactive':9} {last}")


def _user_or_fail(email: str):
    from webapp.accounts import find_user

    user = find_user(email)
    if user is None:
        raise click.ClickException(f"no user with email {email}")
    return user


@users.command("set-role")
@click.argument("email")
@click.argument("role", type=click.Choice(["clinician", "reviewer", "admin"]))
def users_set_role(email: str, role: str) -> None:
    """Change an account's role."""
    from webapp.accounts import AccountError, set_role

    with _app_context():
        user = _user_or_fail(email)
        try:
            set_role(user, role)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{user.email} is now {user.role}")


@users.command("deactivate")
@click.argument("email")
def users_deactivate(email: str) -> None:
    """Stop an account from signing in; its cases stay."""
    from webapp.accounts import AccountError, deactivate

    with _app_context():
        user = _user_or_fail(email)
        try:
            deactivate(user)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{user.email} deactivated")


@click.command()
def sweep() -> None:
    """Send queued cases the broker has not taken yet, and again those whose job was lost.

    Every worker does this by itself every SWEEP_INTERVAL seconds; this runs one pass now.
    """
    from webapp.background import sweep_cases

    with _app_context() as app:
        result = sweep_cases(app)
    click.echo(f"sent from the outbox: {len(result.sent)}; lost jobs sent again: {len(result.resent)}; "
               f"still waiting: {result.waiting}")
    if result.waiting:
        raise click.ClickException("the broker did not take every case; see the log, then run again")


@contextmanager
def private_files():
    """Files and folders created inside are readable by this account only (umask 077)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens (docs/api.md)."""


@tokens.command("create")
@click.argument("email")
@click.option("--name", required=True, help="What or who uses the token (shown in the list and the audit log).")
@click.option("--expires-days", type=int, default=None, help="Refuse the token after this many days (default: never).")
def tokens_create(email: str, name: str, expires_days: int | None) -> None:
    """Create a token acting as EMAIL's account; the secret is printed this once only."""
    from webapp.api.tokens import TokenError, create_token

    with _app_context():
        user = _user_or_fail(email)
        try:
            token, secret = create_token(user, name, expires_days=expires_days)
        except TokenError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"token {token.id} for {user.email} ({user.role}), '{token.name}'"
                   + (f", expires {token.expires_at:%Y-%m-%d %H:%M} UTC" if token.expires_at else ""))
        click.echo("Copy it now; it is stored hashed and cannot be shown again:", err=True)
        click.echo(secret)


@tokens.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include revoked tokens.")
def tokens_list(show_all: bool) -> None:
    """List tokens: id, start of the secret, account, role, name, last use, expiry."""
    from webapp.api.tokens import list_tokens

    def when(value):
        return value.strftime("%Y-%m-%d %H:%M") if value else "never"

    with _app_context():
        for token in list_tokens(include_revoked=show_all):
            state = f"revoked {when(token.revoked_at)}" if token.revoked_at else f"expires {when(token.expires_at)}"
            click.echo(f"{token.id:5} {token.prefix}…  {token.user.email:32} {token.user.role:10} "
                       f"{token.name[:30]:30} used {when(token.last_used_at):16} {state}")


@tokens.command("revoke")
@click.argument("token_id", type=int)
def tokens_revoke(token_id: int) -> None:
    """Revoke a token (by the id that 'tokens list' shows); it is refused from then on."""
    from webapp.api.tokens import TokenError, revoke_token
    from webapp.extensions import db
    from webapp.models import ApiToken

    with _app_context():
        token = db.session.get(ApiToken, token_id)
        if token is None:
            raise click.ClickException(f"no token with id {token_id}")
        try:
            revoke_token(token)
        except TokenError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"token {token.id} ({token.prefix}…, {token.user.email}) revoked")


COMMANDS = [init, users, run, serve, sweep, tokens]
