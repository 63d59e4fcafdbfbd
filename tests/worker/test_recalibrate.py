"""`manage.py recalibrate`: the active model adapted to a site from its reviewed cases, as a
new version with the same weights, a new calibration and threshold, through the gate."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from tests.appfixtures import add_user, register_model
from tests.ml.conftest import make_folder
from tests.webapp.reviewdata import finished_case, review


def _reviewed_cases(app, version_id: int, n_malignant: int, n_other: int) -> None:
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    for i in range(n_malignant + n_other):
        malignant = i < n_malignant
        case_id = finished_case(app, version_id, 0.8 if malignant else 0.2, seed=100 + i)
        review(app, case_id, "rev@example.org", "agree", "malignant" if malignant else "benign")


def test_recalibrate_registers_the_same_weights_with_a_site_threshold(app, tmp_path, tiny_checkpoint, run_cli):
    from ml.inference import Predictor
    from webapp.extensions import db
    from webapp.models import ModelVersion

    active_id = register_model(app, tiny_checkpoint, name="base")
    _reviewed_cases(app, active_id, n_malignant=8, n_other=16)
    locked = make_folder(tmp_path / "locked", n_per_class=6, classes=("malignant", "normal"), seed=5)
    result = run_cli("recalibrate", "--locked-test", locked, "--site", "Hospital A", "--promote", "never",
                     "--target-sensitivity", 0.75)
    assert result.exit_code == 0, result.output
    assert "fitted on 24 reviewed case(s) (8 malignant)" in result.output
    assert "registered v2 (parent base)" in result.output and "decision: NOT PROMOTED" in result.output
    with app.app_context():
        new = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        base = db.session.get(ModelVersion, active_id)
        assert new.parent_id == active_id and not new.is_active
        adaptation = new.meta["site_adaptation"]
        assert adaptation["site"] == "Hospital A" and adaptation["n"] == 24 and adaptation["n_malignant"] == 8
        assert adaptation["after"]["sensitivity"] >= 0.75  # in-sample, by construction of the threshold
        assert new.meta["calibration"]["method"] == "platt" and new.threshold == adaptation["after"]["threshold"]
        # the same weights, so the same ranking on the locked test set
        assert new.meta["locked_test"]["roc_auc"] == pytest.approx(new.meta["compared_with"]["locked_test"]["roc_auc"])
        store = app.extensions["file_store"]
        old_model = Predictor.from_checkpoint(store.path(base.file_key), "cpu").model
        new_model = Predictor.from_checkpoint(store.path(new.file_key), "cpu").model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(old_model(x), new_model(x))


def test_too_few_reviewed_cases_is_refused_and_nothing_is_registered(app, tmp_path, tiny_checkpoint, run_cli):
    from webapp.extensions import db
    from webapp.models import ModelVersion

    active_id = register_model(app, tiny_checkpoint, name="base")
    _reviewed_cases(app, active_id, n_malignant=2, n_other=5)
    locked = make_folder(tmp_path / "locked", n_per_class=4, classes=("malignant", "normal"), seed=5)
    result = run_cli("recalibrate", "--locked-test", locked)
    assert result.exit_code == 1
    assert "needs at least 20 reviewed cases with 5 malignant" in result.output and "there are 7 (2 malignant)" in result.output
    with app.app_context():
        assert [v.name for v in db.session.scalars(select(ModelVersion))] == ["base"]
