"""What keeps `manage.py run` whole: its worker process and its embedded broker are watched
and restarted within seconds when they die, and each restart is said on the console.

Without it a SIGKILLed broker left uploads queued until someone restarted `run`, and a
SIGKILLed worker left cases queued behind a healthy-looking web server (issue 31).
"""
from __future__ import annotations

import logging
import subprocess
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Supervisor:
    """Watch the worker started by ``start_worker`` (a callable returning its Popen) and the
    embedded ``broker`` (or None for an external one) every ``interval`` seconds, restarting
    what died; ``say`` prints a line for the operator. ``after_broker_restart`` runs once the
    broker is back (`run` sends every pending case again) and may return a line to print."""

    def __init__(self, start_worker: Callable[[], subprocess.Popen], broker=None,
                 say: Callable[[str], None] = print, interval: float = 1.0,
                 after_broker_restart: Callable[[], str | None] | None = None):
        self._start_worker, self.broker, self._say, self.interval = start_worker, broker, say, interval
        self._after_broker_restart = after_broker_restart
        self.worker: subprocess.Popen | None = None
        self.restarts = {"worker": 0, "broker": 0}
        self._children: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> subprocess.Popen:
        self.worker = self._start_worker()
        self._thread = threading.Thread(target=self._loop, name="run-supervisor", daemon=True)
        self._thread.start()
        return self.worker

    def stop(self) -> None:
        """Stop watching (before the worker and broker are stopped on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must outlive any one failed restart
                log.exception("supervisor: a restart failed; trying again in %s s", self.interval)

    def check(self) -> None:
        """One round: restart the broker, then the worker, if either died."""
        if self.broker is not None and not self.broker.alive():
            self._say(f"embedded broker (pid {self.broker.pid}) died: restarting it")
            url = self.broker.restart()
            self.restarts["broker"] += 1
            self._say(f"embedded broker restarted (pid {self.broker.pid}) at {url}; queued jobs kept")
            if self._after_broker_restart is not None:
                said = self._after_broker_restart()
                if said:
                    self._say(said)
        worker = self.worker
        if worker is None:
            return
        code = worker.poll()
        if code is None:
            self._remember_children(worker.pid)
            return
        self._say(f"worker (pid {worker.pid}) exited with {code}: restarting it")
        self._kill_orphans()
        self.worker = self._start_worker()
        self.restarts["worker"] += 1
        self._say(f"worker restarted (pid {self.worker.pid})")

    def _remember_children(self, pid: int) -> None:
        """The worker's pool processes, known while it lives: once it is killed they are
        orphans that may hold a job and the model, and are stopped before a new worker starts."""
        import psutil

        try:
            self._children = {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass

    def _kill_orphans(self) -> None:
        import psutil

        for pid in self._children:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        self._children = set()
