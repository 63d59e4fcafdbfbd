"""Issue 10, items 10 and 12: a registered checkpoint swapped on disk is never loaded, and
model version names are restricted to what a URL and a file name can carry."""
from __future__ import annotations

import io
import shutil

import pytest

from tests.appfixtures import add_user, image_bytes, login, register_model, running_worker, wait_for_case


def test_a_swapped_model_file_fails_the_case_instead_of_loading(app, client, tiny_checkpoint, tmp_path):
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.inference import Predictor
    from ml.model import build_model
    from webapp.extensions import db
    from webapp.models import ModelVersion
    from worker.prediction import model_cache

    version_id = register_model(app, tiny_checkpoint, name="genuine")
    # Another checkpoint that loads perfectly well: only its checksum tells it apart.
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.pt", build_model("none"),
                            Predictor.from_checkpoint(tiny_checkpoint, device="cpu").meta, half=True)
    with app.app_context():
        path = app.extensions["file_store"].path(db.session.get(ModelVersion, version_id).file_key)
    shutil.copyfile(other, path)
    model_cache._loaded = None  # a worker process that has not loaded it yet
    add_user(app, "doc@example.org")
    login(client, "doc@example.org")
    with running_worker(app):
        client.post("/cases/upload", data={"images": [(io.BytesIO(image_bytes()), "a.png")]})
        status = wait_for_case(client, 1)
    assert status["status"] == "failed"
    assert "genuine could not be loaded" in status["error"]
    assert "does not match the registered checksum" in status["error"]
    assert model_cache.loaded_version_id is None

    shutil.copyfile(tiny_checkpoint, path)  # the right file back: it loads
    with running_worker(app):
        client.post("/cases/1/rerun")
        assert wait_for_case(client, 1)["status"] == "done"


@pytest.mark.parametrize("name", ["a/b", "../etc", "with space", "", ".hidden", "x" * 65, "tab\there", "v1\u202e"])
def test_model_version_names_are_restricted(app, tmp_path, name):
    from webapp.registry import RegistryError, register_model_version

    path = tmp_path / "model.pt"
    path.write_bytes(b"checked elsewhere")
    with app.app_context(), pytest.raises(RegistryError, match="letters, digits"):
        register_model_version(path, {"threshold": 0.5}, name=name)


def test_good_model_version_names_are_accepted(app, tmp_path):
    from webapp.registry import register_model_version

    path = tmp_path / "model.pt"
    path.write_bytes(b"checked elsewhere")
    with app.app_context():
        assert register_model_version(path, {"threshold": 0.5}, name="busi-2026.11_v3").name == "busi-2026.11_v3"
