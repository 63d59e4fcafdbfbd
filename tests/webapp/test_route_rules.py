"""Every route has an access rule: enumerated from app.url_map, so a new route without
one fails here. Anonymous requests are sent to the sign-in page (or refused); only the
explicit allow-list below opens without signing in."""
from __future__ import annotations

import re

import pytest

from tests.appfixtures import add_user, login

#: Endpoints anyone may reach, and why.
PUBLIC = {
    "static": "CSS and JavaScript",
    "auth.login": "the sign-in page itself",
    "healthz": "load balancers and monitoring; answers ok/503 only",
    "index": "redirects to the case list, which needs a sign-in",
}

_SAMPLE = {"int": "1", "default": "v1", "path": "css/app.css"}


def _url(rule) -> str:
    def sample(match):
        converter, name = match.group(1), match.group(2)
        if converter and converter.startswith("any("):
            return converter[4:].split(",")[0].strip()
        return _SAMPLE.get(converter or "default", "v1")
    return re.sub(r"<(?:([^:<>]+):)?([^<>]+)>", sample, rule.rule)


def _routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def test_every_route_names_the_roles_that_may_use_it(app):
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        view = app.view_functions[rule.endpoint]
        if not getattr(view, "required_roles", None):
            missing.append(rule.endpoint)
    assert missing == [], "routes without role_required(...): " + ", ".join(missing)


def test_anonymous_requests_are_sent_to_sign_in_everywhere_but_the_allow_list(app):
    client = app.test_client()
    opened = []
    for rule, method in _routes(app):
        if rule.endpoint in PUBLIC:
            continue
        response = client.open(_url(rule), method=method)
        redirected = response.status_code == 302 and "/login" in response.headers["Location"]
        if not (redirected or response.status_code in (401, 403)):
            opened.append((method, rule.rule, response.status_code))
    assert opened == []


def test_admin_routes_refuse_every_other_role(app):
    add_user(app, "doc@example.org", "clinician")
    add_user(app, "rev@example.org", "reviewer")
    admin_routes = [(rule, method) for rule, method in _routes(app)
                    if app.view_functions[rule.endpoint].__dict__.get("required_roles") == ("admin",)]
    assert len(admin_routes) >= 10
    for email in ("doc@example.org", "rev@example.org"):
        client = app.test_client()
        login(client, email)
        for rule, method in admin_routes:
            assert client.open(_url(rule), method=method).status_code == 403, (email, method, rule.rule)


@pytest.mark.parametrize("endpoint", sorted(PUBLIC))
def test_the_allow_list_names_real_endpoints(app, endpoint):
    assert endpoint in app.view_functions
