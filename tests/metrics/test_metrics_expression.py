"""Pseudobulk errors, R², discrimination score and DE-agreement metrics vs direct computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.stats import pearsonr, spearmanr
from sklearn import metrics as skm

from perturbdiff_scvi.metrics import (
    baseline_normalized_score,
    de_metrics,
    differential_expression,
    discrimination_score,
    mae,
    mse,
    pearson_delta,
    r2_mean,
    realistic_zero_threshold,
    zero_small_values,
)


@pytest.fixture
def cells():
    rng = np.random.default_rng(0)
    ctrl = rng.gamma(2.0, 0.5, size=(50, 30))
    real = ctrl[:40] + rng.normal(0.3, 0.2, size=(40, 30))
    pred = real + rng.normal(0.0, 0.3, size=(40, 30))
    return pred, real, ctrl


# ----------------------------------------------------------------------------- pseudobulk errors


def test_mae_mse_match_numpy(cells):
    pred, real, ctrl = cells
    pm, rm, cm = pred.mean(0), real.mean(0), ctrl.mean(0)
    assert mae(pred, real) == pytest.approx(np.abs(pm - rm).mean())
    assert mse(pred, real) == pytest.approx(((pm - rm) ** 2).mean())
    assert mae(pm, rm) == pytest.approx(mae(pred, real))  # pseudobulk vectors accepted
    assert mae(sparse.csr_matrix(pred), real) == pytest.approx(mae(pred, real))
    # delta versions: identical to the plain ones (the control cancels) for mae/mse
    assert mae(pred, real, control=ctrl) == pytest.approx(np.abs((pm - cm) - (rm - cm)).mean())
    genes = np.array([0, 3, 7])
    assert mse(pred, real, genes=genes) == pytest.approx(((pm - rm)[genes] ** 2).mean())
    with pytest.raises(ValueError):
        mae(pred, real[:, :5])


def test_r2_mean_matches_sklearn(cells):
    pred, real, ctrl = cells
    assert r2_mean(pred, real) == pytest.approx(skm.r2_score(real.mean(0), pred.mean(0)))
    assert r2_mean(ctrl, real) == pytest.approx(skm.r2_score(real.mean(0), ctrl.mean(0)))
    mask = np.zeros(30, dtype=bool)
    mask[:10] = True
    assert r2_mean(pred, real, genes=mask) == pytest.approx(skm.r2_score(real.mean(0)[:10], pred.mean(0)[:10]))
    assert r2_mean(real, real) == 1.0
    const = np.ones((3, 4))
    assert r2_mean(const, const) == 1.0 and r2_mean(const * 2, const) == 0.0  # sklearn's force_finite


def test_pearson_delta_matches_scipy(cells):
    pred, real, ctrl = cells
    d_p, d_r = pred.mean(0) - ctrl.mean(0), real.mean(0) - ctrl.mean(0)
    assert pearson_delta(pred, real, ctrl) == pytest.approx(pearsonr(d_p, d_r)[0])


def test_pearson_delta_is_nan_for_a_prediction_without_shift(cells):
    _, real, ctrl = cells
    ctrl = ctrl.astype(np.float32)
    shuffled = ctrl[::-1].copy()  # the control cells in another order: the same mean up to float rounding
    assert np.abs(shuffled.mean(0) - ctrl.mean(0)).max() > 0  # rounding noise that corrcoef would correlate
    assert np.isnan(pearson_delta(shuffled, real, ctrl))
    small = ctrl + 1e-3 * (real.mean(0) - ctrl.mean(0))  # a small but real shift is still scored
    assert pearson_delta(small, real, ctrl) > 0.99


# ----------------------------------------------------------------------------- discrimination score


@pytest.fixture
def deltas():
    rng = np.random.default_rng(3)
    names = [f"G{i}" for i in range(12)]
    real = {f"G{i}": rng.normal(size=12) * (1 + i) for i in range(6)}
    return real, names


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_discrimination_perfect_and_swapped(deltas, metric):
    real, names = deltas
    perfect = discrimination_score(dict(real), real, metric=metric, gene_names=names)
    assert perfect == dict.fromkeys(real, 1.0)
    swapped = dict(real)
    swapped["G0"], swapped["G1"] = real["G1"], real["G0"]
    scores = discrimination_score(swapped, real, metric=metric)
    assert scores["G0"] < 1.0 and scores["G1"] < 1.0
    assert all(scores[p] == 1.0 for p in real if p not in ("G0", "G1"))


def _reference_pds(pred, real, metric, names=None):
    """Literal transcription of cell-eval's loop with scipy distances."""
    from scipy.spatial.distance import cdist

    perts = sorted(real)
    mat = np.vstack([real[p] for p in perts])
    out = {}
    for p in pred:
        keep = np.ones(mat.shape[1], bool) if names is None else np.asarray(names) != p
        d = cdist(mat[:, keep], pred[p][keep][None, :], metric={"l1": "cityblock", "l2": "euclidean"}[metric]).ravel()
        rank = int(np.flatnonzero(np.argsort(d, kind="stable") == perts.index(p))[0])
        out[p] = 1 - rank / len(perts)
    return out


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_discrimination_matches_reference_loop(deltas, metric):
    real, names = deltas
    rng = np.random.default_rng(4)
    pred = {p: v + rng.normal(scale=4.0, size=v.shape) for p, v in real.items()}
    assert discrimination_score(pred, real, metric=metric, gene_names=names) == pytest.approx(
        _reference_pds(pred, real, metric, names)
    )


