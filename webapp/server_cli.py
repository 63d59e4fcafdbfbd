"""The commands that serve the app: `run` (the app with one worker and, without
CELERY_BROKER_URL, the embedded broker: for a laptop) and `serve` (the web app alone under
gunicorn: production), with what they check before starting (an up-to-date database
schema; `serve_refusal`'s rules for settings that reach beyond this machine) and werkzeug's
request handler without its version banner. :mod:`webapp.cli` lists these commands in
COMMANDS and re-exports every name here. Nothing here imports torch: the worker that `run`
starts is a separate process.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import click
from werkzeug.serving import WSGIRequestHandler

from webapp.config import EMBEDDED_BROKER, PROJECT_ROOT, load_config


def _schema_is_current(app) -> bool:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from webapp import MIGRATIONS_DIR
    from webapp.extensions import db

    heads = set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())
    with db.engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == heads


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler without the ``Server: Werkzeug/x Python/y`` banner."""

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() != "server":  # a version banner tells attackers what to try
            super().send_header(keyword, value)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--concurrency", type=int, default=None, help="Worker processes (default WORKER_CONCURRENCY, 1).")
@click.option("--demo", is_flag=True, help="Also register the bundled demo model and queue the sample images (idempotent).")
def run(host: str, port: int, concurrency: int | None, demo: bool) -> None:
    """Serve the app with one worker and (without CELERY_BROKER_URL) the embedded broker.

    For a laptop. In production run a WSGI server and `manage.py worker` separately. A worker
    or embedded broker that dies is restarted within seconds (webapp.supervisor).
    """
    from werkzeug.serving import run_simple

    from webapp import create_app
    from webapp.broker import BrokerUnavailable, EmbeddedBroker
    from webapp.models import set_command_line_actor
    from webapp.supervisor import Supervisor

    set_command_line_actor(None)  # events of the server and its worker are the system's

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
    supervisor = None
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
        def resend_pending() -> str:
            from webapp.background import sweep_cases
            from webapp.extensions import db

            with app.app_context():
                try:
                    result = sweep_cases(app, every_pending=True)
                finally:
                    db.session.remove()
            return (f"sent {len(result.sent) + len(result.resent)} pending case(s) again"
                    + (f"; {result.waiting} still waiting" if result.waiting else ""))

        supervisor = Supervisor(lambda: subprocess.Popen(command), broker, say=lambda line: click.echo(line, err=True),
                                after_broker_restart=resend_pending)
        worker = supervisor.start()
        if demo:
            # A separate process: reading the checkpoint needs torch, which this one never loads.
            subprocess.run([sys.executable, str(PROJECT_ROOT / "manage.py"), "demo", "--broker-url", url], check=False)
        click.echo(f"serving on http://{host}:{port}/ (worker pid {worker.pid}; Ctrl-C stops both)")
        run_simple(host, port, app, threaded=True, use_reloader=False, request_handler=QuietRequestHandler)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        worker = None
        if supervisor is not None:
            supervisor.stop()   # a stop on purpose is not a death to repair
            worker = supervisor.worker
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
