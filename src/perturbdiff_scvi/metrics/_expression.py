"""Pseudobulk and discrimination metrics, to cell-eval's definitions (DE agreement: ``_de_agreement.py``).

Definitions follow the design note ``metrics.md`` section 2.2 (cell-eval @ cb708765 / 0.8.2, pdex 0.3.0).
Notation: for a perturbation ``p``, ``x̄`` is the per-gene mean over cells (pseudobulk) of the
log-normalized expression, and ``δ_p = x̄_p - x̄_ctrl`` is its effect.

Library code does the generic parts (``scipy.stats.spearmanr``, ``sklearn.metrics.roc_auc_score`` /
``average_precision_score``, ``sklearn.metrics.pairwise.cosine_distances``). The cell-eval-specific
glue (pseudobulk errors, the discrimination-score ranking, the significant-gene overlaps and their edge
cases) is written here rather than imported from cell-eval: cell-eval pulls in polars, pdex and an AnnData
pair/DE pipeline for a few lines of arithmetic, so this module stays light, and
``tests/metrics/test_metrics_celleval_crosscheck.py`` checks it against cell-eval / pdex value by value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.metrics.pairwise import cosine_distances

from ._arrays import _dense

__all__ = [
    "baseline_normalized_score",
    "discrimination_score",
    "mae",
    "mse",
    "pearson_delta",
    "r2_mean",
]


# --------------------------------------------------------------------------- pseudobulk errors


def _pseudobulk(x) -> np.ndarray:
    """Mean over cells of a cells x genes matrix; a 1-D vector is taken to be a pseudobulk already."""
    a = _dense(x)
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise ValueError(f"Expected a cells x genes matrix or a gene vector; got shape {a.shape}.")
    return a.mean(0)


def _pair(pred, real, control=None, genes=None) -> tuple[np.ndarray, np.ndarray]:
    p, r = _pseudobulk(pred), _pseudobulk(real)
    if p.shape != r.shape:
        raise ValueError(f"pred and real cover different genes: {p.shape} vs {r.shape}.")
    if control is not None:
        c = _pseudobulk(control)
        if c.shape != r.shape:
            raise ValueError(f"control covers different genes: {c.shape} vs {r.shape}.")
        p, r = p - c, r - c
    if genes is not None:
        p, r = p[genes], r[genes]
    return p, r


def mae(pred, real, *, control=None, genes=None) -> float:
    """Mean absolute error of pseudobulk expression, cell-eval's ``mae`` (``mae_delta`` with ``control``).

    ``MAE = (1/G) sum_g |x̄_g^pred - x̄_g^real|``; with ``control`` the effects are compared instead,
    ``(1/G) sum_g |δ_g^pred - δ_g^real|`` with ``δ = x̄ - x̄_ctrl`` (cell-eval's ``mae_delta``). Best 0.

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse), or pseudobulk vectors of length ``G``.
    control
        Optional control cells (or their pseudobulk) to compare effects rather than expression.
    genes
        Optional integer or boolean index restricting the genes (e.g. top DE genes).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import mae
    >>> real = np.array([[1.0, 2.0], [3.0, 4.0]])  # pseudobulk [2, 3]
    >>> mae(real + 0.5, real)
    0.5
    >>> mae(np.array([2.0, 4.0]), real)  # a pseudobulk vector works too
    0.5
    """
    p, r = _pair(pred, real, control, genes)
    return float(np.mean(np.abs(p - r)))


def mse(pred, real, *, control=None, genes=None) -> float:
    """Mean squared error of pseudobulk expression, cell-eval's ``mse`` (``mse_delta`` with ``control``).

    ``MSE = (1/G) sum_g (x̄_g^pred - x̄_g^real)^2``; with ``control``, the same on effects
    ``δ = x̄ - x̄_ctrl``. Best 0.

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse), or pseudobulk vectors of length ``G``.
    control
        Optional control cells (or their pseudobulk) to compare effects rather than expression.
    genes
        Optional integer or boolean index restricting the genes.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import mse
    >>> real = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> mse(real + 0.5, real)
    0.25
    >>> control = real - 1.0
    >>> mse(real + 0.5, real, control=control)  # effects: 1.5 vs 1.0
    0.25
    """
    p, r = _pair(pred, real, control, genes)
    return float(np.mean((p - r) ** 2))


def r2_mean(pred, real, genes=None) -> float:
    """R² of mean expression, ``sklearn.metrics.r2_score(mean_true, mean_pred)`` (scGen / CPA / PerturbDiff).

    ``R² = 1 - sum_g (x̄_g^real - x̄_g^pred)^2 / sum_g (x̄_g^real - mean_g x̄_g^real)^2``, the coefficient of
    determination with the *real* means as ground truth (not a squared correlation; it can be negative).
    If the real means are constant, returns 1.0 for a perfect prediction and 0.0 otherwise, as sklearn does.

    Report it on all genes and on the top-100 DE genes, e.g.
    ``r2_mean(pred, real, genes=top_de_genes(real, control, 100))``: all-gene R² is high even for the
    "predict control" baseline (``metrics.md`` section 2.3, pitfall 1).

    Parameters
    ----------
    pred, real
        Cells x genes matrices (dense or sparse), or pseudobulk vectors.
    genes
        Optional integer or boolean index restricting the genes.

    Returns
    -------
    float
        Best 1.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import r2_mean
    >>> real = np.array([1.0, 2.0, 3.0, 4.0])
    >>> r2_mean(real, real)
    1.0
    >>> r2_mean(np.full(4, real.mean()), real)  # predicting the mean of the means
    0.0
    """
    p, r = _pair(pred, real, None, genes)
    ss_res = float(np.sum((r - p) ** 2))
    ss_tot = float(np.sum((r - r.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


#: :func:`pearson_delta` is ``nan`` when no predicted shift exceeds this share of the largest control mean.
ZERO_SHIFT_RTOL = 1e-5


def pearson_delta(pred, real, control, genes: np.ndarray | None = None) -> float:
    """Pearson correlation of predicted vs real mean shift from control, cell-eval's ``pearson_delta``.

    ``r = corr_g(δ_g^pred, δ_g^real)`` with ``δ^pred = x̄^pred - x̄^ctrl`` and ``δ^real = x̄^real - x̄^ctrl``
    (``numpy.corrcoef``), the same control mean on both sides. ``genes`` restricts the correlation, e.g. to
    the top DE genes (:func:`~perturbdiff_scvi.metrics.top_de_genes`), as scGen / CPA report it.

    Parameters
    ----------
    pred, real, control
        Cells x genes matrices (dense or sparse) of predicted, real perturbed and real control cells.
    genes
        Optional integer or boolean index over the genes.

    Returns
    -------
    float
        In ``[-1, 1]``, best 1; ``nan`` if either shift is constant over the genes, or if the predicted shift
        is numerically zero (every ``|δ_g^pred| <= 1e-5 · max_g |x̄_g^ctrl|``, float rounding: a prediction
        that is the control population would otherwise score the correlation of its rounding noise).

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import pearson_delta
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(50, 20))
    >>> real = control + np.linspace(0, 2, 20)
    >>> round(pearson_delta(real, real, control), 6)
    1.0
    """
    ctrl_mean = _dense(control).mean(0)
    d_pred, d_real = _dense(pred).mean(0) - ctrl_mean, _dense(real).mean(0) - ctrl_mean
    if genes is not None:
        d_pred, d_real = d_pred[genes], d_real[genes]
    if np.abs(d_pred).max(initial=0.0) <= ZERO_SHIFT_RTOL * np.abs(ctrl_mean).max(initial=0.0):
        return float("nan")
    return float(np.corrcoef(d_pred, d_real)[0, 1])


# --------------------------------------------------------------------------- discrimination score


def _distances(real: np.ndarray, v: np.ndarray, metric: str) -> np.ndarray:
    """Distance of each row of ``real`` to ``v``: ``scipy.spatial.distance.cdist`` / sklearn's cosine."""
    if metric in ("l1", "manhattan", "cityblock"):
        return cdist(real, v[None, :], "cityblock")[:, 0]
    if metric in ("l2", "euclidean"):
        return cdist(real, v[None, :], "euclidean")[:, 0]
    if metric == "cosine":
        # cell-eval: sklearn pairwise_distances(metric="cosine"); a zero vector has similarity 0 (distance 1).
        return cosine_distances(real, v[None, :])[:, 0]
    raise ValueError(f"Unknown metric {metric!r}; use 'l1', 'l2' or 'cosine'.")


