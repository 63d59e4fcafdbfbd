"""Three-class models (normal / benign / malignant), the malignancy score, Platt calibration
and the leakage guard: each against a direct computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ml.calibration import calibrated, fit_platt
from ml.checkpoint import load_model
from ml.explain import explain
from ml.inference import Predictor
from ml.metrics import expected_calibration_error, roc_auc
from ml.model import build_model, malignancy_logit
from ml.train import TrainConfig, fit
from tests.ml.conftest import make_folder

BUSI = ("benign", "malignant", "normal")


def test_malignancy_logit_is_the_log_odds_of_the_softmax():
    z = torch.randn(50, 3, dtype=torch.float64) * 4
    p = torch.softmax(z, dim=1)
    expected = torch.log(p[:, 1] / (1 - p[:, 1]))
    assert torch.allclose(malignancy_logit(z, (1,)).double(), expected, atol=1e-5)
    both = torch.log((p[:, 0] + p[:, 1]) / p[:, 2])
    assert torch.allclose(malignancy_logit(z, (0, 1)).double(), both, atol=1e-5)
    one = torch.randn(7, 1)
    assert torch.equal(malignancy_logit(one), one[:, 0])


def test_platt_recovers_a_known_miscalibration_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 2, 4000)                      # the true log-odds
    y = (rng.random(4000) < 1 / (1 + np.exp(-truth))).astype(int)
    shown = (truth - 1.0) / 0.5                         # an over-confident, shifted score
    c = fit_platt(shown, y)
    assert c["a"] == pytest.approx(0.5, abs=0.06) and c["b"] == pytest.approx(1.0, abs=0.15)
    before = expected_calibration_error(y, 1 / (1 + np.exp(-shown)))
    after = expected_calibration_error(y, calibrated(shown, c))
    assert after < 0.03 < before
    assert roc_auc(y, calibrated(shown, c)) == pytest.approx(roc_auc(y, shown), abs=1e-12)


def test_a_calibration_moved_to_a_sites_prevalence_is_calibrated_there_and_keeps_every_verdict():
    from ml import MLError
    from ml.calibration import fitted_prevalence, shift_prevalence, shift_threshold

    rng = np.random.default_rng(7)

    def site(n, prevalence):  # the same look per class at both sites: only the share of cancers differs
        y = (rng.random(n) < prevalence).astype(int)
        return rng.normal(np.where(y == 1, 1.5, -1.0), 1.0), y

    z_val, y_val = site(3000, 0.30)
    z_site, y_site = site(6000, 0.08)
    c = fit_platt(z_val, y_val)
    assert fitted_prevalence(c) == pytest.approx(y_val.mean())
    moved = shift_prevalence(c, 0.08)
    assert moved["a"] == c["a"] and moved["prevalence"] == 0.08
    before, after = (expected_calibration_error(y_site, calibrated(z_site, x)) for x in (c, moved))
    assert after < 0.02 and before > 0.05
    threshold = 0.3
    assert np.array_equal(calibrated(z_site, c) >= threshold, calibrated(z_site, moved) >= shift_threshold(threshold, moved))
    back = shift_prevalence(moved, float(y_val.mean()))   # moved again: from the stated share, not the fitted one
    assert back["b"] == pytest.approx(c["b"], abs=1e-12)
    with pytest.raises(MLError, match="does not record the share of cancers"):
        shift_prevalence({"method": "platt", "a": 1.0, "b": 0.0}, 0.1)
    with pytest.raises(MLError, match="strictly between 0 and 1"):
        shift_prevalence(c, 1.0)


def test_expected_calibration_error_by_hand():
    # bin [0.2, 0.267): two cases, mean 0.25, observed 0.5; bin [0.8, 0.867): one case 0.8, observed 1
    y, p = [0, 1, 1], [0.25, 0.25, 0.8]
    assert expected_calibration_error(y, p, 15) == pytest.approx(2 / 3 * 0.25 + 1 / 3 * 0.2)


def test_closed_form_gradient_of_a_three_class_head_equals_autograd():
    torch.manual_seed(4)
    model = build_model("none", 3, (1,)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 64, 64)
    for method in ("gradcam", "gradcam++"):
        p_fast, fast = explain(model, x, method)
        p_auto, auto = explain(model, x, method, analytic_gradient=False)
        assert torch.allclose(fast, auto, atol=1e-4), method
        with torch.no_grad():
            expected = torch.softmax(model(x), dim=1)[:, 1]
        assert torch.allclose(p_fast, expected, atol=1e-5) and torch.allclose(p_auto, expected, atol=1e-5)


def test_score_cam_explains_a_three_class_model_on_its_folded_copy():
    # the BatchNorm-folded copy Score-CAM runs must still know which output is malignant
    torch.manual_seed(5)
    model = build_model("none", 3, (1,), layer4_stride=1).eval()
    x = torch.randn(1, 3, 32, 32)
    folded_probs, folded = explain(model, x, "scorecam")
    plain_probs, plain = explain(model, x, "scorecam", fold_batchnorm=False)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)[:, 1]
    assert torch.allclose(folded_probs, expected, atol=1e-5) and folded.shape == (1, 32, 32)
    assert torch.allclose(folded, plain, atol=1e-3)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    data = make_folder(root / "data", n_per_class=10, classes=BUSI, seed=3)
    out = root / "model.pt"
    fit(TrainConfig(data=str(data), out=str(out), epochs=2, img_size=32, batch_size=8, progress=False))
    return data, out


def test_a_three_class_folder_trains_a_three_class_calibrated_model(three_class, tmp_path):
    data, out = three_class
    model, meta = load_model(out)
    assert meta["num_outputs"] == 3 and meta["class_names"] == list(BUSI) and meta["positive_classes"] == ["malignant"]
    assert model.fc.out_features == 3 and model.positive_outputs == (1,)
    assert meta["calibration"]["method"] == "platt" and meta["calibration"]["a"] > 0
    assert len(meta["seen_images"]["sha256"]) == 30 == len(meta["seen_images"]["dhash"])

    predictor = Predictor.from_checkpoint(out, "cpu")
    images = sorted((data / "malignant").glob("*.png"))[:3] + sorted((data / "benign").glob("*.png"))[:2]
    results = predictor.predict(images)
    with torch.inference_mode():
        raw = predictor.model(predictor.to_batch(images)).double()
    p_mal = torch.softmax(raw, dim=1)[:, 1]
    c = meta["calibration"]
    expected = torch.sigmoid(c["a"] * torch.log(p_mal / (1 - p_mal)) + c["b"])
    for r, e, row in zip(results, expected.tolist(), torch.softmax(raw, dim=1)):
        assert r.probability == pytest.approx(e, abs=1e-4)
        assert r.predicted_class == BUSI[int(row.argmax())]
        assert sum(r.class_probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert r.label == ("cancer" if r.probability >= meta["threshold"] else "normal")


def test_evaluate_reports_calibration_classes_and_the_leakage_guard(three_class, tmp_path):
    from manage import cli

    data, out = three_class
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--data", str(data), "--json",
                                      str(tmp_path / "own.json"), "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["classes"] == list(BUSI) and 0 <= own["ece"] <= 1 and 0 <= own["brier"] <= 1
    assert own["confusion"]["true"] == list(BUSI) and own["confusion"]["predicted"] == list(BUSI)
    assert np.array(own["confusion"]["matrix"]).sum() == 30 and np.array(own["confusion"]["matrix"]).sum(axis=1).tolist() == [10, 10, 10]
    assert own["overlap_exact"] == 30 and own["overlap_near"] == 0 and own["unseen"] is None
    assert "WARNING: 30 of these images are the model's own training" in result.output

    # a cancer/normal folder of new images: no overlap, malignant counted as positive
    fresh = make_folder(tmp_path / "fresh", n_per_class=6, classes=("cancer", "normal"), seed=99)
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--data", str(fresh), "--json",
                                      str(tmp_path / "fresh.json"), "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    new = json.loads((tmp_path / "fresh.json").read_text())
    assert new["n_positive"] == 6 and new["overlap_exact"] == 0 and new["unseen"]["n"] == 12 - new["overlap_near"]
    assert new["confusion"]["true"] == ["cancer", "normal"] and "WARNING" not in result.output
