"""E-distance, RBF MMD, the fixed PCA and the zero-pattern helpers vs direct numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from scipy.spatial.distance import cdist
from sklearn import decomposition
from sklearn.metrics import pairwise

from perturbdiff_scvi.metrics import (
    DEFAULT_MMD_GAMMAS,
    PCAProjection,
    e_distance,
    energy_distance,
    fit_pca,
    mmd_rbf,
    realistic_zero_threshold,
    zero_small_values,
)


@pytest.fixture
def sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = rng.normal(loc=0.7, scale=1.3, size=(55, 5))
    return x, y


def test_e_distance_matches_cdist_formula(sets):
    x, y = sets
    ref = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert e_distance(x, y) == pytest.approx(ref, rel=1e-12)
    assert e_distance(x, y) == energy_distance(x, y)
    assert e_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert e_distance(sparse.csr_matrix(x), y) == pytest.approx(ref, rel=1e-12)


def test_energy_distance_chunks_and_validation(sets):
    x, y = sets
    ref = energy_distance(x, y)
    for chunk in (1, 7, 40, 10_000):
        assert energy_distance(x, y, chunk=chunk) == pytest.approx(ref, rel=1e-13)
    assert energy_distance(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)  # a set, order-free
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-13)
    for bad in (y[:, :3], y[:0], y[0]):
        with pytest.raises(ValueError):
            energy_distance(x, bad)
    with pytest.raises(ValueError):
        energy_distance(x, y, chunk=0)


def _mmd_ref(x, y, gammas):
    vals = []
    for g in gammas:
        kxx = np.exp(-g * cdist(x, x, "sqeuclidean")).mean()
        kyy = np.exp(-g * cdist(y, y, "sqeuclidean")).mean()
        kxy = np.exp(-g * cdist(x, y, "sqeuclidean")).mean()
        vals.append(kxx + kyy - 2 * kxy)
    return float(np.mean(vals))


def test_mmd_rbf_matches_direct_formula(sets):
    x, y = sets
    assert DEFAULT_MMD_GAMMAS == (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
    assert mmd_rbf(x, y) == pytest.approx(_mmd_ref(x, y, DEFAULT_MMD_GAMMAS), rel=1e-10)
    assert mmd_rbf(x, y, gammas=[0.3], chunk=7) == pytest.approx(_mmd_ref(x, y, [0.3]), rel=1e-10)
    assert mmd_rbf(x, y) > 0
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)  # a set, order-free
    with pytest.raises(ValueError):
        mmd_rbf(x, y[:, :3])


def test_mmd_rbf_matches_sklearn_rbf_kernel(sets):
    x, y = sets
    g = 0.5
    ref = (
        pairwise.rbf_kernel(x, x, g).mean()
        + pairwise.rbf_kernel(y, y, g).mean()
        - 2 * pairwise.rbf_kernel(x, y, g).mean()
    )
    assert mmd_rbf(x, y, gammas=[g]) == pytest.approx(ref, rel=1e-10)


def _low_rank_data(seed=0, n=120, p=40, rank=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, p)) * 2 + rng.normal(scale=0.1, size=(n, p)) + 3.0


def test_fit_pca_matches_svd_and_projects():
    x = _low_rank_data()
    pca = fit_pca(x, n_comps=5)
    assert isinstance(pca, PCAProjection) and pca.n_comps == 5
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    # same subspace and variances as an exact SVD, components orthonormal
    np.testing.assert_allclose(np.abs(pca.components_ @ vt[:5].T), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(pca.explained_variance_, s[:5] ** 2 / (len(x) - 1), rtol=1e-10)
    z = pca(x)
    assert z.shape == (len(x), 5)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.var(0, ddof=1), pca.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(pca.transform(sparse.csr_matrix(x)), z, atol=1e-10)
    assert fit_pca(x, n_comps=500).n_comps == 40  # capped


def test_fit_pca_matches_sklearn_up_to_sign():
    x = _low_rank_data(seed=1)
    ours = fit_pca(x, n_comps=4)(x)
    ref = decomposition.PCA(n_components=4, svd_solver="full").fit_transform(x)
    signs = np.sign((ours * ref).sum(0))
    np.testing.assert_allclose(ours, ref * signs, atol=1e-8)


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_fit_pca_sign_convention_is_deterministic(solver):
    x = _low_rank_data(seed=3, n=150, p=30)
    pca = fit_pca(x, n_comps=5, svd_solver=solver)
    top = pca.components_[np.arange(5), np.argmax(np.abs(pca.components_), axis=1)]
    assert (top > 0).all()  # the largest-magnitude loading of every axis is positive
    np.testing.assert_allclose(pca.components_ @ pca.components_.T, np.eye(5), atol=1e-10)
    np.testing.assert_array_equal(fit_pca(x, n_comps=5, svd_solver=solver).components_, pca.components_)
    with pytest.raises(ValueError):
        fit_pca(x, svd_solver="arpack")


def test_fit_pca_randomized_is_seeded_and_accurate():
    x = _low_rank_data(seed=2, n=300, p=80)
    full = fit_pca(x, n_comps=6, svd_solver="full")
    r1 = fit_pca(x, n_comps=6, seed=0, svd_solver="randomized")
    r2 = fit_pca(x, n_comps=6, seed=0, svd_solver="randomized")
    np.testing.assert_array_equal(r1.components_, r2.components_)
    np.testing.assert_allclose(r1.explained_variance_, full.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs((r1.components_ * full.components_).sum(1)), 1.0, atol=1e-6)
    # distances computed in the fitted space are those of the projected sets
    a, b = x[:100], x[100:] + 0.5
    assert e_distance(full(a), full(b)) == pytest.approx(e_distance(r1(a), r1(b)), rel=1e-4)


def test_zero_small_values_dense_and_sparse():
    x = np.array([[0.0, 0.1, 0.5], [0.29, 0.3, -0.2]], dtype=np.float32)
    out = zero_small_values(x, 0.3)
    np.testing.assert_array_equal(out, np.array([[0.0, 0.0, 0.5], [0.0, 0.3, 0.0]], dtype=np.float32))
    assert out.dtype == np.float32 and x[0, 1] == np.float32(0.1)  # input untouched
    sp = zero_small_values(sparse.csr_matrix(x), 0.3)
    assert sparse.issparse(sp) and sp.nnz == 2
    np.testing.assert_array_equal(sp.toarray(), out)


def test_realistic_zero_threshold_is_low_quantile_of_nonzeros():
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(0.7, size=(200, 30)).astype(float) * rng.uniform(0.5, 2.0, size=(200, 1)))
    nz = x[x > 0]
    assert realistic_zero_threshold(x) == pytest.approx(np.quantile(nz, 0.01))
    assert realistic_zero_threshold(x, quantile=0.2) == pytest.approx(np.quantile(nz, 0.2))
    assert realistic_zero_threshold(sparse.csr_matrix(x)) == pytest.approx(np.quantile(nz, 0.01))
    assert realistic_zero_threshold(np.zeros((3, 3))) == 0.0
    # the real data lose only ~1 % of their non-zero entries
    kept = np.count_nonzero(zero_small_values(x, realistic_zero_threshold(x)))
    assert kept >= 0.98 * nz.size
    with pytest.raises(ValueError):
        realistic_zero_threshold(x, quantile=1.5)
