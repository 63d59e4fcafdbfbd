"""docs/deploy.md promises every environment variable: keep it true as settings are added."""
from __future__ import annotations

import re

from webapp.config import PROJECT_ROOT


def test_every_environment_variable_is_in_the_deployment_table():
    source = (PROJECT_ROOT / "webapp" / "config.py").read_text()
    names = set(re.findall(r'_env(?:_int|_bool)?\(\s*"([A-Z0-9_]+)"', source))
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "WEB_CONCURRENCY"} <= names  # the pattern works
    table = [line for line in (PROJECT_ROOT / "docs" / "deploy.md").read_text().splitlines() if line.startswith("| `")]
    documented = {name for line in table for name in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1])}
    assert sorted(names - documented) == [], "add these to the table in docs/deploy.md"
