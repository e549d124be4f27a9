"""Pseudobulk, discrimination and DE-agreement metrics, to cell-eval's definitions.

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

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics.pairwise import cosine_distances

from ._arrays import _dense

__all__ = [
    "baseline_normalized_score",
    "de_metrics",
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
        In ``[-1, 1]``, best 1; ``nan`` if either shift is constant over the genes.

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


def _de_view(de: pd.DataFrame, name: str) -> pd.DataFrame:
    """Normalize a DE frame to index=feature (str), columns lfc, fdr (row order kept)."""
    feats = de["feature"] if "feature" in de.columns else pd.Series(de.index, index=de.index)
    if "log2_fold_change" in de.columns:
        lfc = de["log2_fold_change"].to_numpy(dtype=np.float64)
    elif "fold_change" in de.columns:
        with np.errstate(divide="ignore", invalid="ignore"):
            lfc = np.log2(de["fold_change"].to_numpy(dtype=np.float64))
    else:
        raise KeyError(f"{name} DE frame needs a 'log2_fold_change' (or 'fold_change') column.")
    if "fdr" not in de.columns:
        raise KeyError(f"{name} DE frame needs an 'fdr' column.")
    lfc = np.where(np.isnan(lfc), 0.0, lfc)  # cell-eval: log2(fold_change).fill_nan(0)
    view = pd.DataFrame(
        {"lfc": lfc, "fdr": de["fdr"].to_numpy(dtype=np.float64)},
        index=pd.Index(np.asarray(feats).astype(str), name="feature"),
    )
    if view.index.has_duplicates:
        raise ValueError(f"{name} DE frame has duplicated features.")
    return view


def _ranked_significant(view: pd.DataFrame, fdr: float) -> np.ndarray:
    """Significant features (fdr < threshold), by |log2FC| descending, ties in row order (polars 'ordinal')."""
    sig = view[view["fdr"].to_numpy() < fdr]
    order = np.argsort(-np.abs(sig["lfc"].to_numpy()), kind="stable")
    return sig.index.to_numpy()[order]


def _top_overlap(real_sig: np.ndarray, pred_sig: np.ndarray, k: int | None, by: str, empty: float) -> float:
    base = real_sig if by == "overlap" else pred_sig
    k_eff = base.size if not k else min(k, base.size)
    if k_eff == 0:
        return empty
    return np.intersect1d(real_sig[:k_eff], pred_sig[:k_eff]).size / k_eff


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """``scipy.stats.spearmanr`` (average ranks); ``nan`` for fewer than 2 genes or a constant side."""
    if a.size < 2 or np.unique(a).size < 2 or np.unique(b).size < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def de_metrics(
    real_de: pd.DataFrame,
    pred_de: pd.DataFrame,
    *,
    fdr: float = 0.05,
    k_values: Iterable[int] = (50, 100, 200, 500),
    no_sig_value: float = float("nan"),
) -> dict[str, float]:
    """DE-agreement metrics of one perturbation, cell-eval's DE metrics on two DE tables.

    Inputs are two tables from :func:`differential_expression` (real cells vs control, predicted cells vs
    control), matched on ``feature`` (or the index). Let ``R`` / ``P`` be the real / predicted genes with
    ``fdr < fdr`` (strict), each sorted by ``|log2_fold_change|`` descending (``nan`` log2FC counts as 0;
    ties keep row order, like polars' ``ordinal`` rank).

    - ``overlap_at_N`` (DES): ``k = |R|``, ``|R[:k] ∩ P[:k]| / k``.
    - ``overlap_at_{k}``: the same with ``k_eff = min(k, |R|)``.
    - ``precision_at_N``: ``k = |P|``, ``|R[:k] ∩ P[:k]| / k``; ``precision_at_{k}`` with
      ``k_eff = min(k, |P|)``.
    - ``de_sig_genes_recall``: ``|R ∩ P| / |R|``.
    - ``de_direction_match``: fraction of genes in ``R`` with ``sign(lfc_pred) == sign(lfc_real)``.
    - ``de_spearman_lfc_sig``: Spearman correlation (``scipy.stats.spearmanr``, average ranks) of real vs
      predicted log2FC over ``R`` (``nan`` if ``|R| < 2`` or either side is constant; ±inf values rank at
      the ends).
    - ``roc_auc`` / ``pr_auc``: over all real genes, label ``fdr_real < fdr``, score
      ``-log10(fdr_pred)`` with ``fdr_pred = 0`` replaced by ``1e-10``; ROC AUC
      (``sklearn.metrics.roc_auc_score``, ties count 1/2) and average precision
      ``sum_n (R_n - R_{n-1}) P_n`` (``sklearn.metrics.average_precision_score``). ``nan`` unless both
      classes occur.
    - ``n_sig_real = |R|``, ``n_sig_pred = |P|``.

    Genes missing from ``pred_de`` count as ``log2FC = 0`` (a sign mismatch; "missing predictions -> 0") and
    ``fdr = 1``; with the same genes on both sides (the normal case) this equals cell-eval's inner join.

    **No significant genes.** ``overlap_at_*`` and ``de_sig_genes_recall`` are undefined when ``R`` is
    empty (``0/0``: there is no real DE to recover), and ``precision_at_*`` when ``P`` is empty; they then
    return ``no_sig_value`` (default ``nan``, so that such perturbations are visibly excluded from
    averages rather than counted as failures). cell-eval returns 0.0 in these cases: pass
    ``no_sig_value=0.0`` to reproduce its numbers exactly. Direction match, Spearman and the AUCs are
    ``nan`` when ``R`` is empty regardless (cell-eval leaves them missing too).

    The correlation and the AUCs are scipy / sklearn; the significant-gene ranking, the overlaps and their
    edge cases are written here, to cell-eval's definitions, so that cell-eval (polars, pdex) is not a
    dependency. ``tests/metrics/test_metrics_celleval_crosscheck.py`` checks them against cell-eval.

    Parameters
    ----------
    real_de, pred_de
        DE tables with columns ``feature`` (optional; index otherwise), ``log2_fold_change`` (or
        ``fold_change``) and ``fdr``.
    fdr
        Significance threshold on the BH FDR (cell-eval: 0.05, also used for the AUC labels).
    k_values
        Fixed cut-offs for ``overlap_at_{k}`` and ``precision_at_{k}``.
    no_sig_value
        Value of the overlap / precision / recall metrics when they are undefined (see above).

    Returns
    -------
    dict[str, float]
        Keys ``overlap_at_N``, ``overlap_at_{k}``..., ``precision_at_N``, ``precision_at_{k}``...,
        ``de_sig_genes_recall``, ``de_direction_match``, ``de_spearman_lfc_sig``, ``roc_auc``, ``pr_auc``,
        ``n_sig_real``, ``n_sig_pred``.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import de_metrics, differential_expression
    >>> rng = np.random.default_rng(0)
    >>> control = np.log1p(rng.poisson(1.0, size=(80, 30)).astype(float))
    >>> real = control.copy()
    >>> real[:, :5] += 1.0  # five up-regulated genes
    >>> de_real = differential_expression(real, control)
    >>> de_pred = differential_expression(real + rng.normal(0, 0.05, real.shape), control)
    >>> m = de_metrics(de_real, de_pred)
    >>> m["n_sig_real"], m["overlap_at_N"]
    (5.0, 1.0)
    """
    real = _de_view(real_de, "real")
    pred = _de_view(pred_de, "pred")
    r_sig = _ranked_significant(real, fdr)
    p_sig = _ranked_significant(pred, fdr)
    ks = [int(k) for k in k_values]

    out: dict[str, float] = {"overlap_at_N": _top_overlap(r_sig, p_sig, None, "overlap", no_sig_value)}
    for k in ks:
        out[f"overlap_at_{k}"] = _top_overlap(r_sig, p_sig, k, "overlap", no_sig_value)
    out["precision_at_N"] = _top_overlap(r_sig, p_sig, None, "precision", no_sig_value)
    for k in ks:
        out[f"precision_at_{k}"] = _top_overlap(r_sig, p_sig, k, "precision", no_sig_value)
    out["de_sig_genes_recall"] = np.intersect1d(r_sig, p_sig).size / r_sig.size if r_sig.size else no_sig_value

    pred_al = pred.reindex(real.index)
    pred_lfc = pred_al["lfc"].fillna(0.0).to_numpy()
    pred_fdr = pred_al["fdr"].fillna(1.0).to_numpy()
    sig_mask = real["fdr"].to_numpy() < fdr
    real_lfc = real["lfc"].to_numpy()
    if sig_mask.any():
        out["de_direction_match"] = float(np.mean(np.sign(real_lfc[sig_mask]) == np.sign(pred_lfc[sig_mask])))
        out["de_spearman_lfc_sig"] = _spearman(real_lfc[sig_mask], pred_lfc[sig_mask])
    else:
        out["de_direction_match"] = float("nan")
        out["de_spearman_lfc_sig"] = float("nan")

    n_pos = int(sig_mask.sum())
    if 0 < n_pos < sig_mask.size:
        scores = -np.log10(np.where(pred_fdr == 0, 1e-10, pred_fdr))
        out["roc_auc"] = float(roc_auc_score(sig_mask, scores))
        out["pr_auc"] = float(average_precision_score(sig_mask, scores))
    else:
        out["roc_auc"] = float("nan")
        out["pr_auc"] = float("nan")
    out["n_sig_real"] = float(r_sig.size)
    out["n_sig_pred"] = float(p_sig.size)
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- baseline normalization


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
