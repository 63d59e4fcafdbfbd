"""Several machines, as separate OS processes that share only what separate machines would:
PostgreSQL (127.0.0.1:5432), Redis (127.0.0.1:6379) and one image folder (the NFS mount of
docs/deploy.md). Each "machine" has an instance folder of its own.

- web: `manage.py serve` (gunicorn, two processes);
- two GPU-less worker machines: `manage.py worker` with concurrency 1 and 2;
- an admin's machine: `manage.py init`, `users create`, `tokens create`, `models register`,
  `retrain`.

50 cases go in through the JSON API; each is predicted exactly once and both workers take
part. A reviewer's API reviews feed `manage.py retrain`, whose new version is promoted; the
workers, still running, predict the next cases with it.
"""
from __future__ import annotations

import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.appfixtures import image_bytes, postgres_available, redis_available, scratch_postgres_database
from webapp.config import PROJECT_ROOT

PASSWORD = "quiet-harbour-lamp"
SUCCEEDED = re.compile(r"Task worker\.tasks\.predict_case\[[0-9a-f-]+\] succeeded in [0-9.e-]+s: 'done'")
# Settings this test chooses for every process; the caller's environment must not leak in.
SETTINGS = ("INSTANCE_PATH", "DATABASE_URL", "CELERY_BROKER_URL", "TASK_QUEUE", "SECRET_KEY", "STORAGE_DIR",
            "ADMIN_EMAIL", "ADMIN_PASSWORD", "WORKER_CONCURRENCY", "WORKER_TORCH_THREADS", "WEB_CONCURRENCY",
            "WEB_THREADS", "SWEEP_INTERVAL", "BROKER_VISIBILITY_TIMEOUT", "EXPLAIN_METHOD",
            "UPLOADS_PER_USER_PER_MINUTE", "MAX_FILES_PER_UPLOAD")


