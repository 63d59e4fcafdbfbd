#!/usr/bin/env bash
# The app on a fresh machine: venv + install, database and first admin, demo model and
# sample cases, then the web server with one worker and the embedded broker (Ctrl-C stops all).
# The first admin's email and password come from ADMIN_EMAIL / ADMIN_PASSWORD or a prompt.
set -euo pipefail
cd "$(dirname "$0")"
venv=$(bin/setup-venv requirements.txt)
"$venv/bin/python" manage.py init
exec "$venv/bin/python" manage.py run --demo "$@"
