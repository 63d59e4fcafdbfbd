"""Security headers on every response, and no caching of anything but static files.

The policy allows scripts, styles, images and connections from this site only, and no
inline script or style at all (templates keep theirs in static/), so that an injected
``<script>`` or ``style=`` cannot run even if escaping ever failed. Patient pages, images
and heatmaps are ``no-store``: a shared computer keeps nothing after sign-out.
"""
from __future__ import annotations

from flask import Flask, Response, request

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])


def register(app: Flask) -> None:
    @app.after_request
    def security_headers(response: Response) -> Response:
        headers = response.headers
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["X-Content-Type-Options"] = "nosniff"
        headers["X-Frame-Options"] = "DENY"  # for browsers older than frame-ancestors
        headers["Referrer-Policy"] = "no-referrer"  # case URLs carry case numbers
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if app.config.get("SESSION_COOKIE_SECURE"):
            headers["Strict-Transport-Security"] = f"max-age={app.config['HSTS_MAX_AGE']}"
        if request.endpoint != "static":
            # Everything but CSS and JavaScript may show patient data or depend on who asks.
            # "private" as well, for caches that do not know no-store.
            headers["Cache-Control"] = "no-store, private"
            headers.pop("Expires", None)
        headers.pop("Server", None)
        return response
