"""Multi-reader multi-case (MRMC) ROC analysis: does a modality (say, reading with the AI)
change readers' accuracy, allowing for both reader and case variation?

Method (docs/reader-studies.md):
- the figure of merit is each reader's empirical ROC area in each modality (the trapezoidal
  area, i.e. the Mann-Whitney statistic, a tie between a diseased and a non-diseased case
  counting one half);
- the Obuchowski-Rockette (1995) model of those areas, with the error covariances estimated by
  the jackknife over cases, in Hillis's formulation: Var(error) (same reader, same modality),
  Cov1 (same reader, different modalities), Cov2 (different readers, same modality), Cov3
  (different readers, different modalities);
- three analyses: random readers and random cases (F test with Hillis's 2007 denominator
  degrees of freedom, ddf_H), fixed readers and random cases (chi-square test), random readers
  and fixed cases (the treatment × reader ANOVA F test), with 95 % intervals for every pair
  of modalities and for each modality alone.
The formulas are those printed by the University of Iowa's OR-DBM MRMC program; tests/ml/
test_mrmc.py reproduces its published results for the Van Dyke et al. (1993) study.

Numbers that are undefined (a zero error term, for example when two modalities carry
identical ratings) or infinite come back as None so that the result is plain JSON.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np
from scipy import stats

from ml.mrmc_data import COLUMNS, Design, MRMCError, build_design, read_ratings_csv

__all__ = ["COLUMNS", "MRMCError", "analyse", "build_design", "empirical_auc", "read_ratings_csv"]


def empirical_auc(truth: np.ndarray, ratings: np.ndarray) -> tuple[float, np.ndarray]:
    """The trapezoidal ROC area of one reader in one modality and its K jackknife values (the
    area with case k left out), computed from ranks in O(K log K)."""
    truth = np.asarray(truth, dtype=bool)
    ratings = np.asarray(ratings, dtype=float)
    pos, neg = ratings[truth], ratings[~truth]
    n1, n0 = len(pos), len(neg)
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, "left")
    tied = np.searchsorted(neg_sorted, pos, "right") - below
    wins_pos = below + 0.5 * tied  # per diseased case: non-diseased cases it outranks
    above = n1 - np.searchsorted(pos_sorted, neg, "right")
    tied = np.searchsorted(pos_sorted, neg, "right") - np.searchsorted(pos_sorted, neg, "left")
    wins_neg = above + 0.5 * tied  # per non-diseased case: diseased cases that outrank it
    total = wins_pos.sum()
    jack = np.empty(len(ratings))
    jack[truth] = (total - wins_pos) / ((n1 - 1) * n0)
    jack[~truth] = (total - wins_neg) / (n1 * (n0 - 1))
    return float(total / (n1 * n0)), jack


def _covariances(jack: np.ndarray) -> np.ndarray:
    """Jackknife covariance of the T × J areas: ((K-1)/K) Σ_k (θ(k) - θ(.))(θ'(k) - θ'(.)),
    returned as an array indexed [t, j, t', j']."""
    t, j, k = jack.shape
    dev = (jack - jack.mean(axis=2, keepdims=True)).reshape(t * j, k)
    return ((k - 1) / k * dev @ dev.T).reshape(t, j, t, j)


def _components(cov: np.ndarray) -> dict:
    """Var(error), Cov1, Cov2, Cov3 (averages over the matching pairs), per modality Var and
    Cov2, and per reader Var and Cov1."""
    t_n, j_n = cov.shape[:2]
    same_t = np.eye(t_n, dtype=bool)[:, None, :, None]
    same_j = np.eye(j_n, dtype=bool)[None, :, None, :]
    full = np.ones(cov.shape, dtype=bool)
    var = cov[full & same_t & same_j].mean()
    cov1 = cov[full & ~same_t & same_j].mean()
    cov2 = cov[full & same_t & ~same_j].mean()
    cov3 = cov[full & ~same_t & ~same_j].mean()
    var_t, cov2_t, var_j, cov1_j = [], [], [], []
    off_j = ~np.eye(j_n, dtype=bool)
    off_t = ~np.eye(t_n, dtype=bool)
    for i in range(t_n):
        block = cov[i, :, i, :]
        var_t.append(np.diag(block).mean())
        cov2_t.append(block[off_j].mean())
    for j in range(j_n):
        block = cov[:, j, :, j]
        var_j.append(np.diag(block).mean())
        cov1_j.append(block[off_t].mean())
    return {"var": float(var), "cov1": float(cov1), "cov2": float(cov2), "cov3": float(cov3),
            "var_t": var_t, "cov2_t": cov2_t, "var_j": var_j, "cov1_j": cov1_j}


def _mean_squares(auc: np.ndarray) -> dict:
    """Treatment × reader ANOVA of the areas auc[t, j]."""
    t_n, j_n = auc.shape
    grand = auc.mean()
    m_t, m_j = auc.mean(axis=1), auc.mean(axis=0)
    resid = auc - m_t[:, None] - m_j[None, :] + grand
    return {"ms_t": float(j_n * ((m_t - grand) ** 2).sum() / (t_n - 1)),
            "ms_r": float(t_n * ((m_j - grand) ** 2).sum() / (j_n - 1)),
            "ms_tr": float((resid ** 2).sum() / ((t_n - 1) * (j_n - 1))),
            "ms_r_t": [float(((row - row.mean()) ** 2).sum() / (j_n - 1)) for row in auc]}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _t_quantile(df: float, se: float = 1.0) -> float:
    if se == 0:
        return 0.0  # a zero standard error: the interval is the estimate itself
    if not df > 0:
        return math.nan
    return float(stats.norm.ppf(0.975)) if math.isinf(df) else float(stats.t.ppf(0.975, df))


def _t_p(stat: float, df: float) -> float:
    if math.isnan(stat) or not df > 0:
        return math.nan
    return float(2 * (stats.norm.sf(abs(stat)) if math.isinf(df) else stats.t.sf(abs(stat), df)))


def _f_p(f: float, ndf: int, ddf: float) -> float:
    if math.isnan(f) or not ddf > 0:
        return math.nan
    return float(stats.chi2.sf(f * ndf, ndf) if math.isinf(ddf) else stats.f.sf(f, ndf, ddf))


def _interval(label: dict, estimate: float, se: float, df: float | None) -> dict:
    """estimate ± t(0.975; df)·se with its t statistic and two-sided p; df = None gives the
    normal-theory version (a z statistic, no df); df = inf (None in the result) the normal
    quantile for a t test whose degrees of freedom are unbounded."""
    normal = df is None
    df = math.inf if normal else df
    q = _t_quantile(df, se)
    stat = _ratio(estimate, se)
    figures = {"z": stat} if normal else {"t": stat, "df": df}
    return {**label, "diff": estimate, "se": se, **figures, "p": _t_p(stat, df),
            "ci_low": estimate - q * se, "ci_high": estimate + q * se}


def _mean_interval(estimate: float, se: float, df: float | None) -> dict:
    q = _t_quantile(math.inf if df is None else df, se)
    return {"auc": estimate, "se": se, **({} if df is None else {"df": df}),
            "ci_low": estimate - q * se, "ci_high": estimate + q * se}


def _clean(value):
    """Floats made JSON-safe (NaN and infinities → None), numpy scalars made Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def analyse_design(design: Design) -> dict:
    """The three Obuchowski-Rockette analyses of a checked design (see analyse)."""
    mods, readers = list(design.modalities), list(design.readers)
    t_n, j_n, k_n = design.ratings.shape
    auc = np.empty((t_n, j_n))
    jack = np.empty((t_n, j_n, k_n))
    for t in range(t_n):
        for j in range(j_n):
            auc[t, j], jack[t, j] = empirical_auc(design.truth, design.ratings[t, j])
    comp = _components(_covariances(jack))
    ms = _mean_squares(auc)
    var, cov1, cov2, cov3 = comp["var"], comp["cov1"], comp["cov2"], comp["cov3"]
    means = auc.mean(axis=1)
    pairs = list(combinations(range(t_n), 2))

    # Random readers, random cases (Hillis 2007: ddf_H).
    err_rrrc = ms["ms_tr"] + j_n * max(cov2 - cov3, 0.0)
    f_rrrc = _ratio(ms["ms_t"], err_rrrc)
    ddf_rrrc = (err_rrrc ** 2 / (ms["ms_tr"] ** 2 / ((t_n - 1) * (j_n - 1))) if ms["ms_tr"] > 0
                else (math.inf if err_rrrc > 0 else math.nan))
    se_rrrc = math.sqrt(2 * err_rrrc / j_n)
    rrrc_single = {}
    for t, mod in enumerate(mods):
        ms_r, c2 = ms["ms_r_t"][t], comp["cov2_t"][t]
        err = ms_r + j_n * max(c2, 0.0)
        df = err ** 2 / (ms_r ** 2 / (j_n - 1)) if ms_r > 0 else (math.inf if err > 0 else math.nan)
        rrrc_single[mod] = _mean_interval(means[t], math.sqrt(err / j_n), df)

    # Fixed readers, random cases.
    err_frrc = var - cov1 + (j_n - 1) * max(cov2 - cov3, 0.0)
    chi2 = _ratio((t_n - 1) * ms["ms_t"], err_frrc)
    se_frrc = math.sqrt(2 * err_frrc / j_n) if err_frrc > 0 else math.nan
    frrc_single = {}
    for t, mod in enumerate(mods):
        err = comp["var_t"][t] + (j_n - 1) * max(comp["cov2_t"][t], 0.0)
        frrc_single[mod] = _mean_interval(means[t], math.sqrt(err / j_n), None)
    reader_pairs = []
    for j, reader in enumerate(readers):
        d = comp["var_j"][j] - comp["cov1_j"][j]
        se = math.sqrt(2 * d) if d > 0 else math.nan
        for a, b in pairs:
            reader_pairs.append(_interval({"reader": reader, "a": mods[a], "b": mods[b]},
                                          float(auc[a, j] - auc[b, j]), se, None))

    # Random readers, fixed cases: the conventional treatment × reader ANOVA.
    ddf_rrfc = (t_n - 1) * (j_n - 1)
    f_rrfc = _ratio(ms["ms_t"], ms["ms_tr"])
    se_rrfc = math.sqrt(2 * ms["ms_tr"] / j_n)

    def pair_list(se: float, df: float | None) -> list[dict]:
        return [_interval({"a": mods[a], "b": mods[b]}, float(means[a] - means[b]), se, df) for a, b in pairs]

    rrrc_pairs, frrc_pairs = pair_list(se_rrrc, ddf_rrrc), pair_list(se_frrc, None)
    rrfc_pairs = pair_list(se_rrfc, ddf_rrfc)
    result = {
        "method": "Obuchowski-Rockette, jackknife covariances, Hillis denominator degrees of freedom; "
                  "empirical (trapezoidal) ROC area",
        "alpha": 0.05,
        "modalities": mods, "readers": readers,
        "n_cases": k_n, "n_positive": int(design.truth.sum()), "n_negative": int((~design.truth).sum()),
        "auc": {mod: float(means[t]) for t, mod in enumerate(mods)},
        "reader_auc": {mod: {reader: float(auc[t, j]) for j, reader in enumerate(readers)}
                       for t, mod in enumerate(mods)},
        "var_error": var, "cov1": cov1, "cov2": cov2, "cov3": cov3,
        "ms_t": ms["ms_t"], "ms_r": ms["ms_r"], "ms_tr": ms["ms_tr"],
        # Obuchowski-Rockette reader and treatment × reader variance components (may be negative)
        "var_r": (ms["ms_r"] - (ms["ms_tr"] - var + cov1 + cov2 - cov3) - var - (t_n - 1) * cov1
                  + cov2 + (t_n - 1) * cov3) / t_n,
        "var_tr": ms["ms_tr"] - var + cov1 + cov2 - cov3,
        "corr1": _ratio(cov1, var), "corr2": _ratio(cov2, var), "corr3": _ratio(cov3, var),
        "modality_components": {mod: {"var_error": comp["var_t"][t], "cov2": comp["cov2_t"][t],
                                      "ms_r": ms["ms_r_t"][t]} for t, mod in enumerate(mods)},
        "reader_components": {reader: {"var_error": comp["var_j"][j], "cov1": comp["cov1_j"][j]}
                              for j, reader in enumerate(readers)},
        "rrrc": {"f": f_rrrc, "ndf": t_n - 1, "ddf": ddf_rrrc, "p": _f_p(f_rrrc, t_n - 1, ddf_rrrc),
                 "error_term": err_rrrc, "modalities": rrrc_single, "pairs": rrrc_pairs},
        "frrc": {"chi2": chi2, "df": t_n - 1,
                 "p": float(stats.chi2.sf(chi2, t_n - 1)) if not math.isnan(chi2) else math.nan,
                 "error_term": err_frrc, "modalities": frrc_single, "pairs": frrc_pairs},
        "rrfc": {"f": f_rrfc, "ndf": t_n - 1, "ddf": ddf_rrfc, "p": _f_p(f_rrfc, t_n - 1, ddf_rrfc),
                 "error_term": ms["ms_tr"],
                 "modalities": {mod: _mean_interval(means[t], math.sqrt(ms["ms_r_t"][t] / j_n), j_n - 1)
                                for t, mod in enumerate(mods)},
                 "pairs": rrfc_pairs},
        # the pair lists again at the top level (the issue's `pairs` is the RRRC one)
        "pairs": rrrc_pairs, "frrc_pairs": frrc_pairs, "frrc_reader_pairs": reader_pairs, "rrfc_pairs": rrfc_pairs,
    }
    return _clean(result)


def analyse(rows: Iterable, modalities: Sequence[str] | None = None) -> dict:
    """MRMC analysis of rows (reader, modality, case, truth, rating), tuples or dicts.

    Modalities are compared in the order of their first appearance (or `modalities`); each
    pair (a, b) reports diff = AUC(a) - AUC(b). Raises MRMCError on input that cannot be
    analysed (see ml.mrmc_data.build_design).
    """
    return analyse_design(build_design(rows, modalities))
