#!/usr/bin/env bash
# The app on a fresh machine: venv + install, database and first admin, demo model and
# sample cases, then the web server with one worker and the embedded broker (Ctrl-C stops all).
# The first admin's email and password come from ADMIN_EMAIL / ADMIN_PASSWORD or a prompt.
set -euo pipefail
cd "$(dirname "$0")"
echo "run.sh: [1/3] Python environment (the first time: installs torch and the rest, a few minutes)" >&2
venv=$(VERBOSE=1 bin/setup-venv requirements.txt)
echo "run.sh: [2/3] database and first admin" >&2
"$venv/bin/python" manage.py init
echo "run.sh: [3/3] web server, worker and embedded broker, with the demo model and sample cases" >&2
exec "$venv/bin/python" manage.py run --demo "$@"