def test_discrimination_handmade_ranks_and_target_gene_exclusion():
    genes = ["A", "B", "x"]
    real = {"A": np.array([5.0, 0.0, 0.0]), "B": np.array([0.0, 5.0, 0.0]), "C": np.array([0.0, 0.0, 5.0])}
    pred = {"A": np.array([0.0, 0.0, 4.0])}
    # all genes: d_A = 9, d_B = 9, d_C = 1 -> order C, A, B (tie kept in key order) -> rank 1 of 3
    assert discrimination_score(pred, real)["A"] == pytest.approx(1 - 1 / 3)
    # gene "A" dropped: d_A = 4, d_B = 9, d_C = 1 -> rank 1 of 3
    assert discrimination_score(pred, real, gene_names=genes)["A"] == pytest.approx(1 - 1 / 3)
    pred2 = {"A": np.array([100.0, 0.0, 0.0])}  # only the (excluded) target gene carries the signal
    assert discrimination_score(pred2, real)["A"] == 1.0
    # excluded: pred is all zeros -> every real vector at distance 5 except A (zero) -> A first
    assert discrimination_score(pred2, real, gene_names=genes)["A"] == 1.0
    pred3 = {"A": np.array([100.0, 6.0, 0.0])}
    assert discrimination_score(pred3, real)["A"] == 1.0  # target gene dominates
    assert discrimination_score(pred3, real, gene_names=genes)["A"] == pytest.approx(1 - 1 / 3)  # B is nearer
    with pytest.raises(KeyError):
        discrimination_score({"Z": np.zeros(3)}, real)
    # cosine: direction only; a zero vector has similarity 0 (distance 1) to everything
    real_c = {"A": np.array([1.0, 0.0, 0.0]), "B": np.array([0.0, 1.0, 0.0]), "Z": np.zeros(3)}
    pred_c = {"A": np.array([10.0, 1.0, 0.0]), "B": np.array([1.0, 10.0, 0.0]), "Z": np.array([1.0, 1.0, 0.0])}
    # Z: d_A = d_B = 1 - 1/sqrt(2) < d_Z = 1 -> rank 2 of 3
    assert discrimination_score(pred_c, real_c, metric="cosine") == pytest.approx({"A": 1.0, "B": 1.0, "Z": 1 / 3})
    with pytest.raises(ValueError):
        discrimination_score(pred, real, metric="l3")


# ----------------------------------------------------------------------------- DE metrics


def _de(feats, lfc, fdr):
    return pd.DataFrame({"feature": feats, "log2_fold_change": lfc, "fdr": fdr})


