"""A worker killed mid-job (SIGKILL of the whole process group, as on a power cut or the
OOM killer) loses nothing: the job comes back from the broker to the next worker."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

from tests.appfixtures import add_user, case_state, image_bytes, login, register_model, wait_for_state
from webapp.config import PROJECT_ROOT


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """Random weights at 128 px: exact Score-CAM then takes seconds, a window to kill in."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    torch.manual_seed(1)
    meta = {"architecture": "resnet18", "class_names": ["cancer", "normal"], "positive_classes": ["cancer"],
            "labels": list(LABEL_NAMES), "input_size": 128, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5}
    return save_checkpoint(tmp_path_factory.mktemp("slow") / "slow.pt", build_model("none"), meta)


def _start_worker(app, log_path):
    """`manage.py worker` in its own session, configured by environment like production."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STORAGE_DIR")}
    env.update(INSTANCE_PATH=app.config["INSTANCE_PATH"],
               DATABASE_URL=app.config["SQLALCHEMY_DATABASE_URI"],
               CELERY_BROKER_URL=app.config["CELERY_BROKER_URL"], TASK_QUEUE=app.config["TASK_QUEUE"],
               BROKER_VISIBILITY_TIMEOUT=str(app.config["BROKER_VISIBILITY_TIMEOUT"]),
               EXPLAIN_METHOD=app.config["EXPLAIN_METHOD"], WORKER_TORCH_THREADS="1")
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "manage.py"), "worker", "--loglevel", "warning"],
                            cwd=PROJECT_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_comes_back_and_finishes(make_app, slow_checkpoint, tmp_path):
    # A short visibility timeout so that the lost job comes back within the test.
    app = make_app(BROKER_VISIBILITY_TIMEOUT=3, EXPLAIN_METHOD="scorecam")
    register_model(app, slow_checkpoint, name="slow")
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")

    first = _start_worker(app, tmp_path / "worker1.log")
    second = None
    try:
        response = client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes(size=(160, 120))), "a.png")]})
        assert response.status_code == 303
        state = wait_for_state(app, 1, {"running", "done", "failed"}, timeout=60)
        assert state[0] == "running", (state, (tmp_path / "worker1.log").read_text())
        os.killpg(first.pid, signal.SIGKILL)  # the whole worker: main process and its child
        first.wait(timeout=10)
        assert case_state(app, 1)[0] == "running"  # nothing finished it

        second = _start_worker(app, tmp_path / "worker2.log")
        status, attempts, n_predictions, error = wait_for_state(app, 1, {"done", "failed"}, timeout=90)
        assert (status, error) == ("done", None), (tmp_path / "worker2.log").read_text()
        assert attempts == 2 and n_predictions == 1
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
