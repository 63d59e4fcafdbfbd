"""Error pages: a clear message and the right status, as HTML or JSON as asked."""
from __future__ import annotations

from flask import Flask, render_template, request
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from webapp.extensions import db
from webapp.intake import UploadRefused


def _wants_json() -> bool:
    if request.path.startswith("/api/"):  # the JSON API answers in JSON, whatever the client accepts
        return True
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def _render(status: int, title: str, message: str):
    if _wants_json():
        return {"error": title, "message": message}, status
    return render_template("errors/error.html", status=status, title=title, message=message), status


def register(app: Flask) -> None:
    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc):
        limit_mb = app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024)
        return _render(413, "Upload too large",
                       f"The upload is larger than the {limit_mb} MB limit for one submission, "
                       "so nothing was stored. Send fewer or smaller files at a time.")

    @app.errorhandler(UploadRefused)
    def upload_refused(exc: UploadRefused):
        db.session.rollback()
        response, status = _render(exc.status, exc.title, exc.message)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        return response, status, headers

    @app.errorhandler(OperationalError)
    def database_unavailable(_exc):
        # A lock held too long or a database that is down: nothing of this request was
        # committed, and trying again later is the right thing for the client to do.
        app.logger.exception("database unavailable")
        db.session.rollback()
        retry = app.config["RETRY_AFTER_S"]
        response, status = _render(503, "Service temporarily unavailable",
                                   "The database is busy or unavailable, so nothing was saved. "
                                   f"Try again in {retry} seconds.")
        return response, status, {"Retry-After": str(retry)}

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        return _render(400, "Form expired",
                       "The form was missing its security token or it had expired. "
                       "Reload the page and submit again.")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _render(exc.code or 500, exc.name, exc.description or "")

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        app.logger.exception("unhandled error")
        db.session.rollback()  # nothing half-written survives the failed request
        return _render(500, "Server error", "Something went wrong on our side; nothing was saved.")
