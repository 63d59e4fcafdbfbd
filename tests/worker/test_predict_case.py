"""Upload -> real Celery worker (real broker, real model) -> case page shows the result."""
from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import func, select

from tests.appfixtures import (add_user, image_bytes, login, redis_available, register_model, running_worker,
                               wait_for_case)


def _upload(client, *files):
    return client.post("/cases/upload", data={"images": [(io.BytesIO(c), n) for n, c in files]})


def _predictions(app, case_id):
    from webapp.extensions import db
    from webapp.models import Prediction

    with app.app_context():
        return db.session.scalars(select(Prediction).where(Prediction.case_id == case_id)).all()


def _predicted_as_predict_says(app, client, checkpoint, data: bytes):
    """Register ``checkpoint``, upload ``data`` through a real worker, and check that the stored
    prediction is what ``Predictor.predict`` says (calibrated probability, most likely class)."""
    from ml.inference import Predictor

    register_model(app, checkpoint, name=checkpoint.stem)
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        case_url = _upload(client, ("scan.png", data)).headers["Location"]
        status = wait_for_case(client, 1)
    assert status["status"] == "done", status
    (prediction,) = _predictions(app, 1)
    expected = Predictor.from_checkpoint(checkpoint, "cpu").predict([io.BytesIO(data)])[0]
    assert prediction.probability == pytest.approx(expected.probability, abs=1e-5)  # calibrated, as predict says
    assert prediction.predicted_class == expected.predicted_class
    return prediction, case_url


def test_upload_is_predicted_and_the_case_page_shows_the_result(app, client, tiny_checkpoint):
    register_model(app, tiny_checkpoint, name="tiny-1")
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        response = _upload(client, ("scan.png", image_bytes(size=(120, 90))))
        case_url = response.headers["Location"]
        status = wait_for_case(client, 1)
    assert status["status"] == "done", status
    assert status["label"] in ("cancer", "normal") and 0.0 <= status["probability"] <= 1.0
    page = client.get(case_url).data.decode()
    assert "Model output" in page and "tiny-1" in page
    assert f"{status['probability'] * 100:.1f} %" in page
    assert 'id="heatmap-opacity"' in page and 'id="heatmap-toggle"' in page
    assert "Timings" in page and "predict_explain" in page
    (prediction,) = _predictions(app, 1)
    assert prediction.method == "gradcam" and prediction.threshold == 0.5
    assert prediction.border_share is not None and set(prediction.timings) >= {"preprocess", "predict_explain"}
    from PIL import Image

    for kind in ("heatmap", "overlay"):
        response = client.get(f"{case_url}/{kind}")
        assert response.status_code == 200 and response.mimetype == "image/png"
        assert "private" in response.headers["Cache-Control"]
        assert Image.open(io.BytesIO(response.data)).size == (120, 90)  # the original size


def test_several_files_in_one_upload_are_all_predicted(app, client, tiny_checkpoint):
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes(seed=1)), ("bad.png", b"nope"),
                ("b.jpg", image_bytes("JPEG", seed=2)), ("c.png", image_bytes(seed=3)))
        statuses = [wait_for_case(client, i) for i in (1, 2, 3)]
    assert [s["status"] for s in statuses] == ["done", "done", "done"]
    page = client.get("/cases?status=done").data.decode()
    assert all(name in page for name in ("a.png", "b.jpg", "c.png"))


def test_no_active_model_fails_the_case_clearly_and_a_rerun_succeeds(app, client, tiny_checkpoint):
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()))
        status = wait_for_case(client, 1)
        assert status["status"] == "failed"
        assert status["error"].startswith("No active model")
        page = client.get("/cases/1").data.decode()
        assert "No active model" in page and "Re-run prediction" in page
        register_model(app, tiny_checkpoint)
        response = client.post("/cases/1/rerun", follow_redirects=True)
        assert b"Queued again." in response.data
        status = wait_for_case(client, 1)
    assert status["status"] == "done" and status["error"] is None
    assert len(_predictions(app, 1)) == 1


def test_only_the_uploader_or_an_admin_may_rerun(app, client, tiny_checkpoint):
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()))
        assert wait_for_case(client, 1)["status"] == "failed"  # no model yet
    client.post("/logout")
    login(client, "rev@example.org")
    assert client.post("/cases/1/rerun").status_code == 403
    assert b"/cases/1/rerun" not in client.get("/cases/1").data  # no button either


