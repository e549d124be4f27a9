"""Distributional metrics between cell sets: energy distance (E-distance), multi-scale RBF MMD, and their PCA.

Both metrics depend on the space they are computed in (design note ``metrics.md`` section 2.3, pitfall 5):
fit one PCA on real *training* cells with :func:`fit_pca` (50 components), project real and generated cells
of every group with it, cap the cells per group, and report the number of cells used.

Both metrics are built on one pairwise squared-distance helper, ``scipy.spatial.distance.cdist(a, b,
"sqeuclidean")`` evaluated in row blocks; the PCA is ``sklearn.decomposition.PCA``. The training loss has
its own torch counterpart, :func:`perturbdiff_scvi.module.energy_distance`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from sklearn.utils.extmath import svd_flip

from ._arrays import _dense

__all__ = ["DEFAULT_MMD_GAMMAS", "PCAProjection", "e_distance", "energy_distance", "fit_pca", "mmd_rbf"]

#: CellFlow's default RBF bandwidths for the multi-scale MMD.
DEFAULT_MMD_GAMMAS: tuple[float, ...] = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)


# --------------------------------------------------------------------------- pairwise distances


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``D_ij = ||a_i - b_j||^2``, shape ``(len(a), len(b))``.

    ``scipy.spatial.distance.cdist(a, b, "sqeuclidean")``: each entry is summed over the coordinate
    differences, so it is exact (no ``|a|^2 + |b|^2 - 2 a.b`` cancellation) and exactly 0 for equal rows.
    """
    return cdist(a, b, "sqeuclidean")


def _sq_dist_blocks(a: np.ndarray, b: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """:func:`_sq_dists` of ``a[i : i + chunk]`` against ``b``, block by block (memory ``chunk * len(b)``)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    for i in range(0, a.shape[0], chunk):
        yield _sq_dists(a[i : i + chunk], b)


def _cell_sets(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Densify two cells x features sets and check that they are comparable."""
    x, y = _dense(x), _dense(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"Both sets need the same features; got {x.shape} and {y.shape}.")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("Both sets need at least one cell.")
    return x, y


# --------------------------------------------------------------------------- energy distance


def _mean_distance(a: np.ndarray, b: np.ndarray, chunk: int) -> float:
    """``mean_ij ||a_i - b_j||_2`` over all pairs (including ``i = j`` when ``a is b``)."""
    total = sum(np.sqrt(d).sum() for d in _sq_dist_blocks(a, b, chunk))
    return float(total) / (a.shape[0] * b.shape[0])


def energy_distance(x, y, *, chunk: int = 2048) -> float:
    """Energy distance (E-distance) between two cell sets, Euclidean, V-statistic.

    ``E(X, Y) = 2 mean_ij ||x_i - y_j||_2 - mean_ij ||x_i - x_j||_2 - mean_ij ||y_i - y_j||_2``

    over all pairs (V-statistics: the within-set means include the zero diagonal). This is the E-distance
    of pertpy / scPerturb (Peidli et al. 2024), pertpy's ``edistance``, and the distance inside cell-eval's
    ``pearson_edistance``, on whatever space is passed in (genes or PCs). It is *not* CellFlow's
    ``e_distance``, which uses squared Euclidean distances. PerturbDiff's training loss uses half of it
    (torch version: :func:`perturbdiff_scvi.module.energy_distance`). :func:`e_distance` is an alias.

    Parameters
    ----------
    x, y
        Cells x features matrices (genes or PCs, typically :func:`fit_pca` projections), dense or sparse.
    chunk
        Rows per block of the distance matrices (memory bound ``chunk * n_cells``); does not change the
        value beyond rounding.

    Returns
    -------
    float
        ``>= 0`` up to rounding; 0 for identical sets.

    Raises
    ------
    ValueError
        If the sets have different features or one of them has no cell.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import energy_distance
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 10))
    >>> energy_distance(x, x)
    0.0
    >>> energy_distance(x, x + 1.0) > energy_distance(x, x + 0.1) > 0
    True
    """
    x, y = _cell_sets(x, y)
    return 2 * _mean_distance(x, y, chunk) - _mean_distance(x, x, chunk) - _mean_distance(y, y, chunk)


def e_distance(x, y) -> float:
    """E-distance between two cell sets: an alias of :func:`energy_distance` (pertpy's / scPerturb's name).

    Same function, same convention (Euclidean, V-statistic) and same value:
    ``E(X, Y) = 2 mean_ij ||x_i - y_j||_2 - mean_ij ||x_i - x_j||_2 - mean_ij ||y_i - y_j||_2``.
    :func:`perturbdiff_scvi.tl.evaluate` reports it under this name, on a :func:`fit_pca` projection.

    Parameters
    ----------
    x, y
        Cells x features matrices, dense or sparse.

    Returns
    -------
    float
        ``energy_distance(x, y)``.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import e_distance, energy_distance
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(50, 5)), rng.normal(loc=0.5, size=(60, 5))
    >>> e_distance(x, y) == energy_distance(x, y)
    True
    """
    return energy_distance(x, y)


# --------------------------------------------------------------------------- RBF MMD


def _kernel_means(a: np.ndarray, b: np.ndarray, gammas: np.ndarray, chunk: int) -> np.ndarray:
    """``mean_ij exp(-gamma ||a_i - b_j||^2)`` for every gamma, computed in row chunks."""
    total = np.zeros(gammas.shape[0])
    for d in _sq_dist_blocks(a, b, chunk):
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

    Raises
    ------
    ValueError
        If the sets have different features, one of them has no cell, or ``gammas`` is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import mmd_rbf
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 10))
    >>> mmd_rbf(x, x)
    0.0
    >>> mmd_rbf(x, x + 1.0) > mmd_rbf(x, x + 0.1) > 0
    True
    """
    x, y = _cell_sets(x, y)
    g = np.asarray(list(gammas), dtype=np.float64)
    if g.size == 0:
        raise ValueError("Need at least one gamma.")
    mmd = _kernel_means(x, x, g, chunk) + _kernel_means(y, y, g, chunk) - 2.0 * _kernel_means(x, y, g, chunk)
    return float(np.mean(mmd))


# --------------------------------------------------------------------------- fixed PCA


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

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import fit_pca
    >>> x = np.random.default_rng(0).normal(size=(200, 30))
    >>> pca = fit_pca(x, n_comps=5)
    >>> pca.n_comps, pca(x).shape
    (5, (200, 5))
    """

    mean_: np.ndarray
    components_: np.ndarray
    explained_variance_: np.ndarray

    @property
    def n_comps(self) -> int:
        """Number of principal components."""
        return int(self.components_.shape[0])

    def transform(self, X) -> np.ndarray:
        """Project cells: ``(X - mean_) @ components_.T``, shape ``(n_cells, n_comps)``.

        Sparse ``X`` is projected without densifying it.
        """
        if sparse.issparse(X):
            z = np.asarray(X @ self.components_.T, dtype=np.float64)
            return z - (self.mean_ @ self.components_.T)[None, :]
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"Expected cells x {self.mean_.shape[0]} genes; got {x.shape}.")
        return (x - self.mean_) @ self.components_.T

    __call__ = transform


