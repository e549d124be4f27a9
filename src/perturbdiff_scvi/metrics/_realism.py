"""Realism of predicted populations: can a predicted cell set pass for a sample of real cells?

Mean-level metrics (``mae``, ``pearson_delta``) and even the E-distance can be good for a population that is
not a plausible set of cells: every cell at the mean (the cell-mean baseline), a cloud that is too narrow or too
wide, dense continuous values where real data are sparse, or values beyond anything seen in training. These
metrics look at the predicted cells as a *distribution*:

- :func:`c2st_auroc` (and its data ceiling :func:`c2st_ceiling`): classifier two-sample test, ROC-AUC of a
  classifier telling predicted from real cells; 0.5 = indistinguishable, 1 = perfectly separable;
- :func:`knn_mixing` (and :func:`knn_mixing_ceiling`): how often the nearest neighbours of predicted cells are
  real, relative to perfect mixing; 1 = mixed, 0 = separate;
- :func:`spread_ratio`: per principal component, the spread of predicted cells over that of real cells;
- :func:`detected_genes`: genes detected per cell (compare its mean between predicted and real cells);
- :func:`out_of_range_fraction` and :func:`max_over_training`: predicted values beyond the per-gene range
  of the training data.

The embedding-based metrics work on a PCA (``pca=``, a :class:`~perturbdiff_scvi.metrics.PCAProjection`
fitted with :func:`~perturbdiff_scvi.metrics.fit_pca` on real *training* cells). Without it a PCA is fitted on
the pooled predicted and real cells scored, never on ``real`` alone: a PCA fitted on one sample follows its
noise, and a fresh sample of the same distribution then looks different from it (e.g. a C2ST of about 0.65
instead of 0.5 for 200 vs 200 Gaussian cells in 20 dimensions). The classifier is scikit-learn's, the
neighbours ``sklearn.neighbors.NearestNeighbors``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ._distribution import PCAProjection, fit_pca

__all__ = [
    "c2st_auroc",
    "c2st_ceiling",
    "detected_genes",
    "knn_mixing",
    "knn_mixing_ceiling",
    "max_over_training",
    "out_of_range_fraction",
    "spread_ratio",
]


# --------------------------------------------------------------------------- input checks and shared steps


def _matrix(x, name: str):
    """``x`` as a CSR float64 matrix (sparse input) or a dense float64 array, checked to be 2-D and non-empty."""
    if sparse.issparse(x):
        x = sparse.csr_matrix(x, dtype=np.float64)
    else:
        x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a cells x genes matrix; got shape {x.shape}.")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` has no cell.")
    if x.shape[1] == 0:
        raise ValueError(f"`{name}` has no gene.")
    return x


def _pair(pred, real, names: tuple[str, str] = ("pred", "real")):
    """Check two cells x genes matrices with the same genes."""
    a, b = _matrix(pred, names[0]), _matrix(real, names[1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` need the same genes; got {a.shape[1]} and {b.shape[1]} columns."
        )
    return a, b


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _stack(a, b):
    return sparse.vstack([a, b], format="csr") if sparse.issparse(a) or sparse.issparse(b) else np.vstack([a, b])


def _resolve_pca(pca: PCAProjection | None, pred, real, n_pcs: int, seed: int) -> PCAProjection:
    """The given PCA (checked), or one with ``n_pcs`` components fitted on the pooled ``pred`` and ``real``.

    The fallback pools both sets on purpose: a PCA fitted on ``real`` alone is fitted to that sample's own
    noise (its variance along the top components is inflated, along the last ones deflated, more so with many
    genes), so a fresh sample of the same distribution would look different from it in that space. Pooling
    treats both sets alike, which keeps ~0.5 / ~1 the value of two samples of one distribution.
    """
    n_pcs = _check_int(n_pcs, "n_pcs", 1)
    if pca is None:
        return fit_pca(_stack(pred, real), n_comps=n_pcs, seed=seed)
    if not isinstance(pca, PCAProjection):
        raise TypeError(f"pca must be a PCAProjection (metrics.fit_pca) or None; got {type(pca).__name__}.")
    if pca.mean_.shape[0] != real.shape[1]:
        raise ValueError(f"`pca` was fitted on {pca.mean_.shape[0]} genes; the cells have {real.shape[1]}.")
    return pca


def _project(pca: PCAProjection, x, n_pcs: int) -> np.ndarray:
    """Coordinates of ``x`` on the first ``min(n_pcs, pca.n_comps)`` components."""
    return np.asarray(pca(x), dtype=np.float64)[:, : min(n_pcs, pca.n_comps)]


def _balanced(pred, real, max_cells: int | None, rng: np.random.Generator):
    """Subsample both sets to ``n = min(len(pred), len(real), max_cells)`` cells each, without replacement."""
    if max_cells is not None:
        max_cells = _check_int(max_cells, "max_cells", 1)
    n = min(pred.shape[0], real.shape[0], max_cells if max_cells is not None else np.inf)
    n = int(n)
    a = np.sort(rng.choice(pred.shape[0], n, replace=False))
    b = np.sort(rng.choice(real.shape[0], n, replace=False))
    return pred[a], real[b]


def _halves(real, seed: int):
    """Two disjoint random halves of ``real`` (sizes ``floor(n / 2)`` and ``ceil(n / 2)``)."""
    order = np.random.default_rng(seed).permutation(real.shape[0])
    half = real.shape[0] // 2
    return real[np.sort(order[:half])], real[np.sort(order[half:])]


def _classifier(classifier, n_estimators: int, seed: int):
    if isinstance(classifier, BaseEstimator):
        return clone(classifier)
    if classifier == "random_forest":
        n_estimators = _check_int(n_estimators, "n_estimators", 1)
        return RandomForestClassifier(n_estimators=n_estimators, n_jobs=1, random_state=seed)
    if classifier == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    raise ValueError(
        f"Unknown classifier {classifier!r}; use 'random_forest', 'logistic' or a scikit-learn classifier with "
        "predict_proba."
    )


# --------------------------------------------------------------------------- classifier two-sample test


def c2st_auroc(
    pred,
    real,
    *,
    pca: PCAProjection | None = None,
    n_pcs: int = 30,
    n_folds: int = 5,
    classifier: Literal["random_forest", "logistic"] | BaseEstimator = "random_forest",
    n_estimators: int = 100,
    max_cells: int | None = 2000,
    seed: int = 0,
) -> float:
    """Classifier two-sample test (C2ST): ROC-AUC of a classifier telling predicted from real cells.

    Both sets are subsampled to the same size ``n = min(n_pred, n_real, max_cells)`` (without replacement),
    projected on the first ``n_pcs`` principal components and labelled ``y = 1`` (predicted) / ``y = 0``
    (real). A stratified ``n_folds``-fold split (``StratifiedKFold(shuffle=True, random_state=seed)``) gives
    every cell an out-of-fold probability ``p_i = P(y_i = 1 | z_i)`` from a classifier trained on the other
    folds, and

    ``C2ST = AUROC({(y_i, p_i)}) = P(p_i > p_j | y_i = 1, y_j = 0)`` (ties count 1/2)

    over all ``2 n`` out-of-fold predictions (``sklearn.metrics.roc_auc_score``). 0.5 means the classifier
    cannot tell the sets apart (the best value; a finite sample of real cells scores about 0.5, see
    :func:`c2st_ceiling`), 1 means perfectly separable. Values somewhat below 0.5 are chance. Because the
    best value is 0.5, not 0 or 1, :func:`perturbdiff_scvi.tl.evaluate` gives it no normalised score.

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse) of predicted and real cells, same genes.
    pca
        A :class:`~perturbdiff_scvi.metrics.PCAProjection` fitted on real *training* cells
        (:func:`~perturbdiff_scvi.metrics.fit_pca`); its first ``n_pcs`` components are used. ``None``: a PCA
        with ``n_pcs`` components is fitted on the pooled balanced sets (not on ``real`` alone, which would
        make a fresh sample of ``real``'s distribution separable, see the module docstring).
    n_pcs
        Principal components used as classifier features (capped at the components available).
    n_folds
        Folds of the stratified cross-validation, ``>= 2`` and at most ``n``.
    classifier
        ``"random_forest"`` (default: ``RandomForestClassifier(n_estimators, n_jobs=1, random_state=seed)``),
        ``"logistic"`` (standardised features, ``LogisticRegression(max_iter=1000)``), or any scikit-learn
        classifier with ``predict_proba`` (cloned, unfitted).
    n_estimators
        Trees of the random forest (lower it for quick tests).
    max_cells
        Cap on cells per set (``None``: no cap).
    seed
        Seed of the subsampling, the folds and the classifier.

    Returns
    -------
    float
        The out-of-fold ROC-AUC, in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the sets have different genes, a set is empty, ``n_folds < 2`` or exceeds the balanced set size,
        or the classifier is unknown.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import c2st_auroc
    >>> rng = np.random.default_rng(0)
    >>> real = rng.normal(size=(200, 20))
    >>> c2st_auroc(real + 3.0, real, n_estimators=20) > 0.95
    True
    >>> 0.35 < c2st_auroc(rng.normal(size=(200, 20)), real, n_estimators=20) < 0.65
    True
    """
    pred, real = _pair(pred, real)
    n_folds = _check_int(n_folds, "n_folds", 2)
    clf = _classifier(classifier, n_estimators, seed)
    a, b = _balanced(pred, real, max_cells, np.random.default_rng(seed))
    if a.shape[0] < n_folds:
        raise ValueError(
            f"n_folds={n_folds} needs at least {n_folds} cells per set; the balanced sets have {a.shape[0]}."
        )
    projection = _resolve_pca(pca, a, b, n_pcs, seed)
    z = np.vstack([_project(projection, a, n_pcs), _project(projection, b, n_pcs)])
    y = np.r_[np.ones(a.shape[0], dtype=np.int64), np.zeros(b.shape[0], dtype=np.int64)]
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, z, y, cv=folds, method="predict_proba")
    return float(roc_auc_score(y, proba[:, 1]))


def c2st_ceiling(
    real,
    *,
    pca: PCAProjection | None = None,
    n_pcs: int = 30,
    n_folds: int = 5,
    classifier: Literal["random_forest", "logistic"] | BaseEstimator = "random_forest",
    n_estimators: int = 100,
    max_cells: int | None = 2000,
    seed: int = 0,
) -> float:
    """The data ceiling of :func:`c2st_auroc`: the same test between two random halves of ``real``.

    ``real`` is split at random into two disjoint halves ``A`` and ``B`` (``seed``) and the value is
    ``c2st_auroc(A, B)`` with the same options: what a perfect generator, a fresh sample of the real cells, would
    score at this number of cells (about 0.5). Without ``pca`` a PCA is fitted on the two halves pooled.

    Parameters
    ----------
    real
        Cells x genes matrix of real cells (at least ``2 * n_folds``).
    pca, n_pcs, n_folds, classifier, n_estimators, max_cells, seed
        As in :func:`c2st_auroc`.

    Returns
    -------
    float
        The out-of-fold ROC-AUC between the halves.

    Raises
    ------
    ValueError
        As :func:`c2st_auroc`; also when ``real`` is too small to split into two halves of ``n_folds`` cells.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import c2st_ceiling
    >>> real = np.random.default_rng(0).normal(size=(400, 20))
    >>> 0.35 < c2st_ceiling(real, n_estimators=20) < 0.65
    True
    """
    real = _matrix(real, "real")
    if real.shape[0] < 2:
        raise ValueError("`real` needs at least 2 cells to split into halves.")
    a, b = _halves(real, seed)
    return c2st_auroc(
        a,
        b,
        pca=pca,
        n_pcs=n_pcs,
        n_folds=n_folds,
        classifier=classifier,
        n_estimators=n_estimators,
        max_cells=max_cells,
        seed=seed,
    )


# --------------------------------------------------------------------------- nearest-neighbour mixing


def knn_mixing(
    pred,
    real,
    *,
    pca: PCAProjection | None = None,
    n_pcs: int = 30,
    k: int = 15,
    max_cells: int | None = 2000,
    seed: int = 0,
) -> float:
    """Nearest-neighbour mixing of predicted and real cells, relative to perfect mixing.

    Both sets are subsampled to the same size ``n = min(n_pred, n_real, max_cells)``, projected on the first
    ``n_pcs`` principal components and pooled (``N = 2 n`` cells). For each predicted cell ``i``, ``r_i`` is
    the share of real cells among its ``k`` nearest neighbours in the pool (Euclidean,
    ``sklearn.neighbors.NearestNeighbors``; the cell itself excluded). Under perfect mixing a neighbour is real
    with probability ``n_real / (N - 1)``, so

    ``knn_mixing = mean_i r_i / (n_real / (N - 1))``.

    1 means perfectly mixed (the best value), 0 means the predicted cells only neighbour each other. Values a
    little above 1 are chance; clearly above 1 means the predicted cells sit in the densest part of the real
    cloud (e.g. a too narrow population inside it).

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse), same genes.
    pca
        A :class:`~perturbdiff_scvi.metrics.PCAProjection` fitted on real training cells; ``None``: fitted on
        the pooled balanced sets. Its first ``n_pcs`` components are used.
    n_pcs
        Principal components of the embedding.
    k
        Neighbours per predicted cell, ``1 <= k <= N - 1``.
    max_cells, seed
        Cap on cells per set (``None``: no cap) and the seed of the subsampling.

    Returns
    -------
    float
        ``>= 0``; about 1 for a fresh sample of the real cells (see :func:`knn_mixing_ceiling`).

    Raises
    ------
    ValueError
        If the sets have different genes, a set is empty, or ``k`` is not in ``[1, N - 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import knn_mixing
    >>> rng = np.random.default_rng(0)
    >>> real = rng.normal(size=(300, 10))
    >>> 0.85 < knn_mixing(rng.normal(size=(300, 10)), real) < 1.15
    True
    >>> knn_mixing(real + 20.0, real)
    0.0
    """
    pred, real = _pair(pred, real)
    k = _check_int(k, "k", 1)
    a, b = _balanced(pred, real, max_cells, np.random.default_rng(seed))
    n_pred, n_real = a.shape[0], b.shape[0]
    n_total = n_pred + n_real
    if k > n_total - 1:
        raise ValueError(f"k={k} is too large: the pooled sets have {n_total} cells, so k must be <= {n_total - 1}.")
    projection = _resolve_pca(pca, a, b, n_pcs, seed)
    z = np.vstack([_project(projection, a, n_pcs), _project(projection, b, n_pcs)])
    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z[:n_pred], return_distance=False)
    # Drop the cell itself; with duplicated points it may not come first, or not at all (then drop the farthest).
    keep = idx != np.arange(n_pred)[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    neighbours = idx[keep].reshape(n_pred, k)
    observed = float(np.mean(neighbours >= n_pred))
    return observed / (n_real / (n_total - 1))


def knn_mixing_ceiling(
    real,
    *,
    pca: PCAProjection | None = None,
    n_pcs: int = 30,
    k: int = 15,
    max_cells: int | None = 2000,
    seed: int = 0,
) -> float:
    """The data ceiling of :func:`knn_mixing`: the same score between two random halves of ``real``.

    ``real`` is split at random into two disjoint halves ``A`` and ``B`` (``seed``); the value is
    ``knn_mixing(A, B)`` with the same options (about 1). Without ``pca`` a PCA is fitted on the halves pooled.

    Parameters
    ----------
    real
        Cells x genes matrix of real cells (at least 2).
    pca, n_pcs, k, max_cells, seed
        As in :func:`knn_mixing`.

    Returns
    -------
    float
        The mixing score of one half against the other.

    Raises
    ------
    ValueError
        As :func:`knn_mixing`.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import knn_mixing_ceiling
    >>> real = np.random.default_rng(0).normal(size=(400, 10))
    >>> 0.85 < knn_mixing_ceiling(real) < 1.15
    True
    """
    real = _matrix(real, "real")
    if real.shape[0] < 2:
        raise ValueError("`real` needs at least 2 cells to split into halves.")
    a, b = _halves(real, seed)
    return knn_mixing(a, b, pca=pca, n_pcs=n_pcs, k=k, max_cells=max_cells, seed=seed)


# --------------------------------------------------------------------------- spread


def spread_ratio(pred, real, *, pca: PCAProjection | None = None, n_pcs: int = 10) -> np.ndarray:
    """Spread of predicted cells over that of real cells along each principal component.

    With ``z = pca(x)`` the coordinates on the first ``n_pcs`` components,

    ``ratio_k = std(z_k^pred) / std(z_k^real)``  (sample standard deviations, ``ddof=1``).

    1 is ideal; below 1 the predicted population is too narrow along that axis (0: all predicted cells at
    one point, as the cell-mean baseline), above 1 too wide. A summary is ``mean_k |log ratio_k|`` (0 ideal),
    which :func:`perturbdiff_scvi.tl.evaluate` reports as ``spread_ratio_mean_abs_log``.

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse), same genes, at least 2 cells each.
    pca
        A :class:`~perturbdiff_scvi.metrics.PCAProjection` fitted on real *training* cells (recommended:
        the axes then do not depend on the sets scored). ``None``: fitted on ``pred`` and ``real`` pooled
        (a PCA of ``real`` alone would inflate ``real``'s spread along its top components).
    n_pcs
        Components, capped at those available.

    Returns
    -------
    numpy.ndarray
        ``ratio_k`` per component, shape ``(min(n_pcs, pca.n_comps),)``; ``nan`` where the real cells have
        no spread.

    Raises
    ------
    ValueError
        If the sets have different genes or a set has fewer than 2 cells.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import fit_pca, spread_ratio
    >>> rng = np.random.default_rng(0)
    >>> real = rng.normal(size=(300, 20))
    >>> wide = real.mean(0) + 2.0 * (real - real.mean(0))
    >>> np.allclose(spread_ratio(wide, real, pca=fit_pca(real, n_comps=10)), 2.0)
    True
    """
    pred, real = _pair(pred, real)
    if pred.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"Both sets need at least 2 cells; got {pred.shape[0]} and {real.shape[0]}.")
    projection = _resolve_pca(pca, pred, real, n_pcs, 0)
    s_pred = _project(projection, pred, n_pcs).std(axis=0, ddof=1)
    s_real = _project(projection, real, n_pcs).std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s_real > 0, s_pred / s_real, np.nan)


# --------------------------------------------------------------------------- value-level realism


def detected_genes(x, *, threshold: float = 0.0) -> np.ndarray:
    """Genes detected per cell: ``d_i = #{g : x_ig > threshold}``.

    Real single-cell data are sparse (most genes are 0 in a given cell); a generator emitting continuous values
    detects nearly every gene. Compare the mean over predicted cells with the mean over real cells
    (:func:`perturbdiff_scvi.tl.evaluate` reports their ratio as ``detected_genes_ratio``).

    Parameters
    ----------
    x
        Cells x genes matrix, dense or sparse (implicit zeros count as not detected when
        ``threshold >= 0``).
    threshold
        A value counts as detected when strictly above it.

    Returns
    -------
    numpy.ndarray
        Integer count per cell, shape ``(n_cells,)``.

    Raises
    ------
    ValueError
        If ``x`` is not a non-empty cells x genes matrix or ``threshold`` is not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import detected_genes
    >>> detected_genes(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]]))
    array([2, 1])
    >>> detected_genes(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]]), threshold=0.7)
    array([2, 0])
    """
    x = _matrix(x, "x")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite; got {threshold!r}.")
    if not sparse.issparse(x):
        return np.count_nonzero(x > threshold, axis=1).astype(np.int64)
    above = x.copy()
    above.data = (above.data > threshold).astype(np.float64)
    counts = np.asarray(above.sum(axis=1)).ravel().astype(np.int64)
    if threshold < 0:  # implicit zeros are above a negative threshold
        counts += x.shape[1] - x.getnnz(axis=1)
    return counts


def _gene_range(reference) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene minimum and maximum of the reference (implicit zeros of sparse input included)."""
    if sparse.issparse(reference):
        lo = np.asarray(reference.min(axis=0).toarray()).ravel()
        hi = np.asarray(reference.max(axis=0).toarray()).ravel()
        return lo.astype(np.float64), hi.astype(np.float64)
    return reference.min(axis=0), reference.max(axis=0)