def test_running_the_task_twice_leaves_one_prediction(app, client, tiny_checkpoint):
    from worker.tasks import predict_case

    version_id = register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()))
        assert wait_for_case(client, 1)["status"] == "done"
        celery_app = app.extensions["celery"]
        # Duplicate deliveries: the broker handing the same job out again.
        for _ in range(2):
            celery_app.send_task("worker.tasks.predict_case", args=[1])
        # And the task body run directly, as a redelivery after a crash would.
        assert predict_case.apply(args=[1]).get() == "done"
        from webapp.extensions import db
        from webapp.models import Case

        with app.app_context():  # an explicit re-run recomputes, still into the same row
            db.session.get(Case, 1).status = "queued"
            db.session.commit()
        assert predict_case.apply(args=[1]).get() == "done"
        celery_app.send_task("worker.tasks.predict_case", args=[1])
        assert wait_for_case(client, 1)["status"] == "done"
    predictions = _predictions(app, 1)
    assert [(p.case_id, p.model_version_id) for p in predictions] == [(1, version_id)]


def test_worker_reloads_when_the_active_version_changes(app, client, tiny_checkpoint, tmp_path):
    import torch

    from ml.checkpoint import load_checkpoint, save_checkpoint
    from ml.model import build_model
    from webapp.extensions import db
    from webapp.models import ModelVersion
    from webapp.registry import activate_version
    from worker.prediction import model_cache

    first = register_model(app, tiny_checkpoint, name="first")
    torch.manual_seed(1)
    meta = dict(load_checkpoint(tiny_checkpoint)["meta"], threshold=0.99)
    second_path = save_checkpoint(tmp_path / "second.pt", build_model("none"), meta, half=True)
    second = register_model(app, second_path, name="second", activate=False)
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()))
        assert wait_for_case(client, 1)["status"] == "done"
        assert model_cache.loaded_version_id == first
        with app.app_context():
            activate_version(db.session.get(ModelVersion, second))
        client.post("/cases/1/rerun")
        status = wait_for_case(client, 1)
    assert status["status"] == "done"
    assert model_cache.loaded_version_id == second
    predictions = _predictions(app, 1)
    assert sorted(p.model_version_id for p in predictions) == [first, second]
    assert {p.model_version_id: p.threshold for p in predictions}[second] == 0.99
    assert "second" in client.get("/cases/1").data.decode()


def test_a_broken_active_checkpoint_fails_the_case_with_the_reason(app, client, tiny_checkpoint):
    version_id = register_model(app, tiny_checkpoint, name="broken")
    from webapp.extensions import db
    from webapp.models import ModelVersion
    from worker.prediction import model_cache

    model_cache._loaded = None  # as in a freshly started worker process
    with app.app_context():
        path = app.extensions["file_store"].path(db.session.get(ModelVersion, version_id).file_key)
    path.write_bytes(path.read_bytes()[:1000])  # the disk copy got damaged
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()))
        status = wait_for_case(client, 1)
    assert status["status"] == "failed"
    assert status["error"].startswith("The active model broken could not be loaded")
    assert "truncated" in status["error"]


@pytest.mark.redis
@pytest.mark.skipif(not redis_available(), reason="no Redis server on 127.0.0.1:6379")
def test_worker_on_redis(make_app, tiny_checkpoint):
    app = make_app(CELERY_BROKER_URL="redis://127.0.0.1:6379/15")
    client = app.test_client()
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        _upload(client, ("a.png", image_bytes()), ("b.png", image_bytes(seed=9)))
        statuses = [wait_for_case(client, i) for i in (1, 2)]
    assert [s["status"] for s in statuses] == ["done", "done"]
    from webapp.extensions import db
    from webapp.models import Prediction

    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Prediction)) == 2


