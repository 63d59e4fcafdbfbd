import math

import numpy as np
import pytest

from ml.metrics import (average_precision, bootstrap_ci, positives_needed, roc_auc, roc_curve,
                        sensitivity_confidence, summarise, threshold_for_sensitivity, threshold_metrics)


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


def test_sensitivity_confidence_is_the_binomial_tail_of_the_order_statistic():
    # threshold below the 2nd lowest of 10 cancers (one missed): P(miss rate <= 0.1) = 1 - P(Bin(10, .1) <= 1)
    assert sensitivity_confidence(10, 1, 0.9) == pytest.approx(1 - 0.9 ** 10 - 10 * 0.1 * 0.9 ** 9)
    assert sensitivity_confidence(10, 0, 0.9) == pytest.approx(1 - 0.9 ** 10)
    assert sensitivity_confidence(34, 1, 0.9) > 0.8 > sensitivity_confidence(34, 2, 0.9)
    assert positives_needed(0.9, 0.8) == 16 and positives_needed(0.9, 0.5) == 7
    assert 1 - 0.9 ** 16 >= 0.8 > 1 - 0.9 ** 15
    with pytest.raises(ValueError):
        sensitivity_confidence(5, 5, 0.9)


def test_a_confident_threshold_keeps_the_target_on_new_cases_as_often_as_promised():
    """Scores of cancers uniform on [0, 1]: a threshold t has true sensitivity 1 - t exactly.
    Over many reviewed sets of 40 cancers, the confident rule keeps sensitivity >= 0.9 in at
    least 80 % of them; the in-sample rule, in far fewer."""
    rng = np.random.default_rng(3)
    kept = {None: 0, 0.8: 0}
    trials = 2000
    for _ in range(trials):
        pos = rng.random(40)
        neg = rng.random(60) * 0.5
        y = np.r_[np.ones(40), np.zeros(60)]
        s = np.r_[pos, neg]
        for conf in kept:
            t = threshold_for_sensitivity(y, s, 0.9, confidence=conf)
            kept[conf] += (1 - t) >= 0.9
    assert kept[0.8] / trials >= 0.8           # promised 0.8; one cancer missed here gives 0.92 in theory
    assert kept[None] / trials < 0.5           # the in-sample rule (four missed): 0.37 in theory


@pytest.mark.parametrize("n_pos", [5, 10, 34, 120])
def test_the_confident_threshold_never_lies_above_the_in_sample_one(n_pos):
    rng = np.random.default_rng(n_pos)
    y = np.r_[np.ones(n_pos), np.zeros(80)]
    s = np.r_[rng.random(n_pos) * 0.7 + 0.3, rng.random(80) * 0.7]
    in_sample = threshold_for_sensitivity(y, s, 0.9)
    confident = threshold_for_sensitivity(y, s, 0.9, confidence=0.8)
    assert confident <= in_sample
    missed = int(((s < confident) & (y == 1)).sum())
    if n_pos >= positives_needed(0.9, 0.8):
        assert sensitivity_confidence(n_pos, missed, 0.9) >= 0.8
        assert missed + 1 == n_pos or sensitivity_confidence(n_pos, missed + 1, 0.9) < 0.8  # the highest such
    else:
        assert missed == 0  # too few: below every cancer, the most the data supports


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