pytestmark = [
    pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif(not redis_available(), reason="no Redis server on 127.0.0.1:6379"),
    pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL on 127.0.0.1:5432 (user postgres, trust)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """The shared services' settings, the machines' processes and their logs."""

    def __init__(self, root: Path, database_url: str, broker_url: str, queue: str):
        self.root = root
        self.shared_images = root / "shared-images"  # the mounted shared path of every machine
        self.shared_images.mkdir()
        self.database_url = database_url
        self.broker_url = broker_url
        self.queue = queue
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.commands_run = 0
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def env(self, machine: str, **extra: str) -> dict[str, str]:
        instance = self.root / machine
        instance.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        env.update(INSTANCE_PATH=str(instance), DATABASE_URL=self.database_url, CELERY_BROKER_URL=self.broker_url,
                   TASK_QUEUE=self.queue, SECRET_KEY=self.secret_key, STORAGE_DIR=str(self.shared_images),
                   **extra)
        return env

    def command(self, machine: str, *args: str, stdin: str | None = None, timeout: float = 180,
                **extra: str) -> str:
        """Run one `manage.py` command on ``machine``; its output (it must succeed)."""
        self.commands_run += 1
        log = self.root / f"{machine}-{self.commands_run:02d}-{args[0]}.log"
        self.logs[f"{machine}: manage.py {' '.join(args[:2])} (#{self.commands_run})"] = log
        result = subprocess.run([sys.executable, str(PROJECT_ROOT / "manage.py"), *args], cwd=PROJECT_ROOT,
                                env=self.env(machine, **extra), input=stdin, capture_output=True, text=True,
                                timeout=timeout)
        log.write_text(result.stdout + result.stderr)
        assert result.returncode == 0, f"manage.py {' '.join(args)} exited with {result.returncode}"
        return result.stdout

    def start(self, machine: str, *args: str, **extra: str) -> subprocess.Popen:
        log = self.root / f"{machine}.log"
        self.logs[machine] = log
        process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "manage.py"), *args], cwd=PROJECT_ROOT,
                                   env=self.env(machine, **extra), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[machine] = process
        return process

    def log(self, machine: str) -> str:
        return self.logs[machine].read_text(errors="replace")

    def report(self, tail: int = 4000) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            process = self.processes.get(name)
            state = "" if process is None else f" (exit status {process.poll()})"
            parts.append(f"----- {name}{state}: last {tail} characters of {path.name}\n{text[-tail:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # warm shutdown, as a service manager does
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def deployment(tmp_path):
    import redis

    # A database, a Redis database number and a queue name of our own: parallel runs do not meet.
    redis_db = random.randint(1, 15)
    queue = f"deploy-{uuid.uuid4().hex[:12]}"
    with scratch_postgres_database("breast_review_deploy") as database_url:
        deployment = Deployment(tmp_path, database_url, f"redis://127.0.0.1:6379/{redis_db}", queue)
        try:
            yield deployment
        finally:
            deployment.stop_all()
            client = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
            client.delete(queue, *client.keys(f"_kombu.binding.{queue}*"))
            client.close()


@pytest.fixture(scope="module")
def tiny_two_class_checkpoint(tmp_path_factory) -> Path:
    """Random weights at 32 px, cancer vs normal (the classes of the retraining folders)."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.model import build_model
    from tests.ml.conftest import tiny_meta

    torch.manual_seed(3)
    return save_checkpoint(tmp_path_factory.mktemp("deploy-model") / "v1.pt", build_model("none"), tiny_meta(32))


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _healthy(base: str) -> bool:
    import requests

    try:
        return requests.get(f"{base}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _upload(session, base: str, seeds: list[int]) -> list[int]:
    files = [("images", (f"scan-{s:03d}.png", io.BytesIO(image_bytes(size=(64, 48), seed=1000 + s)), "image/png"))
             for s in seeds]
    response = session.post(f"{base}/api/v1/cases", files=files, timeout=60)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rejected"] == [] and all(c["sent_to_worker"] for c in body["cases"]), body
    return [c["id"] for c in body["cases"]]


def _wait_until_finished(session, base: str, case_ids: list[int], timeout: float) -> dict[int, dict]:
    finished: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(finished) < len(case_ids) and time.monotonic() < deadline:
        for case_id in case_ids:
            if case_id not in finished:
                body = session.get(f"{base}/api/v1/cases/{case_id}", timeout=10).json()
                if body["finished"]:
                    finished[case_id] = body
        time.sleep(0.3)
    missing = sorted(set(case_ids) - set(finished))
    assert not missing, f"{len(missing)} case(s) not finished after {timeout:.0f} s: {missing[:10]}"
    return finished


def _predictions_per_case(database_url: str) -> dict[int, list[tuple[str, int]]]:
    """Read from PostgreSQL itself: (model version, attempts) of every prediction, by case."""
    import psycopg2

    connection = psycopg2.connect(database_url)
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT c.id, mv.name, c.attempts FROM \"case\" c LEFT JOIN prediction p ON p.case_id = c.id "
                       "LEFT JOIN model_version mv ON mv.id = p.model_version_id ORDER BY c.id")
        result: dict[int, list[tuple[str, int]]] = {}
        for case_id, version, attempts in cursor.fetchall():
            result.setdefault(case_id, [])
            if version is not None:
                result[case_id].append((version, attempts))
        return result
    finally:
        connection.close()


def test_web_two_workers_and_a_retrain_on_postgresql_and_redis(deployment, tiny_two_class_checkpoint, tmp_path):
    try:
        _run(deployment, tiny_two_class_checkpoint, tmp_path)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n\n{deployment.report()}") from None


def _run(d: Deployment, checkpoint: Path, tmp_path: Path) -> None:
    import requests

    from tests.ml.conftest import make_folder

    started = time.monotonic()
    # The admin's machine: the schema first; the machines then start (web first: load
    # balancers wait for /healthz) while the admin creates accounts, tokens and the first model.
    out = d.command("admin", "init", ADMIN_EMAIL="admin@example.org", ADMIN_PASSWORD=PASSWORD)
    assert "created admin admin@example.org" in out
    web = d.start("web", "serve", "--port", str(d.port), "--workers", "2", "--threads", "4",
                  UPLOADS_PER_USER_PER_MINUTE="1000")
    workers = {
        "worker-a": d.start("worker-a", "worker", "--concurrency", "1", "--loglevel", "info",
                            WORKER_TORCH_THREADS="1"),
        "worker-b": d.start("worker-b", "worker", "--concurrency", "2", "--loglevel", "info",
                            WORKER_TORCH_THREADS="1"),
    }
    d.command("admin", "users", "create", "doc@example.org", "--role", "clinician", "--password-stdin",
              stdin=PASSWORD + "\n")
    d.command("admin", "users", "create", "rev@example.org", "--role", "reviewer", "--password-stdin",
              stdin=PASSWORD + "\n")
    doc_token = d.command("admin", "tokens", "create", "doc@example.org", "--name", "deploy test").splitlines()[-1]
    rev_token = d.command("admin", "tokens", "create", "rev@example.org", "--name", "deploy test").splitlines()[-1]
    out = d.command("admin", "models", "register", str(checkpoint), "--name", "v1")
    assert "registered v1 (active" in out

    _wait_for(lambda: _healthy(d.base), 60, "the web server's /healthz")
    for name in workers:
        _wait_for(lambda: " ready." in d.log(name), 90, f"{name} to be ready")
    pids = {name: p.pid for name, p in workers.items()}
    # The workers' health check of docs/deploy.md: each answers a ping through the broker.
    # Naming both nodes lets the ping return once both replied instead of after the timeout.
    nodes = ",".join(f"predict-{pid}@{socket.gethostname()}" for pid in pids.values())
    ping = subprocess.run([sys.executable, "-m", "celery", "-b", d.broker_url, "inspect", "ping", "--timeout", "10",
                           "--destination", nodes], capture_output=True, text=True, timeout=60)
    assert all(f"predict-{pid}@" in ping.stdout for pid in pids.values()), ping.stdout + ping.stderr

    doc = requests.Session()
    doc.headers["Authorization"] = f"Bearer {doc_token}"
    assert doc.get(f"{d.base}/api/v1/me", timeout=10).json()["role"] == "clinician"

    # 50 cases through the API, in requests of ten (MAX_FILES_PER_UPLOAD is 20).
    case_ids: list[int] = []
    for start in range(0, 50, 10):
        case_ids += _upload(doc, d.base, list(range(start, start + 10)))
    assert len(set(case_ids)) == 50
    finished = _wait_until_finished(doc, d.base, case_ids, timeout=180)
    assert {c["status"] for c in finished.values()} == {"done"}, {k: c["error"] for k, c in finished.items()
                                                                  if c["status"] != "done"}
    assert {c["prediction"]["model_version"] for c in finished.values()} == {"v1"}

    # Exactly once: one prediction per case, one attempt, and 50 task runs over both workers.
    rows = _predictions_per_case(d.database_url)
    assert sorted(rows) == sorted(case_ids)
    assert all(r == [("v1", 1)] for r in rows.values()), {k: r for k, r in rows.items() if r != [("v1", 1)]}
    runs = {name: len(SUCCEEDED.findall(d.log(name))) for name in workers}
    assert sum(runs.values()) == 50, runs
    assert all(n > 0 for n in runs.values()), f"a worker took no case: {runs}"
    first_round = runs

    # A reviewer reviews four cases through the API; retraining takes them in.
    rev = requests.Session()
    rev.headers["Authorization"] = f"Bearer {rev_token}"
    for case_id, label in zip(case_ids[:4], ("cancer", "normal", "cancer", "normal")):
        case = rev.get(f"{d.base}/api/v1/cases/{case_id}", timeout=10).json()
        predicted = case["prediction"]["label"]
        body = {"verdict": "agree" if predicted == label else "disagree", "confidence": "certain",
                "review_token": case["review_token"]}
        if predicted != label:
            body["label"] = label
        response = rev.post(f"{d.base}/api/v1/cases/{case_id}/reviews", json=body, timeout=10)
        assert response.status_code == 201, response.text

    base = make_folder(tmp_path / "base", n_per_class=8, seed=1)
    locked = make_folder(tmp_path / "locked", n_per_class=6, seed=2)
    out = d.command("admin", "retrain", "--base-data", str(base), "--locked-test", str(locked), "--epochs", "1",
                    "--batch-size", "8", "--img-size", "32", "--promote", "force", "--name", "v2",
                    WORKER_TORCH_THREADS="1")
    assert "training data: 16 base + 4 reviewed image(s)" in out, out
    assert "registered v2 (parent v1" in out and "decision: PROMOTED" in out, out
    assert "* v2" in d.command("admin", "models", "list")

    # The running workers (no restart) predict the next cases with v2.
    more = _upload(doc, d.base, list(range(50, 60)))
    finished = _wait_until_finished(doc, d.base, more, timeout=120)
    assert {c["status"] for c in finished.values()} == {"done"}
    assert {c["prediction"]["model_version"] for c in finished.values()} == {"v2"}
    rows = _predictions_per_case(d.database_url)
    assert all(rows[c] == [("v2", 1)] for c in more), {c: rows[c] for c in more}
    assert all(p.poll() is None and p.pid == pids[name] for name, p in workers.items()), "a worker restarted"
    runs = {name: len(SUCCEEDED.findall(d.log(name))) for name in workers}
    assert sum(runs.values()) == 60, runs
    assert any("loading model version v2" in d.log(name) for name, n in runs.items() if n > first_round[name])
    assert web.poll() is None
    # The new version's file was written by the admin's machine into the shared folder
    # and read from there by the workers.
    assert list((d.shared_images / "models").rglob("*.pt"))
    print(f"deployment test: {time.monotonic() - started:.0f} s; cases per worker {runs}")
