"""First evaluation helpers (numpy/scipy/scanpy only): energy distance, mean-shift correlation, DE genes."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def _mean_distance(x: np.ndarray, y: np.ndarray, chunk: int = 2048) -> float:
    total = sum(cdist(x[i : i + chunk], y).sum() for i in range(0, len(x), chunk))
    return float(total) / (len(x) * len(y))


def energy_distance(x, y) -> float:
    """Energy distance between two cell sets (cells x features), Euclidean, V-statistic.

    ``E(X, Y) = 2 mean_ij ||x_i - y_j|| - mean_ij ||x_i - x_j|| - mean_ij ||y_i - y_j||``, the
    E-distance of pertpy / scPerturb (Peidli et al. 2024) on whatever space is passed in (genes or PCs).
    PerturbDiff's training loss uses half of it.
    """
    x, y = _dense(x), _dense(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Both sets need the same features; got {x.shape[1]} and {y.shape[1]}.")
    return 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


def pearson_delta(pred, real, control, genes: np.ndarray | None = None) -> float:
    """Pearson correlation of predicted vs real mean shift from control, ``mean(pred) - mean(ctrl)``.

    ``genes`` (integer or boolean index over columns) restricts the correlation, e.g. to top DE genes.
    """
    ctrl_mean = _dense(control).mean(0)
    d_pred, d_real = _dense(pred).mean(0) - ctrl_mean, _dense(real).mean(0) - ctrl_mean
    if genes is not None:
        d_pred, d_real = d_pred[genes], d_real[genes]
    return float(np.corrcoef(d_pred, d_real)[0, 1])


def top_de_genes(real, control, n: int = 100) -> np.ndarray:
    """Column indices of the ``n`` genes most differentially expressed between ``real`` and ``control``.

    Wilcoxon rank-sum test (``scanpy.tl.rank_genes_groups``), ranked by the absolute test statistic,
    both directions, as scGen/CPA evaluations do.
    """
    import anndata as ad
    import scanpy as sc

    x = np.vstack([_dense(real), _dense(control)])
    labels = np.array(["real"] * real.shape[0] + ["control"] * control.shape[0])
    tmp = ad.AnnData(x.astype(np.float32))
    tmp.obs["group"] = labels
    tmp.obs["group"] = tmp.obs["group"].astype("category")
    sc.tl.rank_genes_groups(tmp, "group", groups=["real"], reference="control", method="wilcoxon", n_genes=tmp.n_vars)
    scores = np.asarray(tmp.uns["rank_genes_groups"]["scores"]["real"], dtype=np.float64)
    names = np.asarray(tmp.uns["rank_genes_groups"]["names"]["real"]).astype(int)
    return names[np.argsort(-np.abs(scores), kind="stable")[:n]]
