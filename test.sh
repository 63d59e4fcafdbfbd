#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")"
venv=$(bin/setup-venv requirements-dev.txt)
# Browser tests use Debian's Chromium; install it where we may (root with apt), else they skip.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
    || echo "test.sh: could not install chromium; browser tests will skip"
fi
# In parallel (pytest-xdist, one worker per core; tests/conftest.py keeps the tests that share
# Redis or the browser on one worker), and the 15 slowest tests named at the end.
# PYTEST_WORKERS=0 runs everything in this one process.
exec "$venv/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadgroup --durations=15 "$@"