def discrimination_score(
    pred_deltas: Mapping[str, np.ndarray],
    real_deltas: Mapping[str, np.ndarray],
    metric: Literal["l1", "l2", "cosine"] = "l1",
    gene_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Perturbation discrimination score (PDS), cell-eval's ``discrimination_score_{l1,l2,cosine}``.

    For each predicted perturbation ``p``: ``d_q = dist(δ_q^real, δ_p^pred)`` for every real perturbation
    ``q`` (``l1``: ``sum |.|``, ``l2``: Euclidean, ``cosine``: ``1 - cos``), over the genes except those
    named ``p`` when ``gene_names`` is given (the target gene of a single-gene perturbation; a combination
    such as ``"A+B"`` matches no gene and drops nothing, as in cell-eval). With ``r`` the 0-based position
    of ``q = p`` in the ascending order of ``d``,

    ``PDS_p = 1 - r / N``, ``N`` = number of real perturbations.

    Best 1 (the prediction is nearest to its own real effect), worst ``1/N``, random about 0.5. Ties in
    ``d`` are broken by perturbation order (``sorted`` keys of ``real_deltas``; stable sort), where
    cell-eval's unstable ``numpy.argsort`` is arbitrary.

    The distances are library code (``scipy.spatial.distance.cdist`` for ``l1`` / ``l2``,
    ``sklearn.metrics.pairwise.cosine_distances`` for ``cosine``); the ranking is written here, to
    cell-eval's definition, to keep cell-eval (polars, pdex) out of the dependencies. It is cross-checked
    against cell-eval by ``tests/metrics/test_metrics_celleval_crosscheck.py``.

    Parameters
    ----------
    pred_deltas
        Perturbation -> predicted effect ``δ^pred = x̄_p^pred - x̄_ctrl`` (vector over genes).
    real_deltas
        Perturbation -> real effect; must contain every key of ``pred_deltas``.
    metric
        ``"l1"`` (the VCC metric), ``"l2"`` or ``"cosine"``.
    gene_names
        Gene names of the delta vectors, to drop a perturbation's own target gene.

    Returns
    -------
    dict[str, float]
        Perturbation -> score, for every key of ``pred_deltas``.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import discrimination_score
    >>> real = {"A": np.array([1.0, 0.0, 0.0]), "B": np.array([0.0, 1.0, 0.0])}
    >>> pred = {"A": np.array([0.9, 0.1, 0.0]), "B": np.array([0.8, 0.2, 0.0])}
    >>> discrimination_score(pred, real, metric="l1")  # B's prediction is nearer to A's effect
    {'A': 1.0, 'B': 0.5}
    """
    perts = sorted(real_deltas, key=str)
    if not perts:
        raise ValueError("real_deltas is empty.")
    missing = [p for p in pred_deltas if p not in real_deltas]
    if missing:
        raise KeyError(f"Predicted perturbations without a real effect: {missing}.")
    real = np.vstack([np.asarray(real_deltas[p], dtype=np.float64).ravel() for p in perts])
    names = None if gene_names is None else np.asarray(list(gene_names), dtype=object)
    if names is not None and names.shape[0] != real.shape[1]:
        raise ValueError(f"gene_names has {names.shape[0]} entries for {real.shape[1]} genes.")
    n = len(perts)
    out: dict[str, float] = {}
    for p in pred_deltas:
        v = np.asarray(pred_deltas[p], dtype=np.float64).ravel()
        if v.shape[0] != real.shape[1]:
            raise ValueError(f"Predicted delta of {p!r} has {v.shape[0]} genes, real ones have {real.shape[1]}.")
        keep = slice(None) if names is None else names != str(p)
        d = _distances(real[:, keep], v[keep], metric)
        order = np.argsort(d, kind="stable")
        rank = int(np.flatnonzero(order == perts.index(p))[0])
        out[p] = 1.0 - rank / n
    return out


# --------------------------------------------------------------------------- DE agreement


def baseline_normalized_score(value, baseline, *, best: Literal[0, 1]):
    """Score a metric against a baseline model, cell-eval's ``score_agg_metrics`` normalization.

    For a metric whose best value is 1: ``s = (u - b) / (1 - b)``; best value 0: ``s = 1 - u / b``;
    then ``s = max(s, 0)``. ``u`` is the model's value, ``b`` the baseline's (cell-eval: the cell-mean
    model). 1 is perfect, 0 is no better than the baseline. Average the scores of several metrics
    afterwards for an overall score.

    Parameters
    ----------
    value
        Metric value(s) of the model (scalar or array).
    baseline
        Metric value(s) of the baseline (broadcastable).
    best
        1 for higher-is-better metrics bounded by 1 (``overlap_at_N``, PDS, ``pearson_delta``), 0 for
        errors (``mae``).

    Returns
    -------
    float or numpy.ndarray
        ``nan`` where the normalization divides by zero.

    Examples
    --------
    >>> from perturbdiff_scvi.metrics import baseline_normalized_score
    >>> baseline_normalized_score(0.8, 0.6, best=1)  # (0.8 - 0.6) / (1 - 0.6)
    0.5000000000000001
    >>> baseline_normalized_score(0.1, 0.2, best=0)  # 1 - 0.1 / 0.2
    0.5
    """
    u = np.asarray(value, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if best == 1:
            s = (u - b) / (1.0 - b)
        elif best == 0:
            s = 1.0 - u / b
        else:
            raise ValueError("best must be 0 or 1.")
        s = np.where(np.isfinite(s), np.maximum(s, 0.0), np.nan)
    return float(s) if s.ndim == 0 else s
