"""Differential expression (pdex-style) against direct scipy / hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.stats import mannwhitneyu, norm, rankdata

from perturbdiff_scvi.metrics import (
    DE_COLUMNS,
    benjamini_hochberg,
    differential_expression,
    log2_fold_change,
    pseudobulk_geometric,
)


def _log1p_counts(rng, n, rates):
    return np.log1p(rng.poisson(rates, size=(n, len(rates))).astype(np.float64))


@pytest.fixture
def groups():
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.05, 3.0, size=40)
    x_ref = _log1p_counts(rng, 60, rates)
    rates_t = rates.copy()
    rates_t[:6] *= 4.0
    rates_t[6:10] *= 0.2
    x_t = _log1p_counts(rng, 45, rates_t)
    # edge genes: constant in both groups, zero in ref only, zero in target only
    x_ref[:, 10] = 0.0
    x_t[:, 10] = 0.0
    x_ref[:, 11] = 0.0
    x_t[:5, 11] = np.log1p(2.0)
    x_t[:, 12] = 0.0
    x_ref[:5, 12] = np.log1p(2.0)
    return x_t, x_ref


def _bh_hand(p):
    p = np.asarray(p, dtype=float)
    m = p.size
    order = np.argsort(p)
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


def _mwu_hand(x, y):
    """Asymptotic two-sided MWU with tie and continuity correction (numba-mwu / pdex formula)."""
    n1, n2 = len(x), len(y)
    n = n1 + n2
    ranks = rankdata(np.r_[x, y])
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    u = max(u1, n1 * n2 - u1)
    _, t = np.unique(np.r_[x, y], return_counts=True)
    s2 = n1 * n2 / 12 * ((n + 1) - (t**3 - t).sum() / (n * (n - 1)))
    if s2 <= 0:
        return u1, 1.0
    z = (u - n1 * n2 / 2 - 0.5) / np.sqrt(s2)
    return u1, min(1.0, 2 * norm.sf(z))


def test_columns_and_index(groups):
    x_t, x_ref = groups
    names = [f"g{i}" for i in range(x_t.shape[1])]
    de = differential_expression(x_t, x_ref, gene_names=names)
    assert tuple(de.columns) == DE_COLUMNS
    assert list(de.index) == names and list(de["feature"]) == names
    assert len(de) == x_t.shape[1]


def test_pvalues_match_scipy_per_gene_loop(groups):
    x_t, x_ref = groups
    de = differential_expression(x_t, x_ref)
    for g in range(x_t.shape[1]):
        if g == 10:  # constant gene: scipy gives nan, pdex gives 1
            assert de["p_value"].iloc[g] == 1.0
            continue
        res = mannwhitneyu(x_t[:, g], x_ref[:, g], method="asymptotic", use_continuity=True)
        assert de["p_value"].iloc[g] == pytest.approx(res.pvalue, rel=1e-10, abs=1e-300)
        assert de["statistic"].iloc[g] == pytest.approx(res.statistic)
        u_hand, p_hand = _mwu_hand(x_t[:, g], x_ref[:, g])
        assert de["statistic"].iloc[g] == pytest.approx(u_hand)
        assert de["p_value"].iloc[g] == pytest.approx(p_hand, rel=1e-8, abs=1e-300)
    # the up/down-regulated genes are detected
    assert (de["fdr"].iloc[:6] < 0.05).all()


def test_bh_matches_hand_implementation(groups):
    x_t, x_ref = groups
    de = differential_expression(x_t, x_ref)
    np.testing.assert_allclose(de["fdr"].to_numpy(), _bh_hand(de["p_value"].to_numpy()), rtol=1e-12)
    rng = np.random.default_rng(1)
    p = rng.uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), _bh_hand(p), rtol=1e-12)
    assert benjamini_hochberg([]).shape == (0,)


def test_log2_fold_change_definition_and_epsilon_zero(groups):
    x_t, x_ref = groups
    de = differential_expression(x_t, x_ref)
    t_mean, r_mean = np.expm1(x_t.mean(0)), np.expm1(x_ref.mean(0))
    np.testing.assert_allclose(de["target_mean"], t_mean)
    np.testing.assert_allclose(de["ref_mean"], r_mean)
    ok = (t_mean > 0) & (r_mean > 0)
    np.testing.assert_allclose(de["log2_fold_change"][ok], np.log2(t_mean[ok] / r_mean[ok]))
    np.testing.assert_allclose(de["fold_change"][ok], t_mean[ok] / r_mean[ok])
    # epsilon = 0: zero in both -> 0, zero in reference only -> +inf, zero in target only -> -inf
    assert de["log2_fold_change"].iloc[10] == 0.0 and de["fold_change"].iloc[10] == 1.0
    assert de["log2_fold_change"].iloc[11] == np.inf and de["fold_change"].iloc[11] == np.inf
    assert de["log2_fold_change"].iloc[12] == -np.inf and de["fold_change"].iloc[12] == 0.0
    np.testing.assert_array_equal(log2_fold_change([0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0]), [0, np.inf, -np.inf, 1])


def test_counts_input_and_sparse_input(groups):
    x_t, x_ref = groups
    counts_t, counts_r = np.expm1(x_t), np.expm1(x_ref)
    de_log = differential_expression(x_t, x_ref, is_log1p=True)
    de_cnt = differential_expression(counts_t, counts_r, is_log1p=False)
    np.testing.assert_allclose(de_cnt["log2_fold_change"], de_log["log2_fold_change"], rtol=1e-10)
    np.testing.assert_allclose(de_cnt["p_value"], de_log["p_value"], rtol=1e-10)
    np.testing.assert_allclose(pseudobulk_geometric(counts_t, is_log1p=False), np.expm1(np.log1p(counts_t).mean(0)))
    de_sp = differential_expression(sparse.csr_matrix(x_t), sparse.csr_matrix(x_ref))
    np.testing.assert_allclose(
        de_sp[["log2_fold_change", "p_value", "fdr"]], de_log[["log2_fold_change", "p_value", "fdr"]]
    )


def test_input_validation(groups):
    x_t, x_ref = groups
    with pytest.raises(ValueError):
        differential_expression(x_t, x_ref[:, :5])
    with pytest.raises(ValueError):
        differential_expression(x_t[:0], x_ref)
    with pytest.raises(ValueError):
        differential_expression(x_t, x_ref, gene_names=["a"])