def test_overlap_precision_direction_handmade():
    feats = list("abcdefgh")
    #            a     b    c    d     e    f    g    h
    real = _de(feats, [5.0, -4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 9.0], [0.01, 0.01, 0.01, 0.01, 0.2, 0.3, 0.9, 0.06])
    # R sorted by |lfc|: a(5) b(4) c(3) d(2); |R| = 4
    pred = _de(feats, [1.0, 6.0, -0.5, 0.1, 7.0, 0.2, 0.0, 0.3], [0.02, 0.001, 0.04, 0.5, 0.01, 0.5, 1.0, 0.5])
    # P sorted by |lfc|: e(7) b(6) a(1) c(0.5); |P| = 4
    m = de_metrics(real, pred, k_values=(2, 10))
    assert m["n_sig_real"] == 4 and m["n_sig_pred"] == 4
    assert m["overlap_at_N"] == pytest.approx(3 / 4)  # {a,b,c,d} ∩ {e,b,a,c}
    assert m["overlap_at_2"] == pytest.approx(1 / 2)  # {a,b} ∩ {e,b}
    assert m["overlap_at_10"] == pytest.approx(3 / 4)  # k capped at |R|
    assert m["precision_at_N"] == pytest.approx(3 / 4)
    assert m["precision_at_2"] == pytest.approx(1 / 2)
    assert m["de_sig_genes_recall"] == pytest.approx(3 / 4)
    # directions over R: a +/+ ok, b -/+ no, c +/- no, d +/+ ok
    assert m["de_direction_match"] == pytest.approx(2 / 4)
    assert m["de_spearman_lfc_sig"] == pytest.approx(spearmanr([5, -4, 3, 2], [1, 6, -0.5, 0.1])[0])


