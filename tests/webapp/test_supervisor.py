"""Issue 31, item 5: the supervisor of `manage.py run` restarts a killed embedded broker (on
the same socket, with its queued jobs) and a killed worker process, and says so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def _sleeper() -> subprocess.Popen:
    """A stand-in worker with one child, as a prefork worker has its pool process."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_killed_broker_and_worker_are_restarted_and_announced(tmp_path):
    import psutil
    import redis

    from webapp.broker import EmbeddedBroker
    from webapp.supervisor import Supervisor

    broker = EmbeddedBroker(tmp_path / "instance")
    url = broker.start()
    said: list[str] = []
    resends: list[str] = []
    supervisor = Supervisor(_sleeper, broker, said.append, interval=3600,   # rounds driven by hand
                            after_broker_restart=lambda: resends.append("sent") or "sent 0 pending case(s) again")
    first = supervisor.start()
    try:
        client = redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
        client.lpush("jobs", "case-1")
        time.sleep(1.2)   # appendfsync everysec: the job reaches the append-only file
        deadline = time.monotonic() + 10
        while not psutil.Process(first.pid).children():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        supervisor.check()   # records the pool child while the worker lives
        child = psutil.Process(first.pid).children()[0].pid
        old_broker = broker.pid

        os.kill(old_broker, signal.SIGKILL)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        deadline = time.monotonic() + 5   # SIGKILL lands asynchronously: the broker may look alive a moment
        while broker.alive():
            assert time.monotonic() < deadline, "the killed broker still runs"
            time.sleep(0.05)
        supervisor.check()

        assert broker.alive() and broker.pid != old_broker and broker.url == url
        assert client.lrange("jobs", 0, -1) == [b"case-1"]     # same socket, the job kept
        assert supervisor.worker.pid != first.pid and supervisor.worker.poll() is None
        deadline = time.monotonic() + 5   # SIGKILL is delivered asynchronously
        while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the dead worker's pool process was left running"
            time.sleep(0.05)
        assert supervisor.restarts == {"worker": 1, "broker": 1}
        assert resends == ["sent"] and "sent 0 pending case(s) again" in said   # once, after the restart
        assert any("embedded broker" in line and "died: restarting it" in line for line in said), said
        assert any(f"worker (pid {first.pid}) exited with -9: restarting it" == line for line in said), said
        supervisor.check()   # nothing more to do
        assert supervisor.restarts == {"worker": 1, "broker": 1}
    finally:
        supervisor.stop()
        supervisor.worker.kill()
        supervisor.worker.wait()
        broker.stop()


@pytest.mark.parametrize("long", [False, True])
def test_the_broker_socket_path_is_fixed_and_fits_a_unix_socket(tmp_path, long):
    from webapp.broker import MAX_SOCKET_PATH, socket_path

    folder = tmp_path / ("x" * 120 if long else "i") / "broker"
    path = socket_path(folder)
    assert len(str(path)) <= MAX_SOCKET_PATH and path == socket_path(folder)
    assert (path.parent == folder) is (not long)
