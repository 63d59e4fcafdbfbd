"""`manage.py retrain` with the folder layouts real data comes in (BUSI's benign/malignant/
normal, an export's cancer/normal), checked before training; and the registry commands
after a refused version: promote needs --force, rollback walks back, the CLI user is audited."""
from __future__ import annotations

import getpass
import time

import pytest
from sqlalchemy import select

from tests.appfixtures import add_user, register_model
from tests.ml.conftest import make_folder

BUSI = ("benign", "malignant", "normal")


@pytest.fixture
def malignant_checkpoint(tmp_path):
    """An active model as the demo one is: trained on benign/malignant/normal folders."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD
    from ml.model import build_model

    torch.manual_seed(0)
    meta = {"architecture": "resnet18", "class_names": list(BUSI), "positive_classes": ["malignant"],
            "labels": ["normal", "cancer"], "input_size": 32, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5}
    return save_checkpoint(tmp_path / "demo-like.pt", build_model("none"), meta)


def _retrain_registered_only(tmp_path, run_cli, locked_layout):
    """The issue's exact command: `retrain --base-data BUSI-LIKE --locked-test LOCKED --epochs 1
    --promote never`, the locked test set in ``locked_layout`` folders; it must succeed."""
    base = make_folder(tmp_path / "busi", n_per_class=6, classes=BUSI, seed=1)
    locked = make_folder(tmp_path / "LOCKED", n_per_class=4, classes=locked_layout, seed=2)
    result = run_cli("retrain", "--base-data", base, "--locked-test", locked, "--epochs", 1, "--promote", "never")
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("locked_layout", [BUSI, ("cancer", "normal")], ids=["benign-malignant-normal", "cancer-normal"])
def test_retrain_finishes_for_either_locked_test_layout(app, tmp_path, malignant_checkpoint, run_cli, locked_layout):
    from webapp.extensions import db
    from webapp.models import ModelVersion

    register_model(app, malignant_checkpoint, name="demo")
    result = _retrain_registered_only(tmp_path, run_cli, locked_layout)
    assert "registered v2 (parent demo" in result.output
    assert "decision: NOT PROMOTED (--promote never: registered only" in result.output
    n = 4 * len(locked_layout)
    with app.app_context():
        v2 = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        assert v2.meta["locked_test"]["n"] == n and v2.meta["locked_test"]["n_positive"] == 4
        assert v2.meta["compared_with"]["locked_test"]["n_positive"] == 4  # the active model scored it too


def test_retrain_from_an_active_ensemble_tunes_every_member_and_compares_with_the_ensemble(
        app, tmp_path, run_cli):
    import torch

    from ml.checkpoint import load_checkpoint, save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD
    from ml.ensemble import EnsembleNet
    from ml.model import build_model
    from webapp.extensions import db
    from webapp.models import ModelVersion

    torch.manual_seed(1)
    meta = {"architecture": "resnet18", "class_names": list(BUSI), "positive_classes": ["malignant"],
            "labels": ["normal", "cancer"], "input_size": 32, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5,
            "ensemble": {"members": [{"seed": 0, "epoch": 1}, {"seed": 1, "epoch": 1}]}}
    pair = save_checkpoint(tmp_path / "pair.pt", EnsembleNet([build_model("none"), build_model("none")]), meta)
    register_model(app, pair, name="pair")
    assert "registered v2 (parent pair" in _retrain_registered_only(tmp_path, run_cli, BUSI).output
    with app.app_context():
        v2 = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        store = app.extensions["file_store"]
        members = load_checkpoint(store.path(v2.file_key))["meta"]["ensemble"]["members"]
        assert [m["seed"] for m in members] == [0, 1]   # both networks fine-tuned, recombined
        assert v2.meta["compared_with"]["locked_test"]["n"] == 12   # the ensemble scored the same set


def test_a_locked_test_set_without_a_malignant_folder_is_refused_before_training(app, tmp_path,
                                                                                 malignant_checkpoint, run_cli):
    from webapp.extensions import db
    from webapp.models import ModelVersion

    register_model(app, malignant_checkpoint, name="demo")
    base = make_folder(tmp_path / "busi", n_per_class=6, classes=BUSI, seed=1)
    locked = make_folder(tmp_path / "LOCKED", n_per_class=4, classes=("benign", "normal"), seed=2)
    started = time.perf_counter()
    result = run_cli("retrain", "--base-data", base, "--locked-test", locked, "--epochs", 50, "--promote", "never")
    assert result.exit_code == 1
    assert "the locked test set cannot compare the models" in result.output
    assert "no positive images" in result.output and "cancer, malignant" in result.output
    assert time.perf_counter() - started < 20  # 50 epochs were never started
    with app.app_context():
        assert [v.name for v in db.session.scalars(select(ModelVersion))] == ["demo"]


def test_refused_version_needs_force_and_rollback_walks_back(app, tmp_path, malignant_checkpoint, run_cli):
    from webapp.extensions import db
    from webapp.models import AuditEvent, ModelVersion

    register_model(app, malignant_checkpoint, name="demo")
    add_user(app, "boss@example.org", "admin")
    base = make_folder(tmp_path / "busi", n_per_class=6, classes=BUSI, seed=1)
    locked = make_folder(tmp_path / "LOCKED", n_per_class=4, classes=BUSI, seed=2)
    assert run_cli("retrain", "--base-data", base, "--locked-test", locked, "--epochs", 1,
                   "--promote", "never").exit_code == 0

    refused = run_cli("models", "promote", "v2")
    assert refused.exit_code == 1
    assert "v2 was not promoted by the promotion gate (--promote never: registered only" in refused.output
    assert "--force" in refused.output
    forced = run_cli("--actor", "boss@example.org", "models", "promote", "v2", "--force")
    assert forced.exit_code == 0, forced.output
    assert "warning: the promotion gate did not promote v2" in forced.output
    assert "v2 is now the active model" in forced.output

    first = run_cli("models", "rollback")
    assert "rolled back: demo is the active model again" in first.output
    second = run_cli("models", "rollback")  # must not bounce back to the refused v2
    assert second.exit_code == 1 and "demo has no earlier active version" in second.output

    with app.app_context():
        assert db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True))).name == "demo"
        events = {e.action: e for e in db.session.scalars(select(AuditEvent).order_by(AuditEvent.id))}
        promote = events["model.promote"]
        assert promote.actor is not None and promote.actor.email == "boss@example.org"
        assert promote.details["gate_overridden"][0].startswith("--promote never")
        rollback = events["model.rollback"]
        assert rollback.actor is None and rollback.details["os_user"] == getpass.getuser()
        assert rollback.details["via"] == "command line"


def test_retrain_keeps_a_named_patient_on_one_side_of_the_split(app, tmp_path, malignant_checkpoint, run_cli):
    from ml.checkpoint import load_checkpoint
    from ml.export import MERGED_GROUP_PATTERN
    from webapp.extensions import db
    from webapp.models import ModelVersion

    register_model(app, malignant_checkpoint, name="demo")
    base = make_folder(tmp_path / "busi", n_per_class=6, classes=BUSI, seed=1)
    locked = make_folder(tmp_path / "LOCKED", n_per_class=4, classes=BUSI, seed=2)
    broken = run_cli("retrain", "--base-data", base, "--locked-test", locked, "--group-pattern", "([0-9",
                     "--work-dir", tmp_path / "broken")
    assert broken.exit_code == 1 and "not a regular expression" in broken.output
    assert not (tmp_path / "broken").exists()   # refused before anything was exported or trained

    # "patient" = the last digit of the file name: 6 patients, each with one image of every class
    work = tmp_path / "work"
    result = run_cli("retrain", "--base-data", base, "--locked-test", locked, "--epochs", 1, "--promote", "never",
                     "--group-pattern", r"_\d\d(\d)\.png$", "--work-dir", work)
    assert result.exit_code == 0, result.output
    assert "patients known for 18 image(s) (6 patient(s))" in result.output
    split = load_checkpoint(work / "candidate.pt")["meta"]["split"]
    assert split["group_pattern"] == MERGED_GROUP_PATTERN and split["n_groups"] == 6
    with app.app_context():
        data = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v2")).meta["training_data"]
        assert (data["group_pattern"], data["images_with_patient"], data["patients"]) == (r"_\d\d(\d)\.png$", 18, 6)
