"""Issue 10, item 9: security headers on every response, no caching of patient data, no
inline script or style in any template, and no server version banner."""
from __future__ import annotations

import io
import re
import threading
import urllib.request

from tests.appfixtures import add_user, image_bytes, login
from webapp.config import PROJECT_ROOT


def _csp(response) -> dict[str, str]:
    policy = response.headers["Content-Security-Policy"]
    return {part.split()[0]: part.strip() for part in policy.split(";") if part.strip()}


def test_every_kind_of_response_carries_the_headers(app, client):
    add_user(app, "doc@example.org")
    responses = [client.get("/login"), client.get("/cases"), client.get("/healthz"),
                 client.get("/static/css/app.css"), client.get("/no-such-page")]
    login(client, "doc@example.org")
    client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    responses += [client.get("/cases"), client.get("/cases/1"), client.get("/cases/1/image"),
                  client.get("/cases/1/status"), client.get("/cases/99")]
    for response in responses:
        headers = response.headers
        csp = _csp(response)
        assert csp["frame-ancestors"] == "frame-ancestors 'none'"
        assert csp["default-src"] == "default-src 'self'"
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
        assert "'unsafe-eval'" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Frame-Options"] == "DENY"
        assert "Strict-Transport-Security" not in headers  # plain HTTP on a laptop


def test_patient_pages_images_and_heatmaps_are_never_stored(app, client):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    for path in ("/cases", "/cases/1", "/cases/1/image", "/cases/1/status"):
        response = client.get(path)
        assert response.status_code == 200, path
        directives = {d.strip() for d in response.headers["Cache-Control"].split(",")}
        assert directives == {"no-store", "private"}, (path, directives)
        assert "Expires" not in response.headers or response.headers["Expires"].startswith("Thu, 01 Jan 1970")


def test_hsts_only_with_secure_cookies(make_app):
    app = make_app(SESSION_COOKIE_SECURE=True, REMEMBER_COOKIE_SECURE=True)
    response = app.test_client().get("/login", base_url="https://localhost")
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_templates_and_static_files_have_no_inline_script_or_style():
    offenders = []
    inline = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|<style\b|\sstyle\s*=|\son[a-z]+\s*=|javascript:", re.I)
    for folder in ("templates", "static"):
        for path in (PROJECT_ROOT / folder).rglob("*"):
            if path.suffix in (".html", ".svg") and inline.search(path.read_text()):
                offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert offenders == []


def test_the_development_server_sends_no_version_banner(app):
    from werkzeug.serving import make_server

    from webapp.cli import QuietRequestHandler

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/login") as response:
            headers = response.headers
    finally:
        server.shutdown()
    assert headers.get("Server") in (None, "")
    assert "Werkzeug" not in str(headers) and "Python/" not in str(headers)
