"""DE agreement, to cell-eval's definitions: overlap / precision of significant genes, direction, Spearman, AUCs.

Definitions follow the design note ``metrics.md`` section 2.2 (cell-eval @ cb708765 / 0.8.2, pdex 0.3.0). The
input tables come from :func:`~perturbdiff_scvi.metrics.differential_expression` (Mann-Whitney U + BH). Library
code does the generic parts (``scipy.stats.spearmanr``, ``sklearn.metrics.roc_auc_score`` /
``average_precision_score``); the cell-eval-specific glue (significant-gene overlaps and their edge cases) is
written here rather than imported from cell-eval, which pulls in polars, pdex and an AnnData pair/DE pipeline for
a few lines of arithmetic; ``tests/metrics/test_metrics_celleval_crosscheck.py`` checks it value by value.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score


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


__all__ = ["de_metrics"]
