"""The MRMC analysis (ml.mrmc) against the published results for the Van Dyke et al. (1993)
reader study, and its behaviour on generated studies with three modalities.

Published figures: University of Iowa OR-DBM MRMC 2.5 output for the Van Dyke data
(trapezoidal AUC, Obuchowski-Rockette with jackknife covariances, Hillis ddf), as quoted by
RJafroc (dpc10ster/RJafroc) and MRMCaov and listed in ../shared/data/mrmc/README.md; the
fixed-reader single-modality figures are the Iowa output quoted in RJafroc's
R/StORSummaryFRRC.R (from its inst/Iowa/VanDyke.txt). Each is checked to its printed
precision: within half a unit of its last printed digit.
"""
from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from ml.metrics import roc_auc
from ml.mrmc import analyse, empirical_auc, read_ratings_csv

VANDYKE = Path(__file__).resolve().parents[1] / "data" / "mrmc" / "vandyke.csv"


def printed(value: float, figure: str) -> None:
    """value agrees with `figure` (as printed) to the figure's last digit."""
    exponent = Decimal(figure).as_tuple().exponent
    tolerance = 0.5 * 10.0 ** exponent * (1 + 1e-9)
    assert value is not None and abs(value - float(figure)) <= tolerance, f"{value} is not {figure}"


@pytest.fixture(scope="module")
def vd() -> dict:
    return analyse(read_ratings_csv(VANDYKE))


def test_design_of_the_van_dyke_file(vd):
    assert vd["modalities"] == ["0", "1"] and vd["readers"] == ["0", "1", "2", "3", "4"]
    assert (vd["n_cases"], vd["n_positive"], vd["n_negative"]) == (114, 45, 69)


@pytest.mark.parametrize("modality, figures", [
    ("0", ["0.91964573", "0.85877617", "0.90386473", "0.97310789", "0.82979066"]),
    ("1", ["0.94782609", "0.90531401", "0.92173913", "0.99935588", "0.92995169"]),
])
def test_reader_aucs(vd, modality, figures):
    for reader, figure in zip(vd["readers"], figures):
        printed(vd["reader_auc"][modality][reader], figure)


def test_mean_aucs(vd):
    printed(vd["auc"]["0"], "0.89703704")
    printed(vd["auc"]["1"], "0.94083736")


def test_random_readers_random_cases(vd):
    rrrc = vd["rrrc"]
    printed(rrrc["f"], "4.46")
    assert rrrc["ndf"] == 1
    printed(rrrc["ddf"], "15.25967")
    printed(rrrc["ddf"], "15.26")
    printed(rrrc["p"], "0.05166569")
    printed(rrrc["p"], "0.0517")
    printed(rrrc["error_term"], "0.00107626")
    [pair] = vd["pairs"]
    assert (pair["a"], pair["b"]) == ("0", "1")
    printed(pair["diff"], "-0.04380032")
    printed(pair["se"], "0.02075")
    printed(pair["t"], "-2.11")
    printed(pair["df"], "15.26")
    printed(pair["p"], "0.0517")
    printed(pair["ci_low"], "-0.08796")
    printed(pair["ci_high"], "0.00036")


@pytest.mark.parametrize("modality, auc, se, df, low, high", [
    ("0", "0.89703704", "0.03317360", "12.74", "0.82522360", "0.96885048"),
    ("1", "0.94083736", "0.02156637", "12.71", "0.89413783", "0.98753689"),
])
def test_random_readers_single_modality_intervals(vd, modality, auc, se, df, low, high):
    row = vd["rrrc"]["modalities"][modality]
    for key, figure in (("auc", auc), ("se", se), ("df", df), ("ci_low", low), ("ci_high", high)):
        printed(row[key], figure)


def test_fixed_readers_random_cases(vd):
    frrc = vd["frrc"]
    printed(frrc["chi2"], "5.47595")
    assert frrc["df"] == 1
    printed(frrc["p"], "0.0193")
    [pair] = vd["frrc_pairs"]
    printed(pair["diff"], "-0.04380032")
    printed(pair["se"], "0.01872")
    printed(pair["ci_low"], "-0.08049")
    printed(pair["ci_high"], "-0.00711")
    printed(pair["p"], "0.0193")  # a z test on one degree of freedom is the chi-square test


def test_fixed_readers_per_reader_differences(vd):
    rows = vd["frrc_reader_pairs"]
    assert [r["reader"] for r in rows] == vd["readers"]
    for row, diff, se in zip(rows, ["-0.02818", "-0.04654", "-0.01787", "-0.02625", "-0.10016"],
                             ["0.02551", "0.02630", "0.03121", "0.01729", "0.04406"]):
        assert (row["a"], row["b"]) == ("0", "1")
        printed(row["diff"], diff)
        printed(row["se"], se)
        assert row["ci_low"] < row["diff"] < row["ci_high"]


