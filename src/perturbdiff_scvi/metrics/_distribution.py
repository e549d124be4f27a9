"""Distributional metrics between cell sets: E-distance, multi-scale RBF MMD, and the fixed PCA they use.

Both metrics depend on the space they are computed in (design note ``metrics.md`` section 2.3, pitfall 5):
fit one PCA on real *training* cells with :func:`fit_pca` (50 components), project real and generated cells
of every group with it, cap the cells per group, and report the number of cells used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse

from ._basic import _dense, energy_distance

__all__ = ["DEFAULT_MMD_GAMMAS", "PCAProjection", "e_distance", "fit_pca", "mmd_rbf"]

#: CellFlow's default RBF bandwidths for the multi-scale MMD.
DEFAULT_MMD_GAMMAS: tuple[float, ...] = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)


def e_distance(x, y) -> float:
    """E-distance (energy distance) between two cell sets, Euclidean, pertpy / scPerturb definition.

    ``E(X, Y) = 2 mean_ij ||x_i - y_j||_2 - mean_ij ||x_i - x_j||_2 - mean_ij ||y_i - y_j||_2``

    (V-statistics: the within-set means include the zero diagonal). This is pertpy's ``edistance`` and the
    distance inside cell-eval's ``pearson_edistance``; it is *not* CellFlow's ``e_distance``, which uses
    squared Euclidean distances. Same function as :func:`energy_distance`.

    Parameters
    ----------
    x, y
        Cells x features matrices (genes or PCs, typically :func:`fit_pca` projections), dense or sparse.

    Returns
    -------
    float
        ``>= 0`` up to rounding; 0 for identical sets.
    """
    return energy_distance(x, y)


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _kernel_means(a: np.ndarray, b: np.ndarray, gammas: np.ndarray, chunk: int) -> np.ndarray:
    """``mean_ij exp(-gamma ||a_i - b_j||^2)`` for every gamma, computed in row chunks."""
    b_sq = (b * b).sum(1)
    total = np.zeros(gammas.shape[0])
    for i in range(0, a.shape[0], chunk):
        d = _sq_dists(a[i : i + chunk], b, b_sq)
        for k, g in enumerate(gammas):
            total[k] += np.exp(-g * d).sum()
    return total / (a.shape[0] * b.shape[0])


def mmd_rbf(x, y, gammas: Sequence[float] = DEFAULT_MMD_GAMMAS, *, chunk: int = 1024) -> float:
    """Multi-scale RBF maximum mean discrepancy, CellFlow's ``compute_scalar_mmd``.

    For each bandwidth ``gamma`` with kernel ``k(a, b) = exp(-gamma ||a - b||_2^2)``, the biased
    (V-statistic) squared MMD

    ``MMD^2_gamma = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)``

    (diagonal terms included), then the mean over ``gammas`` (default ``{2, 1, 0.5, 0.1, 0.01, 0.005}``).
    The value depends on the scale of the space (compute it on a fixed PCA, :func:`fit_pca`), and the biased
    estimator is inflated for small sets: report the number of cells.

    Parameters
    ----------
    x, y
        Cells x features matrices, dense or sparse.
    gammas
        RBF bandwidths ``gamma`` (inverse squared length scales).
    chunk
        Rows per block when forming kernel matrices (memory bound ``chunk * n_cells``).

    Returns
    -------
    float
        ``>= 0`` up to rounding; 0 for identical sets.
    """
    x, y = _dense(x), _dense(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"Both sets need the same features; got {x.shape} and {y.shape}.")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("Both sets need at least one cell.")
    g = np.asarray(list(gammas), dtype=np.float64)
    if g.size == 0:
        raise ValueError("Need at least one gamma.")
    mmd = _kernel_means(x, x, g, chunk) + _kernel_means(y, y, g, chunk) - 2.0 * _kernel_means(x, y, g, chunk)
    return float(np.mean(mmd))


@dataclass(frozen=True)
class PCAProjection:
    """A PCA fitted once (on real training cells) and used to project every cell set.

    ``Z = (X - mean_) @ components_.T``. Call the object or :meth:`transform`.

    Attributes
    ----------
    mean_
        Per-gene mean of the training cells, shape ``(n_genes,)``.
    components_
        Orthonormal principal axes, shape ``(n_comps, n_genes)``; sign fixed so that the largest-magnitude
        loading of each axis is positive.
    explained_variance_
        Variance of the training cells along each axis (``s^2 / (n_cells - 1)``).
    """

    mean_: np.ndarray
    components_: np.ndarray
    explained_variance_: np.ndarray

    @property
    def n_comps(self) -> int:
        """Number of principal components."""
        return int(self.components_.shape[0])

    def transform(self, X) -> np.ndarray:
        """Project cells: ``(X - mean_) @ components_.T``, shape ``(n_cells, n_comps)``."""
        if sparse.issparse(X):
            z = np.asarray(X @ self.components_.T, dtype=np.float64)
            return z - (self.mean_ @ self.components_.T)[None, :]
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"Expected cells x {self.mean_.shape[0]} genes; got {x.shape}.")
        return (x - self.mean_) @ self.components_.T

    __call__ = transform


def _svd_flip(vt: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def fit_pca(
    real_train_X,
    n_comps: int = 50,
    seed: int = 0,
    *,
    svd_solver: Literal["auto", "full", "randomized"] = "auto",
    n_iter: int = 7,
) -> PCAProjection:
    """Fit a PCA on real training cells for the distributional metrics.

    Centers the genes (no scaling) and takes the top ``n_comps`` right singular vectors of the centered
    matrix ``X_c = X - mean(X)``: ``X_c = U S V^T``, ``components_ = V[:, :n_comps]^T``. Project any set with
    the returned :class:`PCAProjection`. Fitting on real training cells only (never on generated or
    held-out cells) keeps the space fixed across models, as recommended in ``metrics.md`` section 2.5.

    Parameters
    ----------
    real_train_X
        Cells x genes matrix of real training cells (dense or sparse; densified).
    n_comps
        Number of components, capped at ``min(n_cells, n_genes)``.
    seed
        Seed of the random sketch of the randomized solver (the full solver is deterministic).
    svd_solver
        ``"full"``: exact ``numpy.linalg.svd``. ``"randomized"``: Halko et al. randomized SVD with
        ``n_iter`` power iterations and 10 oversampling columns. ``"auto"`` (default): full when the matrix
        has at most 5e6 entries or ``n_comps`` exceeds 20 % of ``min(n_cells, n_genes)``, else randomized.
    n_iter
        Power iterations of the randomized solver.

    Returns
    -------
    PCAProjection
        Callable projection ``X -> (X - mean_) @ components_.T``.
    """
    x = _dense(real_train_X)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Need a cells x genes matrix with at least 2 cells; got shape {x.shape}.")
    n, p = x.shape
    k = int(min(n_comps, n, p))
    if k < 1:
        raise ValueError("n_comps must be >= 1.")
    mean = x.mean(0)
    xc = x - mean
    solver = svd_solver
    if solver == "auto":
        solver = "full" if (n * p <= 5_000_000 or k > 0.2 * min(n, p)) else "randomized"
    if solver == "full":
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        s, vt = s[:k], vt[:k]
    elif solver == "randomized":
        rng = np.random.default_rng(seed)
        n_rand = min(k + 10, n, p)
        q = xc @ rng.standard_normal((p, n_rand))
        for _ in range(n_iter):
            q, _ = np.linalg.qr(q)
            q, _ = np.linalg.qr(xc.T @ q)
            q = xc @ q
        q, _ = np.linalg.qr(q)
        _, s, vt = np.linalg.svd(q.T @ xc, full_matrices=False)
        s, vt = s[:k], vt[:k]
    else:
        raise ValueError(f"Unknown svd_solver {svd_solver!r}.")
    return PCAProjection(mean_=mean, components_=_svd_flip(vt), explained_variance_=s**2 / (n - 1))
