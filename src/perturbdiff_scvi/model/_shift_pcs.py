"""``OutputOptions(shift_pcs=k)``: each population's mean shift from its control cells, kept on the top ``k``
principal axes of the training cells; each cell keeps its own deviation from the population mean.

A model that generates cells on principal components (CellFlow) predicts a shift that lies in the span of its
components by construction. PerturbDiff generates every gene, and the population mean of a gene the perturbation
hardly moves carries the model's per-gene error. With ``V`` the ``(G, k)`` axes and ``delta = mean(x) -
mean(controls)``, every cell becomes ``max(0, x - (I - V V^T) delta)``: the part of the shift outside the axes is
removed, the cells' spread around their mean is not touched, so a distance on the training PCs (``k`` at least
their number) is unchanged up to the clipping at 0.

With ``OutputOptions(pcs_anchor="training")`` the anchor is the training cells' mean ``mu`` (the centre of the
PCA) instead of the control pool: ``x' = max(0, x - (I - V V^T) (mean(x) - mu))`` puts the population mean on the
affine span of the axes, exactly where a model that decodes its cells from the training PCs puts it (CellFlow's
``reconstruct_pca``). The part of the held-out context's control mean outside the axes is then not carried into
the prediction.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._ranges import _chunks

#: At most this many training cells (a fixed random subset, read in row blocks) are used to fit the axes.
MAX_PCA_CELLS = 20_000


#: Where the shift that :func:`project_shifts` projects is measured from.
PCS_ANCHORS = ("controls", "training")


def check_pcs_anchor(value, shift_pcs: int | None) -> str:
    """``pcs_anchor`` as one of :data:`PCS_ANCHORS`; ``"training"`` needs ``shift_pcs``."""
    if not isinstance(value, str) or value not in PCS_ANCHORS:
        raise ValueError(f"pcs_anchor must be one of {list(PCS_ANCHORS)}; got {value!r}.")
    if value != "controls" and shift_pcs is None:
        raise ValueError(
            f"pcs_anchor={value!r} sets where shift_pcs measures the shift from, but shift_pcs is None; "
            "pass OutputOptions(shift_pcs=50, pcs_anchor=...)."
        )
    return value


def check_shift_pcs(value, n_genes: int) -> int | None:
    """``shift_pcs`` as an int in ``[1, n_genes)`` or ``None``; anything else raises a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value < n_genes:
        raise ValueError(
            f"shift_pcs must be None or a whole number of principal axes from 1 to {n_genes - 1} (fewer than the "
            f"{n_genes} genes); got {value!r}."
        )
    return int(value)


def principal_axes(
    matrix, k: int, *, max_cells: int = MAX_PCA_CELLS, seed: int = 0, return_mean: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The top ``k`` principal axes ``(G, k)`` of the rows of ``matrix`` (at most ``max_cells`` of them, drawn
    once with ``seed``), from scikit-learn's randomized PCA; with ``return_mean``, also the mean ``(G,)`` of those
    rows (the centre of the PCA).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(200, 5)) * [10.0, 1.0, 1.0, 1.0, 1.0]
    >>> np.abs(principal_axes(x, 1)[:, 0]).argmax()  # the axis of the widest gene
    np.int64(0)
    """
    from sklearn.decomposition import PCA

    n = matrix.shape[0]
    keep = np.ones(n, dtype=bool)
    if n > max_cells:
        keep[:] = False
        keep[np.random.default_rng(seed).choice(n, max_cells, replace=False)] = True
    blocks, start = [], 0
    for block in _chunks(matrix):
        blocks.append(block[keep[start : start + len(block)]])
        start += len(block)
    x = np.concatenate(blocks)
    k = min(k, x.shape[0] - 1)
    pca = PCA(k, svd_solver="randomized", random_state=seed).fit(x)
    return (pca.components_.T, pca.mean_) if return_mean else pca.components_.T


def project_shifts(
    populations: dict, conditions, cells: list[np.ndarray], source, axes: np.ndarray, center: np.ndarray | None = None
) -> list:
    """Per population (``populations``: ``_predict.jobs_by_population``, the positions in ``cells`` of each
    (condition, population)): remove the part of its mean shift (its first ``n`` cells, those kept, against the mean of
    its (context, batch) control pool, or against ``center`` where given) that lies outside ``axes``; returns new
    arrays."""
    out = list(cells)
    control_means: dict[tuple[int, int], np.ndarray] = {}
    for (ci, _), idx in populations.items():
        cond = conditions[ci]
        key = (cond.ctx, cond.batch)
        if center is not None:
            control_means[key] = np.asarray(center, dtype=np.float64)
        elif key not in control_means:
            control_means[key] = source.rows(*key, np.arange(len(source.pool(*key)))).mean(0, dtype=np.float64)
        kept = np.concatenate([cells[i] for i in idx])[: cond.n]
        delta = kept.mean(0, dtype=np.float64) - control_means[key]
        off_axes = delta - axes @ (axes.T @ delta)
        for i in idx:
            out[i] = np.maximum(cells[i] - off_axes, 0.0).astype(cells[i].dtype)
    return out
