import math

import numpy as np
import pytest

from ml.metrics import (average_precision, bootstrap_ci, roc_auc, roc_curve, summarise,
                        threshold_for_sensitivity, threshold_metrics)


def test_roc_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5          # ties count one half
    assert math.isnan(roc_auc([1, 1], [0.3, 0.4]))


def test_roc_auc_equals_trapezoid_of_its_curve():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.7 + y * 0.3, 2)        # with ties
    fpr, tpr, _ = roc_curve(y, s)
    assert roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr))


def test_average_precision_hand_computed():
    # ranks: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg): AP = 0.5*1 + 0.5*(2/3)
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)


def test_threshold_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05]
    m = threshold_metrics(y, s, 0.5)
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_target_sensitivity_and_is_the_highest_that_does(target):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) * 0.6 + y * 0.3
    t = threshold_for_sensitivity(y, s, target)
    assert threshold_metrics(y, s, t)["sensitivity"] >= target
    cut = np.min(s[s > t])              # the lowest positive that had to be included
    assert y[s == cut].max() == 1
    assert threshold_metrics(y, s, cut)["sensitivity"] >= target   # same decisions as t
    above = np.min(s[s > cut]) if (s > cut).any() else cut + 1
    assert threshold_metrics(y, s, above)["sensitivity"] < target  # any higher threshold fails
    below = s[s < t]
    assert len(below) == 0 or t == (cut + below.max()) / 2          # margin on both sides


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + y * 0.5
    lo, hi = bootstrap_ci(y, s, n_boot=300)
    auc = roc_auc(y, s)
    assert lo < auc < hi and hi - lo < 0.2


def test_summarise_has_the_report_keys():
    out = summarise([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.1], 0.5)
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "pr_auc",
                "threshold", "n", "n_positive"):
        assert key in out
    assert out["n"] == 4 and out["n_positive"] == 2 and out["roc_auc"] == 1.0