@pytest.mark.parametrize("modality, se, low, high", [
    ("0", "0.02428971", "0.84943008", "0.94464399"),
    ("1", "0.01677632", "0.90795637", "0.97371835"),
])
def test_fixed_readers_single_modality_intervals(vd, modality, se, low, high):
    row = vd["frrc"]["modalities"][modality]
    printed(row["se"], se)
    printed(row["ci_low"], low)
    printed(row["ci_high"], high)


def test_random_readers_fixed_cases(vd):
    rrfc = vd["rrfc"]
    printed(rrfc["f"], "8.70")
    assert (rrfc["ndf"], rrfc["ddf"]) == (1, 4)
    printed(rrfc["p"], "0.0420")
    [pair] = vd["rrfc_pairs"]
    printed(pair["p"], "0.0420")
    assert pair["df"] == 4 and pair["ci_low"] < pair["diff"] < pair["ci_high"] < 0


def test_variance_components(vd):
    per = vd["modality_components"]
    printed(per["0"]["var_error"], "0.00101410")
    printed(per["1"]["var_error"], "0.00059047")
    printed(per["0"]["cov2"], "0.00048396")
    printed(per["1"]["cov2"], "0.00020419")
    printed(vd["ms_t"], "0.00479617")
    printed(vd["ms_tr"], "0.00055103")
    # the overall Var(error) and Cov2 average the per-modality ones (equal reader counts)
    assert vd["var_error"] == pytest.approx((0.00101410 + 0.00059047) / 2, abs=1e-8)
    assert vd["cov2"] == pytest.approx((0.00048396 + 0.00020419) / 2, abs=1e-8)
    # the published RRRC error term MS(T×R) + J·(Cov2 − Cov3) fixes Cov2 − Cov3
    assert vd["cov2"] - vd["cov3"] == pytest.approx((0.00107626 - 0.00055103) / 5, abs=2e-9)


def test_full_obuchowski_rockette_components(vd):
    """The OR variance components and covariances for Van Dyke as printed by MRMCaov's
    summary (its README) and RJafroc's UtilORVarComponentsFactorial(dataset02, "Wilcoxon",
    covEstMethod = "jackknife") example, including the per-reader Var(error) and Cov1."""
    for key, figure in (("var_r", "0.0015349993"), ("var_tr", "0.0002004025"), ("var_error", "0.0008022883"),
                        ("cov1", "0.0003466137"), ("cov2", "0.0003440748"), ("cov3", "0.0002390284"),
                        ("ms_t", "0.0047961705"), ("ms_r", "0.0038362000"), ("ms_tr", "0.0005510306"),
                        ("corr1", "0.4320314"), ("corr2", "0.4288668"), ("corr3", "0.2979333")):
        printed(vd[key], figure)
    printed(vd["modality_components"]["0"]["ms_r"], "0.003082629")
    printed(vd["modality_components"]["1"]["ms_r"], "0.001304602")
    per_reader = [("0.0006989006", "3.734661e-04"), ("0.0011060528", "7.601598e-04"), ("0.0008423434", "3.553224e-04"),
                  ("0.0001505777", "1.083399e-06"), ("0.0012135668", "2.430368e-04")]
    for reader, (var, cov1) in zip(vd["readers"], per_reader):
        printed(vd["reader_components"][reader]["var_error"], var)
        printed(vd["reader_components"][reader]["cov1"], cov1)


# --- generated studies -------------------------------------------------------------------

def synthetic_rows(modalities=("A", "B", "C"), readers=4, cases=40, effects=(0.0, 0.4, 0.8), seed=0):
    """A crossed study with a correlated case difficulty, a reader skill and modality effects;
    ratings rounded to one decimal so that ties occur."""
    rng = np.random.default_rng(seed)
    truth = (np.arange(cases) % 5 < 2).astype(int)
    difficulty = rng.normal(0, 1, cases)
    rows = []
    for j in range(readers):
        skill = rng.normal(0, 0.3)
        for modality, effect in zip(modalities, effects):
            score = 0.6 * difficulty + truth * (1.0 + effect + skill) + rng.normal(0, 1, cases)
            rows += [(f"reader {j}", modality, f"case {k}", int(truth[k]), round(float(score[k]), 1))
                     for k in range(cases)]
    return rows


def test_jackknife_areas_match_leaving_each_case_out():
    rng = np.random.default_rng(1)
    truth = np.array([1, 0] * 9 + [0, 0])
    ratings = rng.integers(1, 6, len(truth)).astype(float)  # a 5-point scale: many ties
    auc, jack = empirical_auc(truth, ratings)
    assert auc == pytest.approx(roc_auc(truth, ratings), abs=1e-12)
    for k in range(len(truth)):
        keep = np.arange(len(truth)) != k
        assert jack[k] == pytest.approx(roc_auc(truth[keep], ratings[keep]), abs=1e-12)