def _resolve_solver(svd_solver: str, n: int, p: int, k: int) -> str:
    """Our ``"auto"`` rule (not sklearn's): full when small or ``k`` is a large share of the rank."""
    if svd_solver == "auto":
        return "full" if (n * p <= 5_000_000 or k > 0.2 * min(n, p)) else "randomized"
    if svd_solver in ("full", "randomized"):
        return svd_solver
    raise ValueError(f"Unknown svd_solver {svd_solver!r}; use 'auto', 'full' or 'randomized'.")


def fit_pca(
    real_train_X,
    n_comps: int = 50,
    seed: int = 0,
    *,
    svd_solver: Literal["auto", "full", "randomized"] = "auto",
    n_iter: int = 7,
) -> PCAProjection:
    """Fit a PCA on real training cells for the distributional metrics (``sklearn.decomposition.PCA``).

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
        ``random_state`` of the randomized solver (the full solver is deterministic).
    svd_solver
        Passed to ``sklearn.decomposition.PCA``. ``"full"``: exact LAPACK SVD (``svd_solver="full"``).
        ``"randomized"``: Halko et al. randomized SVD (``svd_solver="randomized"``, ``iterated_power=n_iter``,
        10 oversampling columns, QR normalisation of the power iterations). ``"auto"`` (default; this
        package's rule, not sklearn's ``"auto"``): full when the matrix has at most 5e6 entries or
        ``n_comps`` exceeds 20 % of ``min(n_cells, n_genes)``, else randomized.
    n_iter
        Power iterations of the randomized solver.

    Returns
    -------
    PCAProjection
        Callable projection ``X -> (X - mean_) @ components_.T``; each axis is signed so that its
        largest-magnitude loading is positive (``sklearn.utils.extmath.svd_flip(u_based_decision=False)``),
        whatever the solver and sklearn version.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import e_distance, fit_pca
    >>> rng = np.random.default_rng(0)
    >>> train = rng.normal(size=(300, 40))
    >>> pca = fit_pca(train, n_comps=10)
    >>> pca.components_.shape
    (10, 40)
    >>> d = e_distance(pca(train[:100]), pca(train[100:] + 0.5))
    """
    x = _dense(real_train_X)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Need a cells x genes matrix with at least 2 cells; got shape {x.shape}.")
    n, p = x.shape
    k = int(min(n_comps, n, p))
    if k < 1:
        raise ValueError("n_comps must be >= 1.")
    solver = _resolve_solver(svd_solver, n, p, k)
    kwargs = {}
    if solver == "randomized":
        kwargs = {"iterated_power": n_iter, "n_oversamples": 10, "power_iteration_normalizer": "QR"}
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed, **kwargs).fit(x)
    _, components = svd_flip(None, np.array(pca.components_, dtype=np.float64), u_based_decision=False)
    return PCAProjection(
        mean_=np.asarray(pca.mean_, dtype=np.float64),
        components_=components,
        explained_variance_=np.asarray(pca.explained_variance_, dtype=np.float64),
    )