def test_a_passing_storage_error_is_retried_and_shown_as_waiting(make_app, tiny_checkpoint):
    """The image store is briefly unavailable: the case waits (queued, with the reason) and
    the retry with backoff finishes it once the file is back."""
    import time

    from webapp.extensions import db
    from webapp.models import Case

    app = make_app()
    register_model(app, tiny_checkpoint)
    add_user(app, "doc@example.org")
    client = app.test_client()
    login(client, "doc@example.org")
    client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
    with app.app_context():
        path = app.extensions["file_store"].path(db.session.get(Case, 1).image_key)
    hidden = path.with_name(path.name + ".away")
    path.rename(hidden)  # as if the shared volume were not mounted yet
    with running_worker(app):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = client.get("/cases/1/status").get_json()
            if status["error"]:
                break
            time.sleep(0.05)
        # the backoff has jitter: by now it may be on its second or a later retry
        assert status["status"] == "queued" and re.match(r"Waiting to retry \(attempt [2-6] of 6\) after a "
                                                         r"passing error: .*No such file", status["error"])
        assert "Waiting for a worker" in client.get("/cases/1").data.decode()
        hidden.rename(path)
        final = wait_for_case(client, 1, timeout=60)
    assert final["status"] == "done" and final["error"] is None
    with app.app_context():
        assert db.session.get(Case, 1).attempts >= 2


def test_a_three_class_model_shows_verdict_words_and_the_most_likely_class(app, client, tmp_path):
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    torch.manual_seed(5)
    meta = {"architecture": "resnet18", "num_outputs": 3, "class_names": ["benign", "malignant", "normal"],
            "positive_classes": ["malignant"], "labels": list(LABEL_NAMES), "input_size": 32,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5,
            "calibration": {"method": "platt", "a": 0.5, "b": -0.2}}
    path = save_checkpoint(tmp_path / "three.pt", build_model("none", 3, (1,)), meta)
    prediction, case_url = _predicted_as_predict_says(app, client, path, image_bytes(size=(80, 60), seed=3))
    assert set(prediction.class_probabilities) == {"benign", "malignant", "normal"}
    page = client.get(case_url).data.decode()
    words = {"benign": "benign-appearing", "malignant": "malignant-appearing", "normal": "no lesion"}
    assert re.search(r"Most likely:\s*<strong>" + re.escape(words[prediction.predicted_class]) + "</strong>", page)
    assert ("Suspicious for malignancy" if prediction.label == "cancer" else "Not suspicious") in page
    assert "(calibrated on validation data)" in " ".join(page.split())  # indentation-free
    from webapp.extensions import db
    from webapp.models import ModelVersion

    for adaptation, words in (({"method": "prevalence", "prevalence": 0.1}, "validation data, moved to the share of "
                                                                            "cancers stated for this site"),
                              ({"n": 40, "n_malignant": 8}, "this site")):
        with app.app_context():
            version = db.session.get(ModelVersion, prediction.model_version_id)
            version.meta = dict(version.meta, site_adaptation=adaptation)
            db.session.commit()
        assert f"(calibrated on {words})" in " ".join(client.get(case_url).data.decode().split())


@pytest.mark.parametrize("archs", [("resnet18", "resnet18"), ("resnet18", "efficientnet_lite0")])
def test_an_ensemble_checkpoint_is_predicted_and_explained_by_the_worker(app, client, tmp_path, archs):
    """Two ResNet18s, and a ResNet18 beside an EfficientNet-Lite0 (issue 29: mixed ensembles)."""
    import numpy as np
    import torch
    from PIL import Image

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.ensemble import EnsembleNet
    from ml.model import build_model

    torch.manual_seed(7)
    meta = {"architecture": archs[0] if len(set(archs)) == 1 else "mixed", "num_outputs": 3,
            "class_names": ["benign", "malignant", "normal"],
            "positive_classes": ["malignant"], "labels": list(LABEL_NAMES), "input_size": 64,
            "layer4_stride": 1, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.4,
            "threshold_default": 0.5, "calibration": {"method": "platt", "a": 0.8, "b": 0.1},
            "ensemble": {"members": [{"seed": 0, "epoch": 3, "architecture": archs[0]},
                                     {"seed": 1, "epoch": 4, "architecture": archs[1]}]}}
    model = EnsembleNet([build_model("none", 3, (1,), 1, arch=arch) for arch in archs])
    path = save_checkpoint(tmp_path / "ensemble.pt", model, meta, half=True)
    _, case_url = _predicted_as_predict_says(app, client, path, image_bytes(size=(96, 72), seed=4))
    heatmap = client.get(f"{case_url}/heatmap")
    assert heatmap.status_code == 200
    assert np.asarray(Image.open(io.BytesIO(heatmap.data))).std() > 0   # a map, not a blank
