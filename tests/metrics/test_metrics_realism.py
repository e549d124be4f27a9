"""Realism metrics (C2ST, kNN mixing, spread ratio, detected genes, out-of-range values) on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from perturbdiff_scvi.metrics import (
    c2st_auroc,
    c2st_ceiling,
    detected_genes,
    fit_pca,
    knn_mixing,
    knn_mixing_ceiling,
    max_over_training,
    out_of_range_fraction,
    spread_ratio,
)


def _gauss(n: int, seed: int, n_genes: int = 20, loc: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=loc, size=(n, n_genes))


# --------------------------------------------------------------------------- C2ST


def test_c2st_identical_distributions_is_about_half():
    real, pred = _gauss(500, 0), _gauss(500, 1)
    assert 0.42 <= c2st_auroc(pred, real, n_estimators=50) <= 0.58


def test_c2st_shifted_distributions_are_separable():
    real, pred = _gauss(300, 0), _gauss(300, 1, loc=1.0)
    assert c2st_auroc(pred, real, n_estimators=30) >= 0.95
    assert c2st_auroc(pred, real, classifier="logistic") >= 0.95
    # a given PCA (fitted on independent "training" cells) and sparse input give the same kind of answer
    pca = fit_pca(_gauss(300, 2), n_comps=10)
    assert c2st_auroc(sparse.csr_matrix(pred), real, pca=pca, n_estimators=30) >= 0.95


def test_c2st_is_deterministic_and_accepts_an_estimator():
    real, pred = _gauss(200, 0), _gauss(200, 1, loc=0.3)
    a = c2st_auroc(pred, real, n_estimators=20, seed=3)
    assert a == c2st_auroc(pred, real, n_estimators=20, seed=3)
    assert 0.5 < c2st_auroc(pred, real, classifier=LogisticRegression(max_iter=500)) <= 1.0


def test_c2st_balances_and_caps_the_sets():
    # 50 predicted cells far away vs 400 real ones: balancing to 50 vs 50 still separates perfectly
    real, pred = _gauss(400, 0), _gauss(50, 1, loc=5.0)
    assert c2st_auroc(pred, real, n_estimators=20, max_cells=30) == 1.0


def test_c2st_ceiling_is_about_half():
    assert 0.4 <= c2st_ceiling(_gauss(600, 0), n_estimators=30) <= 0.6


def test_c2st_input_errors():
    real = _gauss(50, 0)
    with pytest.raises(ValueError, match="same genes"):
        c2st_auroc(real[:, :10], real)
    with pytest.raises(ValueError, match="no cell"):
        c2st_auroc(real[:0], real)
    with pytest.raises(ValueError, match="n_folds"):
        c2st_auroc(real, real, n_folds=1)
    with pytest.raises(ValueError, match="n_folds=5 needs at least 5 cells"):
        c2st_auroc(real[:3], real)
    with pytest.raises(ValueError, match="Unknown classifier"):
        c2st_auroc(real, real, classifier="svm")
    with pytest.raises(ValueError, match="fitted on 10 genes"):
        c2st_auroc(real, real, pca=fit_pca(real[:, :10], n_comps=3))
    with pytest.raises(ValueError, match="max_cells"):
        c2st_auroc(real, real, max_cells=0)
    with pytest.raises(ValueError, match="at least 2 cells"):
        c2st_ceiling(real[:1])


# --------------------------------------------------------------------------- kNN mixing


def test_knn_mixing_identical_and_separate_sets():
    real = _gauss(300, 0)
    assert 0.85 <= knn_mixing(_gauss(300, 1), real) <= 1.15
    assert knn_mixing(_gauss(300, 1, loc=10.0), real) == 0.0
    assert 0.85 <= knn_mixing_ceiling(_gauss(400, 2)) <= 1.15


def test_knn_mixing_matches_a_direct_count():
    # 2 predicted points next to 1 real point, 2 real points far away; k = 1 on the raw coordinates
    pred = np.array([[0.0, 0.0], [0.0, 0.1]])
    real = np.array([[0.0, 0.3], [9.0, 9.0]])
    pca = fit_pca(np.vstack([pred, real]), n_comps=2)
    # nearest other point: pred 0 -> pred 1, pred 1 -> pred 0: no real neighbour
    assert knn_mixing(pred, real, pca=pca, k=1) == 0.0
    # k = 2: pred 0 -> {pred 1, real 0}, pred 1 -> {pred 0, real 0}: share 1/2, expected 2/3
    assert knn_mixing(pred, real, pca=pca, k=2) == pytest.approx(0.5 / (2 / 3))


def test_knn_mixing_excludes_duplicated_self():
    # every predicted cell identical: the cell itself may not come first among tied neighbours
    real = _gauss(40, 0, n_genes=5)
    pred = np.repeat(real[:1] + 50.0, 40, axis=0)
    assert knn_mixing(pred, real, k=5) == 0.0


def test_knn_mixing_input_errors():
    real = _gauss(10, 0)
    with pytest.raises(ValueError, match="k=20 is too large"):
        knn_mixing(real, real, k=20)
    with pytest.raises(ValueError, match="k must be"):
        knn_mixing(real, real, k=0)
    with pytest.raises(ValueError, match="same genes"):
        knn_mixing(real, real[:, :5])
    with pytest.raises(ValueError, match="no cell"):
        knn_mixing(real, real[:0])


# --------------------------------------------------------------------------- spread ratio


def test_spread_ratio_scaled_and_fresh_sets():
    real = _gauss(500, 0)
    pca = fit_pca(_gauss(500, 5), n_comps=10)
    wide = real.mean(0) + 2.0 * (real - real.mean(0))
    np.testing.assert_allclose(spread_ratio(wide, real, pca=pca), 2.0, rtol=1e-12)
    np.testing.assert_allclose(spread_ratio(wide, real), 2.0, rtol=1e-12)  # pooled PCA, same axes
    fresh = spread_ratio(_gauss(500, 1), real, pca=pca)
    assert fresh.shape == (10,)
    assert np.all((fresh > 0.85) & (fresh < 1.15))
    collapsed = spread_ratio(np.repeat(real.mean(0, keepdims=True), 5, axis=0), real, pca=pca, n_pcs=3)
    np.testing.assert_allclose(collapsed, 0.0, atol=1e-12)
    assert spread_ratio(real, real, pca=pca, n_pcs=50).shape == (10,)  # capped at the PCA's components


def test_spread_ratio_input_errors():
    real = _gauss(20, 0)
    with pytest.raises(ValueError, match="at least 2 cells"):
        spread_ratio(real[:1], real)
    with pytest.raises(ValueError, match="same genes"):
        spread_ratio(real, real[:, :3])
    with pytest.raises(ValueError, match="n_pcs"):
        spread_ratio(real, real, n_pcs=0)


# --------------------------------------------------------------------------- detected genes


def test_detected_genes_dense_and_sparse():
    x = np.array([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(detected_genes(x), [2, 1, 0])
    np.testing.assert_array_equal(detected_genes(x, threshold=0.7), [2, 0, 0])
    np.testing.assert_array_equal(detected_genes(x, threshold=-1.0), [4, 4, 4])
    rows, cols = np.nonzero(x)
    # with an explicit stored zero at (2, 0), which is not detected
    s = sparse.csr_matrix((np.r_[x[rows, cols], 0.0], (np.r_[rows, 2], np.r_[cols, 0])), shape=x.shape)
    assert s.nnz == 4
    for thr in (0.0, 0.7, -1.0):
        np.testing.assert_array_equal(detected_genes(s, threshold=thr), detected_genes(x, threshold=thr))
    assert detected_genes(s).dtype == np.int64
    with pytest.raises(ValueError, match="cells x genes"):
        detected_genes(np.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        detected_genes(x, threshold=np.nan)


# --------------------------------------------------------------------------- out of range


def test_out_of_range_fraction_hand_built():
    reference = np.array([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0]])  # ranges [0, 2], [1, 3], [0, 0]
    pred = np.array([[2.5, 2.0, 0.0], [1.0, 0.5, 0.1], [0.0, 3.0, 0.0], [-0.1, 1.0, np.nan]])
    # out: 2.5 (> 2), 0.5 (< 1), 0.1 (> 0), -0.1 (< 0), nan -> 5 of 12
    assert out_of_range_fraction(pred, reference) == pytest.approx(5 / 12)
    # factor 1.5: gene 0 up to 3 (2.5 in), gene 2 still [0, 0] -> 4 of 12
    assert out_of_range_fraction(pred, reference, factor=1.5) == pytest.approx(4 / 12)
    assert out_of_range_fraction(reference, reference) == 0.0


def test_out_of_range_fraction_sparse_matches_dense():
    rng = np.random.default_rng(0)
    reference = np.clip(rng.normal(1.0, 1.0, (50, 8)), 0, None)
    reference[:, 3] = rng.uniform(0.5, 1.0, 50)  # a gene never zero: implicit zeros are out of range
    pred = np.clip(rng.normal(1.2, 1.5, (40, 8)), 0, None)
    dense = out_of_range_fraction(pred, reference, factor=1.1)
    assert 0 < dense < 1
    for p, r in ((sparse.csr_matrix(pred), reference), (pred, sparse.csr_matrix(reference))):
        assert out_of_range_fraction(p, r, factor=1.1) == pytest.approx(dense)
    assert out_of_range_fraction(sparse.csc_matrix(pred), sparse.csr_matrix(reference), factor=1.1) == pytest.approx(
        dense
    )


def test_max_over_training():
    reference = np.array([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0]])  # maxima 2, 3, 0
    assert max_over_training(np.array([[3.0, 1.5, 5.0]]), reference) == pytest.approx(1.5)
    assert max_over_training(sparse.csr_matrix([[1.0, 6.0, 0.0]]), sparse.csr_matrix(reference)) == pytest.approx(2.0)
    assert np.isnan(max_over_training(np.ones((2, 2)), np.zeros((3, 2))))


def test_out_of_range_input_errors():
    reference = np.ones((4, 3))
    with pytest.raises(ValueError, match="same genes"):
        out_of_range_fraction(np.ones((2, 2)), reference)
    with pytest.raises(ValueError, match="no cell"):
        out_of_range_fraction(np.ones((0, 3)), reference)
    with pytest.raises(ValueError, match="factor"):
        out_of_range_fraction(reference, reference, factor=0.0)
    with pytest.raises(ValueError, match="same genes"):
        max_over_training(np.ones((2, 2)), reference)
    with pytest.raises(ValueError, match="no cell"):
        max_over_training(reference, np.ones((0, 3)))