def _column_max(x) -> np.ndarray:
    if sparse.issparse(x):
        return np.asarray(x.max(axis=0).toarray(), dtype=np.float64).ravel()
    return x.max(axis=0)


def out_of_range_fraction(pred, reference, *, factor: float = 1.0) -> float:
    """Share of predicted values outside the per-gene range of the reference (training) cells.

    With ``m_g = min_i x_ig^ref`` and ``M_g = max_i x_ig^ref`` over the reference cells,

    ``f = #{(i, g) : x_ig^pred > factor * M_g  or  x_ig^pred < m_g} / (n_pred * n_genes)``

    over all predicted entries. Non-finite predictions (NaN, inf) count as out of range. A gene never expressed
    in the reference (``M_g = 0``) makes every positive prediction of it out of range. Meant for non-negative
    expression (log1p-normalised): ``factor`` > 1 tolerates values somewhat above the training maximum.

    Parameters
    ----------
    pred
        Cells x genes matrix of predicted cells, dense or sparse.
    reference
        Cells x genes matrix of real (training) cells, dense or sparse, same genes.
    factor
        Multiplier of the per-gene maximum, ``> 0``.

    Returns
    -------
    float
        In ``[0, 1]``; 0 is ideal.

    Raises
    ------
    ValueError
        If the matrices have different genes, one is empty, or ``factor`` is not a positive finite number.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import out_of_range_fraction
    >>> reference = np.array([[0.0, 1.0], [2.0, 3.0]])  # gene ranges [0, 2] and [1, 3]
    >>> pred = np.array([[2.5, 2.0], [1.0, 0.5]])  # 2.5 > 2 and 0.5 < 1 are out of range
    >>> out_of_range_fraction(pred, reference)
    0.5
    >>> out_of_range_fraction(pred, reference, factor=1.5)  # 2.5 <= 3 now; 0.5 < 1 still out
    0.25
    """
    pred, reference = _pair(pred, reference, ("pred", "reference"))
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive finite number; got {factor!r}.")
    lo, hi = _gene_range(reference)
    hi = factor * hi
    n_cells, n_genes = pred.shape
    if not sparse.issparse(pred):
        inside = (pred >= lo) & (pred <= hi)
        return float(1.0 - inside.mean())
    coo = pred.tocoo()
    stored_out = ~((coo.data >= lo[coo.col]) & (coo.data <= hi[coo.col]))
    implicit = n_cells - np.bincount(coo.col, minlength=n_genes)  # implicit zeros per gene
    zero_out = ~((lo <= 0.0) & (hi >= 0.0))
    return float((stored_out.sum() + (implicit * zero_out).sum()) / (n_cells * n_genes))


