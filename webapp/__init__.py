"""The web app: HTTP, forms, accounts, database models and the image store.

Never imports torch or `ml/`: predictions are made by the worker, which the web app
reaches only through the broker (tasks are sent by name).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Mapping

from flask import Flask, abort, redirect, request, url_for
from sqlalchemy import event
from sqlalchemy.engine import Engine

from webapp.config import PROJECT_ROOT, load_config
from webapp.extensions import csrf, db, login_manager, migrate
from webapp.storage import FileStore, make_private
from webapp.text import has_forbidden_characters

MIGRATIONS_DIR = PROJECT_ROOT / "migrations"


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app (and its Celery app) from the environment plus ``config``.

    ``config`` overrides environment settings (see `webapp.config.load_config`); tests
    pass a temporary database and storage folder this way.
    """
    settings = load_config(config)
    app = Flask(
        __name__,
        instance_path=settings["INSTANCE_PATH"],
        template_folder=str(PROJECT_ROOT / "templates"),
        static_folder=str(PROJECT_ROOT / "static"),
    )
    app.config.update(settings)
    from webapp.requests import AppRequest

    app.request_class = AppRequest
    make_private(Path(app.instance_path), directory=True)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///"):
        # SQLite gives its WAL and shared-memory files the database file's mode, so a
        # private database file keeps all three private.
        make_private(Path(app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")))
    if app.config["TRUSTED_PROXIES"]:
        # The client address (sign-in throttling, audit) from X-Forwarded-For, as set by
        # that many proxies of ours; without them the header is ignored.
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=app.config["TRUSTED_PROXIES"], x_proto=app.config["TRUSTED_PROXIES"])

    db.init_app(app)
    # Batch mode: SQLite cannot ALTER most things, so migrations copy-and-swap tables.
    migrate.init_app(app, db, directory=str(MIGRATIONS_DIR), render_as_batch=True)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please sign in to continue."
    login_manager.session_protection = "strong"
    csrf.init_app(app)
    app.extensions["file_store"] = FileStore(app.config["STORAGE_DIR"])

    from webapp import errors
    from webapp.admin.routes import bp as admin_bp
    from webapp.api.routes import bp as api_bp
    from webapp.auth.routes import bp as auth_bp
    from webapp.cases.routes import bp as cases_bp
    from webapp.review.routes import bp as reviews_bp

    app.register_blueprint(auth_bp)
    app.register_blueprint(cases_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(reviews_bp)
    # The API takes bearer tokens only, never the session cookie, so a forged cross-site
    # request carries no credential there: CSRF tokens are for cookie-authenticated forms.
    csrf.exempt(api_bp)
    app.register_blueprint(api_bp)
    errors.register(app)
    from webapp import headers

    headers.register(app)
    app.before_request(_refuse_control_characters)
    from webapp.formatting import class_words, figure, verdict_words

    app.jinja_env.filters.update(figure=figure, verdict_words=verdict_words, class_words=class_words)

    @app.get("/")
    def index():  # the case list is the home page
        return redirect(url_for("cases.case_list"))

    @app.get("/healthz")
    def healthz():  # for load balancers and monitoring: 503 names what fails
        from webapp.health import health_report

        return health_report(app, tuple(request.args.getlist("require")))

    from webapp.background import celery_init_app

    celery_init_app(app)
    return app


def _refuse_control_characters():
    """Refuse a request whose path, query or form fields carry NUL, control or bidi
    characters (400): PostgreSQL cannot store NUL, and bidi controls make text read
    differently from what it is. Passwords are left alone (hashed, never shown); uploaded
    file names are cleaned instead (`intake.display_name`)."""
    fields = [request.path, *request.args.keys(), *request.args.values()]
    if request.method in ("POST", "PUT", "PATCH"):
        fields += [value for key, value in request.form.items(multi=True) if "password" not in key
                   and key not in ("current", "new", "confirm")]
        fields += list(request.form.keys())
    if any(has_forbidden_characters(value) for value in fields):
        abort(400, description="The request contains characters that are not allowed (NUL, other control "
                               "characters or text-direction controls such as right-to-left override). "
                               "Remove them and send again.")


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the web app read while the worker writes; busy_timeout waits for a lock
    # instead of failing with "database is locked".
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # 30 s, unless the engine was given another timeout (connect_args={"timeout": ...}):
        # Python's sqlite3 default is 5 s, so any other value was asked for and is kept.
        if cursor.execute("PRAGMA busy_timeout").fetchone()[0] == 5000:
            cursor.execute("PRAGMA busy_timeout=30000")
        # FULL: a commit is on disk before it returns. Under WAL, NORMAL can lose the last
        # commits on a power loss, and those are reviews, i.e. expert time (docs/operations.md).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