def test_overlap_uses_abs_lfc_and_infinite_fold_changes_crowd_out():
    feats = [f"g{i}" for i in range(6)]
    real = _de(feats, [3.0, -2.5, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    pred = _de(feats, [3.0, -2.5, 2.0, np.inf, np.inf, -np.inf], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    m = de_metrics(real, pred)
    assert m["overlap_at_N"] == 0.0  # the three ±inf genes fill the top-3 of P
    assert m["precision_at_N"] == pytest.approx(3 / 6)
    assert m["de_sig_genes_recall"] == 1.0


def test_auc_matches_sklearn():
    rng = np.random.default_rng(5)
    n = 300
    feats = [f"g{i}" for i in range(n)]
    real_fdr = rng.uniform(size=n) ** 3
    pred_fdr = np.clip(real_fdr * rng.uniform(0.2, 5.0, size=n), 0, 1)
    pred_fdr[:20] = 0.0  # fdr 0 -> 1e-10
    pred_fdr[20:60] = 0.5  # ties
    m = de_metrics(_de(feats, rng.normal(size=n), real_fdr), _de(feats, rng.normal(size=n), pred_fdr))
    labels = real_fdr < 0.05
    scores = -np.log10(np.where(pred_fdr == 0, 1e-10, pred_fdr))
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    assert m["roc_auc"] == pytest.approx(skm.auc(fpr, tpr))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, scores))
    # hand definitions: ROC AUC = P(s_pos > s_neg) + P(tie) / 2; AP = sum_n (R_n - R_{n-1}) P_n
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    assert m["roc_auc"] == pytest.approx(np.mean((pos > neg) + 0.5 * (pos == neg)), rel=1e-12)
    thresholds = np.unique(scores)[::-1]
    tp = np.array([(labels & (scores >= t)).sum() for t in thresholds])
    called = np.array([(scores >= t).sum() for t in thresholds])
    ap = np.sum(np.diff(np.r_[0.0, tp / labels.sum()]) * tp / called)
    assert m["pr_auc"] == pytest.approx(ap, rel=1e-12)


def test_spearman_constant_or_single_gene_is_nan():
    feats = list("abcd")
    real = _de(feats, [1.0, 2.0, -3.0, 4.0], [0.01, 0.01, 0.01, 0.5])
    assert np.isnan(de_metrics(real, _de(feats, [1.0, 1.0, 1.0, 1.0], [0.01] * 4))["de_spearman_lfc_sig"])
    one = _de(feats, [1.0, 2.0, -3.0, 4.0], [0.01, 0.5, 0.5, 0.5])
    assert np.isnan(de_metrics(one, real)["de_spearman_lfc_sig"])
    # ±inf rank at the ends
    m = de_metrics(real, _de(feats, [0.5, np.inf, -np.inf, 0.0], [0.01] * 4))
    assert m["de_spearman_lfc_sig"] == pytest.approx(1.0)


def test_no_significant_genes_gives_nan_or_cell_eval_zero():
    feats = list("abcd")
    none_sig = _de(feats, [1.0, 2.0, 3.0, 4.0], [0.5, 0.6, 0.7, 0.8])
    some_sig = _de(feats, [1.0, 2.0, 3.0, 4.0], [0.01, 0.6, 0.01, 0.8])
    m = de_metrics(none_sig, some_sig)
    assert np.isnan(m["overlap_at_N"]) and np.isnan(m["overlap_at_50"]) and np.isnan(m["de_sig_genes_recall"])
    assert m["precision_at_N"] == 0.0  # defined: predicted DE genes, none real
    for key in ("de_direction_match", "de_spearman_lfc_sig", "roc_auc", "pr_auc"):
        assert np.isnan(m[key])
    m = de_metrics(some_sig, none_sig)
    assert m["overlap_at_N"] == 0.0 and np.isnan(m["precision_at_N"])
    m0 = de_metrics(none_sig, none_sig, no_sig_value=0.0)
    assert m0["overlap_at_N"] == 0.0 and m0["precision_at_N"] == 0.0


def test_missing_pred_genes_count_as_zero_and_index_features():
    real = pd.DataFrame({"log2_fold_change": [2.0, -1.0, 3.0], "fdr": [0.01, 0.01, 0.01]}, index=["a", "b", "c"])
    pred = pd.DataFrame({"log2_fold_change": [2.0, -1.0], "fdr": [0.01, 0.01]}, index=["a", "b"])
    m = de_metrics(real, pred)
    assert m["de_direction_match"] == pytest.approx(2 / 3)
    assert m["overlap_at_N"] == pytest.approx(2 / 3)  # R = c, a, b; P = a, b


def test_des_pitfall_thresholding_restores_overlap():
    """metrics.md 2.3 pitfall 2 on a small sparse example: dense noise floor -> spurious ±inf fold changes."""
    rng = np.random.default_rng(7)
    n_genes = 60
    rates = np.full(n_genes, 1.5)
    rates[30:] = 0.0  # genes never expressed in real data
    rates_p = rates.copy()
    rates_p[:8] *= 5.0
    ctrl = np.log1p(rng.poisson(rates, size=(150, n_genes)).astype(float))
    real = np.log1p(rng.poisson(rates_p, size=(150, n_genes)).astype(float))
    dense_pred = real + rng.uniform(0.0, 0.05, size=real.shape)  # a continuous model never outputs exact 0
    de_real = differential_expression(real, ctrl)
    de_dense = differential_expression(dense_pred, ctrl)
    thr = realistic_zero_threshold(real, quantile=0.01)
    de_thr = differential_expression(zero_small_values(dense_pred, thr), ctrl)
    des_dense = de_metrics(de_real, de_dense)["overlap_at_N"]
    des_thr = de_metrics(de_real, de_thr)["overlap_at_N"]
    assert des_dense < 0.2 and des_thr > 0.8
    assert pearson_delta(dense_pred, real, ctrl) > 0.9  # pearson_delta is blind to the problem


def test_baseline_normalized_score():
    assert baseline_normalized_score(0.6, 0.2, best=1) == pytest.approx(0.5)
    assert baseline_normalized_score(0.1, 0.2, best=1) == 0.0  # clipped
    assert baseline_normalized_score(0.01, 0.02, best=0) == pytest.approx(0.5)
    assert baseline_normalized_score(0.05, 0.02, best=0) == 0.0
    np.testing.assert_allclose(baseline_normalized_score([0.6, 1.0], [0.2, 0.2], best=1), [0.5, 1.0])
    assert np.isnan(baseline_normalized_score(0.5, 1.0, best=1))
