"""`manage.py init`, `users ...`, `run`, `serve`, `sweep`, `tokens ...`: parse, then delegate.

Nothing here imports torch: the worker that `run` starts is a separate process.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import click
from werkzeug.serving import WSGIRequestHandler

from webapp.config import EMBEDDED_BROKER, PROJECT_ROOT, load_config


@contextmanager
def _app_context(config=None):
    from webapp import create_app

    app = create_app(config)
    with app.app_context():
        yield app


def _schema_is_current(app) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from webapp import MIGRATIONS_DIR
    from webapp.extensions import db

    heads = set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())
    with db.engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == heads


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


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler without the ``Server: Werkzeug/x Python/y`` banner."""

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() != "server":  # a version banner tells attackers what to try
            super().send_header(keyword, value)


@contextmanager
def private_files():
    """Files and folders created inside are readable by this account only (umask 077)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--concurrency", type=int, default=None, help="Worker processes (default WORKER_CONCURRENCY, 1).")
@click.option("--demo", is_flag=True, help="Also register the bundled demo model and queue the sample images (idempotent).")
def run(host: str, port: int, concurrency: int | None, demo: bool) -> None:
    from webapp.models import set_command_line_actor

    set_command_line_actor(None)  # events of the server and its worker are the system's
    """Serve the app with one worker and (without CELERY_BROKER_URL) the embedded broker.

    For a laptop. In production run a WSGI server and `manage.py worker` separately.
    """
    from werkzeug.serving import run_simple

    from webapp import create_app
    from webapp.broker import BrokerUnavailable, EmbeddedBroker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Stop cleanly on SIGTERM as on Ctrl-C (and even where a shell started us with SIGINT
    # ignored): the worker must be stopped and the broker saved before we exit.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # Whatever this process and the worker it starts create (database, WAL, broker data,
    # stored images) is for this account only.
    os.umask(0o077)
    settings = load_config()
    broker = None
    url = settings["CELERY_BROKER_URL"]
    if url == EMBEDDED_BROKER:
        broker = EmbeddedBroker(settings["INSTANCE_PATH"])
        try:
            url = broker.start()
        except BrokerUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    worker = None
    app = None
    try:
        app = create_app({"CELERY_BROKER_URL": url})
        with app.app_context():
            if not _schema_is_current(app):
                raise click.ClickException("the database is not initialised or not up to date: "
                                           "run 'python manage.py init' first")
        command = [sys.executable, str(PROJECT_ROOT / "manage.py"), "worker", "--broker-url", url]
        if concurrency:
            command += ["--concurrency", str(concurrency)]
        worker = subprocess.Popen(command)
        if demo:
            # A separate process: reading the checkpoint needs torch, which this one never loads.
            subprocess.run([sys.executable, str(PROJECT_ROOT / "manage.py"), "demo", "--broker-url", url], check=False)
        click.echo(f"serving on http://{host}:{port}/ (worker pid {worker.pid}; Ctrl-C stops both)")
        run_simple(host, port, app, threaded=True, use_reloader=False, request_handler=QuietRequestHandler)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        if worker is not None:
            worker.terminate()  # warm shutdown: the current job finishes or goes back to the queue
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if app is not None:
            # Close Celery's broker connections before the broker itself goes away.
            app.extensions["celery"].close()
        if broker is not None:
            broker.stop()


#: The shortest SECRET_KEY that `serve` accepts where several machines may serve the app.
MIN_SECRET_KEY_LENGTH = 32
_LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


def _runs_on_several_machines(settings: dict) -> bool:
    """True when the settings point beyond this machine: a database other than SQLite (which
    cannot be shared between machines) or a broker reached over the network."""
    from urllib.parse import urlsplit

    host = urlsplit(settings["CELERY_BROKER_URL"]).hostname or ""  # none for a Unix socket
    remote_broker = host not in _LOCAL_HOSTS and not host.startswith("127.")
    return not settings["SQLALCHEMY_DATABASE_URI"].startswith("sqlite") or remote_broker


def serve_refusal(settings: dict) -> str | None:
    """Why `manage.py serve` must not start with these settings, or None when it may.

    `serve` starts neither a broker nor a worker, so it needs the broker the workers use.
    Where the deployment reaches beyond this machine (PostgreSQL, or a broker on another
    host), the session-signing key must be the operator's (SECRET_KEY, the same on every
    web machine, at least MIN_SECRET_KEY_LENGTH characters), not one generated into this
    machine's instance folder: another web machine would generate a different one and
    reject this one's sessions.
    """
    if settings["CELERY_BROKER_URL"] == EMBEDDED_BROKER:
        return ("'serve' runs the web app only and starts no broker: set CELERY_BROKER_URL=redis://HOST:6379/0 "
                "(the value the workers use), or use 'python manage.py run' on a single machine")
    if _runs_on_several_machines(settings):
        if settings.get("SECRET_KEY_GENERATED"):
            return ("SECRET_KEY is not set: with PostgreSQL or a broker on another machine every web machine must "
                    "sign sessions with the same key; set SECRET_KEY to a random value of at least "
                    f"{MIN_SECRET_KEY_LENGTH} characters, e.g. python -c 'import secrets; print(secrets.token_hex(32))'")
        if len(settings["SECRET_KEY"]) < MIN_SECRET_KEY_LENGTH:
            return (f"SECRET_KEY is too short ({len(settings['SECRET_KEY'])} characters): use a random value of at "
                    f"least {MIN_SECRET_KEY_LENGTH}, e.g. python -c 'import secrets; print(secrets.token_hex(32))'")
    return None


def _gunicorn_application(options: dict):
    """A gunicorn application that builds the web app in each of its worker processes."""
    from gunicorn.app.base import BaseApplication

    class WebServer(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            from webapp import create_app

            # Built after the fork: every process opens its own database and broker connections.
            return create_app()

    return WebServer()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put HTTPS in front).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Web processes (default WEB_CONCURRENCY, 2).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads per web process (default WEB_THREADS, 4).")
@click.option("--access-log", is_flag=True, help="Log every request to standard error.")
def serve(host: str, port: int, workers: int | None, threads: int | None, access_log: bool) -> None:
    """Serve the web app under gunicorn: the production web server (docs/deploy.md).

    Web only: the broker (Redis) and the workers ('manage.py worker') run separately.
    Refuses to start on a database that is not up to date ('manage.py init' first) and,
    where the app reaches beyond this machine, without a SECRET_KEY of its own.
    SIGTERM stops it gracefully (requests in progress finish).
    """
    from sqlalchemy.exc import SQLAlchemyError

    from webapp import create_app
    from webapp.extensions import db
    from webapp.models import set_command_line_actor

    set_command_line_actor(None)  # events of the server are the system's or the signed-in user's
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Whatever the web processes create (uploaded images, a SQLite database) is for this account only.
    os.umask(0o077)
    settings = load_config()
    refusal = serve_refusal(settings)
    if refusal:
        raise click.ClickException(refusal)
    app = create_app()
    try:
        with app.app_context():
            try:
                current = _schema_is_current(app)
            except SQLAlchemyError as exc:
                raise click.ClickException(f"cannot reach the database: {exc.__class__.__name__}: "
                                           f"{str(exc).splitlines()[0]}") from None
            if not current:
                raise click.ClickException("the database is not initialised or not up to date: "
                                           "run 'python manage.py init' first")
            db.engine.dispose()  # no connection of this process may cross the fork
    finally:
        app.extensions["celery"].close()
    workers = workers or settings["WEB_CONCURRENCY"]
    threads = threads or settings["WEB_THREADS"]
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    click.echo(f"serving on http://{bind}/ with {workers} process(es) x {threads} thread(s); "
               "SIGTERM or Ctrl-C stops it")
    _gunicorn_application({
        "bind": [bind], "workers": workers, "threads": threads, "worker_class": "gthread",
        "timeout": settings["WEB_TIMEOUT"], "graceful_timeout": settings["WEB_TIMEOUT"],
        "proc_name": "breast-review-web", "errorlog": "-", "accesslog": "-" if access_log else None,
        "loglevel": "info",
        # The client address and scheme come from TRUSTED_PROXIES (ProxyFix in the app)
        # alone, not from a second rule of gunicorn's.
        "forwarded_allow_ips": "",
        # gunicorn's control socket sits at one path per account; several servers (or test
        # runs) on one machine would fight over it, and nothing here uses it.
        "control_socket_disable": True,
    }).run()


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