def test_three_modalities_report_every_pair():
    result = analyse(synthetic_rows())
    assert result["modalities"] == ["A", "B", "C"]
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("A", "B"), ("A", "C"), ("B", "C")]
    for key in ("frrc_pairs", "rrfc_pairs"):
        assert len(result[key]) == 3
    for analysis in ("rrrc", "frrc", "rrfc"):  # each analysis also carries its own pairs
        assert result[analysis]["pairs"] == result["pairs" if analysis == "rrrc" else f"{analysis}_pairs"]
    assert len(result["frrc_reader_pairs"]) == 3 * 4
    assert result["rrrc"]["ndf"] == 2 and result["frrc"]["df"] == 2 and result["rrfc"]["ddf"] == 6
    for pair in result["pairs"]:
        for key in ("a", "b", "diff", "se", "ci_low", "ci_high", "p"):
            assert pair[key] is not None
        assert pair["diff"] == pytest.approx(result["auc"][pair["a"]] - result["auc"][pair["b"]])
        assert pair["ci_low"] < pair["diff"] < pair["ci_high"] and 0 < pair["p"] <= 1
    # the modality effects grow from A to C: C beats A clearly
    assert result["pairs"][1]["diff"] < 0 and result["pairs"][1]["p"] < 0.05
    for j, reader in enumerate(result["readers"]):
        rows = [r for r in synthetic_rows() if r[0] == reader and r[1] == "B"]
        truth = [r[3] for r in rows]
        assert result["reader_auc"]["B"][reader] == pytest.approx(roc_auc(truth, [r[4] for r in rows]))


def test_relabelling_modalities_gives_the_same_analysis():
    rows = synthetic_rows()
    base = analyse(rows)
    rename = {"A": "z-third", "B": "x-first", "C": "y-second"}
    shuffled = [(r, rename[m], c, t, x) for r, m, c, t, x in rows]
    np.random.default_rng(2).shuffle(shuffled)  # row order, hence first-seen order, changes too
    other = analyse(shuffled, modalities=["y-second", "z-third", "x-first"])
    for analysis, stat in (("rrrc", "f"), ("rrrc", "ddf"), ("rrrc", "p"), ("frrc", "chi2"), ("frrc", "p"),
                           ("rrfc", "f"), ("rrfc", "p")):
        assert other[analysis][stat] == pytest.approx(base[analysis][stat], rel=1e-9)
    for key in ("var_error", "cov1", "cov2", "cov3", "ms_t", "ms_r", "ms_tr"):
        assert other[key] == pytest.approx(base[key], rel=1e-9)
    for mod, new in rename.items():
        assert other["auc"][new] == pytest.approx(base["auc"][mod])
    back = {v: k for k, v in rename.items()}
    for key in ("pairs", "frrc_pairs", "rrfc_pairs"):
        assert len(other[key]) == 3
        for pair in other[key]:
            a, b = back[pair["a"]], back[pair["b"]]
            [mirror] = [p for p in base[key] if {p["a"], p["b"]} == {a, b}]
            sign = 1 if (mirror["a"], mirror["b"]) == (a, b) else -1
            assert pair["diff"] == pytest.approx(sign * mirror["diff"])
            assert pair["se"] == pytest.approx(mirror["se"]) and pair["p"] == pytest.approx(mirror["p"])
            low, high = sorted((sign * mirror["ci_low"], sign * mirror["ci_high"]))
            assert (pair["ci_low"], pair["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_dict_rows_and_two_modality_subset():
    rows = synthetic_rows()
    as_dicts = [dict(zip(("reader", "modality", "case", "truth", "rating"), r)) for r in rows]
    assert analyse(as_dicts)["rrrc"] == analyse(rows)["rrrc"]
    # with two modalities the global F test and the pair's t test are the same test
    two = analyse([r for r in rows if r[1] != "B"])
    [pair] = two["pairs"]
    assert pair["t"] ** 2 == pytest.approx(two["rrrc"]["f"]) and pair["p"] == pytest.approx(two["rrrc"]["p"])
    [fpair] = two["frrc_pairs"]
    assert fpair["z"] ** 2 == pytest.approx(two["frrc"]["chi2"]) and fpair["p"] == pytest.approx(two["frrc"]["p"])


def test_identical_modalities_give_no_test_rather_than_a_number():
    rows = [(r, m, c, t, x) for r, _, c, t, x in synthetic_rows(("A",), effects=(0.0,)) for m in ("A", "B")]
    result = analyse(rows)
    [pair] = result["pairs"]
    assert pair["diff"] == 0 and pair["se"] == 0 and pair["p"] is None
    assert (pair["ci_low"], pair["ci_high"]) == (0, 0)
    assert result["rrrc"]["f"] is None and result["frrc"]["chi2"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in result["rrrc"].values())