def max_over_training(pred, reference) -> float:
    """Largest ratio, over genes, of the predicted maximum to the reference (training) maximum.

    ``max_g ( max_i x_ig^pred / max_i x_ig^ref )`` over the genes with ``max_i x_ig^ref > 0`` (genes never
    expressed in the reference have no defined ratio and are left out; :func:`out_of_range_fraction` counts
    their positive predictions). 1 or below: no predicted value exceeds what training showed; 2: some gene is
    predicted at twice its training maximum.

    Parameters
    ----------
    pred
        Cells x genes matrix of predicted cells, dense or sparse.
    reference
        Cells x genes matrix of real (training) cells, dense or sparse, same genes.

    Returns
    -------
    float
        The largest ratio; ``nan`` if no gene has a positive reference maximum.

    Raises
    ------
    ValueError
        If the matrices have different genes or one is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import max_over_training
    >>> reference = np.array([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0]])  # maxima 2, 3, 0
    >>> max_over_training(np.array([[3.0, 1.5, 5.0]]), reference)  # 3 / 2; the third gene is left out
    1.5
    """
    pred, reference = _pair(pred, reference, ("pred", "reference"))
    ref_max = _column_max(reference)
    ok = ref_max > 0
    if not ok.any():
        return float("nan")
    return float(np.max(_column_max(pred)[ok] / ref_max[ok]))
