"""A worker whose pool process dies comes back by itself, however long the model takes to
load: the model is loaded after the process has reported itself ready, not before."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.appfixtures import add_user, image_bytes, login, wait_for_state
from webapp.config import PROJECT_ROOT

# Celery kills a pool process that has not said "up" within this many seconds. The test
# tightens it (the default is far longer) so that a slow model load makes the point fast.
ALIVE_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def slow_loading_checkpoint(tmp_path_factory):
    """A valid 32 px checkpoint carrying a million numbers of metadata: torch's safe
    (pure Python) unpickler needs seconds to read it, far over ALIVE_TIMEOUT_S."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    torch.manual_seed(2)
    meta = {"architecture": "resnet18", "class_names": ["cancer", "normal"], "positive_classes": ["cancer"],
            "labels": list(LABEL_NAMES), "input_size": 32, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5,
            "padding": list(range(1_000_000))}
    path = save_checkpoint(tmp_path_factory.mktemp("slowload") / "slow-load.pt", build_model("none"), meta,
                           half=True)
    return path, meta


def _register(app, checkpoint, meta):
    from webapp.registry import register_model_version

    with app.app_context():  # the metadata is known: no need to read the slow file here
        return register_model_version(checkpoint, meta, name="slow-load", activate=True).id


def start_worker(app, log_path, **settings):
    """`manage.py worker` (prefork, one process) in its own session, configured by
    environment variables as in production; ``settings`` add or override some."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STORAGE_DIR")}
    env.update(INSTANCE_PATH=app.config["INSTANCE_PATH"], DATABASE_URL=app.config["SQLALCHEMY_DATABASE_URI"],
               STORAGE_DIR=app.config["STORAGE_DIR"], CELERY_BROKER_URL=app.config["CELERY_BROKER_URL"],
               TASK_QUEUE=app.config["TASK_QUEUE"], WORKER_TORCH_THREADS="1",
               WORKER_PROC_ALIVE_TIMEOUT=str(ALIVE_TIMEOUT_S))
    env.update({key: str(value) for key, value in settings.items()})
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "manage.py"), "worker", "--pool", "prefork",
                             "--concurrency", "1", "--loglevel", "info"],
                            cwd=PROJECT_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_a_killed_pool_process_is_replaced_and_finishes_the_job_despite_a_slow_model(
        make_app, slow_loading_checkpoint, tmp_path):
    app = make_app()
    _register(app, *slow_loading_checkpoint)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    log_path = tmp_path / "worker.log"
    worker = start_worker(app, log_path)
    try:
        response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
        assert response.status_code == 303
        # The job starts while the pool process is still loading the model.
        state = wait_for_state(app, 1, {"running", "done", "failed"}, timeout=60)
        assert state[0] == "running", (state, log_path.read_text())
        (child,) = psutil.Process(worker.pid).children()
        child.send_signal(signal.SIGKILL)  # the pool process, mid-job; its parent lives on

        status, attempts, n_predictions, error = wait_for_state(app, 1, {"done", "failed"}, timeout=60)
        log = log_path.read_text()
        assert (status, error) == ("done", None), log
        assert attempts == 2 and n_predictions == 1  # the job came back once, no double result
        assert "Timed out waiting for UP message" not in log
        replacement = psutil.Process(worker.pid).children()
        assert len(replacement) == 1 and replacement[0].pid != child.pid
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
