"""Differential expression: pdex / cell-eval's DE tables and scanpy's top DE genes.

:func:`differential_expression`: one perturbation (target cells) against the control (reference cells), a
two-sided Mann-Whitney U test per gene, Benjamini-Hochberg FDR over the genes, and a log2 fold change of
geometric-mean pseudobulks with no pseudocount (``epsilon = 0``), as pinned by cell-eval (``pdex`` 0.3.0,
``mode="ref"``). The tests are scipy's (``mannwhitneyu``, ``false_discovery_control``); the pdex conventions
around them (geometric means, ``epsilon = 0`` fold changes, p = 1 for constant genes) are written here
instead of calling pdex, which would add polars, numba and an AnnData round trip as dependencies of the
metrics. ``tests/metrics/test_metrics_celleval_crosscheck.py`` checks the tables against pdex.

:func:`top_de_genes`: the scGen / CPA gene selection, ``scanpy.tl.rank_genes_groups`` (Wilcoxon).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, mannwhitneyu

from ._arrays import _dense

__all__ = [
    "DE_COLUMNS",
    "benjamini_hochberg",
    "differential_expression",
    "log2_fold_change",
    "pseudobulk_geometric",
    "top_de_genes",
]

#: Columns of the frame returned by :func:`differential_expression`, in order.
DE_COLUMNS = (
    "feature",
    "target_mean",
    "ref_mean",
    "fold_change",
    "log2_fold_change",
    "statistic",
    "p_value",
    "fdr",
)

_GENE_CHUNK = 2048  # genes ranked at once by mannwhitneyu; bounds memory at ~ n_cells * chunk * 8 bytes * a few


def pseudobulk_geometric(X, *, is_log1p: bool = True) -> np.ndarray:
    """Per-gene geometric-mean pseudobulk in count space, as pdex computes it.

    ``m_g = expm1(mean_i X_ig)`` when ``is_log1p`` (``X`` already holds ``log1p`` values), else
    ``m_g = expm1(mean_i log1p(X_ig))`` (``X`` holds counts or normalized counts).

    Parameters
    ----------
    X
        Cells x genes matrix (dense or sparse).
    is_log1p
        Whether ``X`` is already ``log1p``-transformed.

    Returns
    -------
    numpy.ndarray
        Float64 vector of length ``n_genes``, non-negative for non-negative input.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import pseudobulk_geometric
    >>> x = np.log1p(np.array([[0.0, 3.0], [8.0, 3.0]]))
    >>> pseudobulk_geometric(x)  # expm1(mean(log1p)): sqrt(1 * 9) - 1, 3
    array([2., 3.])
    """
    x = _dense(X)
    log_mean = x.mean(0) if is_log1p else np.log1p(x).mean(0)
    return np.expm1(log_mean)


def log2_fold_change(target_mean, ref_mean) -> np.ndarray:
    """``log2(target_mean / ref_mean)`` with pseudocount 0 (cell-eval's ``epsilon = 0``).

    Edge cases follow pdex: ``x / 0 = +inf`` for ``x > 0``, ``0 / y = -inf`` for ``y > 0``, and
    ``0 / 0`` (gene unexpressed in both groups) is defined as ``0`` (no change) instead of ``nan``.

    Parameters
    ----------
    target_mean, ref_mean
        Pseudobulk vectors in count space (see :func:`pseudobulk_geometric`).

    Returns
    -------
    numpy.ndarray
        Float64 vector, may contain ``+inf`` / ``-inf`` but never ``nan`` for non-negative input.

    Examples
    --------
    >>> from perturbdiff_scvi.metrics import log2_fold_change
    >>> log2_fold_change([4.0, 1.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0])
    array([  2.,  inf, -inf,   0.])
    """
    t = np.asarray(target_mean, dtype=np.float64)
    r = np.asarray(ref_mean, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(t / r)
    lfc[np.isnan(lfc)] = 0.0
    return lfc


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), ``scipy.stats.false_discovery_control(p, method="bh")``.

    For p-values sorted ascending, ``p_(1) <= ... <= p_(m)``:
    ``q_(i) = min_{j >= i} min(1, m * p_(j) / j)``, then mapped back to the input order.

    Parameters
    ----------
    p_values
        1-D array of p-values in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same shape and order as the input.

    Examples
    --------
    >>> from perturbdiff_scvi.metrics import benjamini_hochberg
    >>> benjamini_hochberg([0.01, 0.04, 0.03])
    array([0.03, 0.04, 0.04])
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    return np.asarray(false_discovery_control(p, method="bh"), dtype=np.float64)


def _mwu_pvalues(x_target: np.ndarray, x_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column two-sided asymptotic Mann-Whitney U (tie-corrected, continuity-corrected)."""
    n_genes = x_target.shape[1]
    stat = np.empty(n_genes)
    pval = np.empty(n_genes)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n_genes, _GENE_CHUNK):
            sl = slice(start, start + _GENE_CHUNK)
            res = mannwhitneyu(
                x_target[:, sl],
                x_ref[:, sl],
                use_continuity=True,
                alternative="two-sided",
                axis=0,
                method="asymptotic",
            )
            stat[sl] = res.statistic
            pval[sl] = res.pvalue
    # A gene that is constant over both groups has zero variance: scipy returns nan, pdex/numba-mwu return 1.
    pval = np.where(np.isnan(pval), 1.0, np.clip(pval, 0.0, 1.0))
    return stat, pval


def differential_expression(
    X_target,
    X_ref,
    *,
    is_log1p: bool = True,
    gene_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Differential expression of one perturbation vs control, exactly as pdex / cell-eval compute it.

    For every gene ``g``:

    - ``statistic``, ``p_value``: two-sided Mann-Whitney U test of the target cells against the reference
      cells, ``scipy.stats.mannwhitneyu(X_target, X_ref, axis=0, method="asymptotic",
      use_continuity=True)`` (normal approximation with tie correction, as ``numba-mwu`` in pdex).
      ``statistic`` is ``U`` of the target sample. A gene constant across both groups gets ``p = 1``.
    - ``fdr``: Benjamini-Hochberg over the genes of this comparison
      (``scipy.stats.false_discovery_control``), see :func:`benjamini_hochberg`.
    - ``target_mean``, ``ref_mean``: geometric-mean pseudobulk in count space,
      ``expm1(mean(log1p x))`` (see :func:`pseudobulk_geometric`).
    - ``fold_change = target_mean / ref_mean`` and ``log2_fold_change = log2(fold_change)``, with
      **epsilon = 0** (no pseudocount), the setting cell-eval pins.

    **Epsilon = 0 behaviour.** A gene with ``ref_mean == 0 < target_mean`` gets ``fold_change = inf`` and
    ``log2_fold_change = +inf``; one with ``target_mean == 0 < ref_mean`` gets ``fold_change = 0`` and
    ``log2_fold_change = -inf``; a gene zero in both gets ``fold_change = 1`` and ``log2_fold_change = 0``
    (pdex maps ``log2(0/0)`` to 0). Because cell-eval ranks significant genes by ``|log2_fold_change|``,
    such infinite fold changes go to the top of the ranking; a dense (never exactly zero) prediction
    therefore turns near-zero genes into huge fold changes. See :func:`zero_small_values` for the
    remedy (design note ``metrics.md`` section 2.3, pitfall 2).

    Parameters
    ----------
    X_target
        Cells x genes matrix of the perturbed (or predicted) cells, dense or sparse.
    X_ref
        Cells x genes matrix of the control cells, same genes in the same order.
    is_log1p
        ``True`` (default, cell-eval's setting) when the matrices hold ``log1p``-normalized expression;
        ``False`` when they hold counts / normalized counts (``log1p`` is then applied for the means; the
        U test is rank based and unaffected).
    gene_names
        Gene names for the ``feature`` column and the index; default ``"0", "1", ...``.

    Returns
    -------
    pandas.DataFrame
        One row per gene, indexed by gene name, with columns :data:`DE_COLUMNS`:
        ``feature, target_mean, ref_mean, fold_change, log2_fold_change, statistic, p_value, fdr``.

    Raises
    ------
    ValueError
        If the gene dimensions differ, either group has no cells, or ``gene_names`` has the wrong length.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import differential_expression
    >>> rng = np.random.default_rng(0)
    >>> control = np.log1p(rng.poisson(1.0, size=(100, 4)).astype(float))
    >>> stim = control.copy()
    >>> stim[:, 0] += 1.0
    >>> de = differential_expression(stim, control, gene_names=["IFIT1", "CD3E", "CD4", "ACTB"])
    >>> bool(de.loc["IFIT1", "fdr"] < 0.05), bool(de.loc["ACTB", "fdr"] < 0.05)
    (True, False)
    """
    x_t, x_r = _dense(X_target), _dense(X_ref)
    if x_t.ndim != 2 or x_r.ndim != 2 or x_t.shape[1] != x_r.shape[1]:
        raise ValueError(f"Need two cells x genes matrices with the same genes; got {x_t.shape} and {x_r.shape}.")
    if x_t.shape[0] == 0 or x_r.shape[0] == 0:
        raise ValueError("Both groups need at least one cell.")
    n_genes = x_t.shape[1]
    names = np.asarray([str(i) for i in range(n_genes)] if gene_names is None else list(gene_names), dtype=object)
    if names.shape[0] != n_genes:
        raise ValueError(f"gene_names has {names.shape[0]} entries for {n_genes} genes.")

    t_mean = pseudobulk_geometric(x_t, is_log1p=is_log1p)
    r_mean = pseudobulk_geometric(x_r, is_log1p=is_log1p)
    lfc = log2_fold_change(t_mean, r_mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        fc = t_mean / r_mean
    fc[np.isnan(fc)] = 1.0  # 0 / 0, consistent with log2_fold_change == 0
    stat, pval = _mwu_pvalues(x_t, x_r)
    out = pd.DataFrame(
        {
            "feature": names,
            "target_mean": t_mean,
            "ref_mean": r_mean,
            "fold_change": fc,
            "log2_fold_change": lfc,
            "statistic": stat,
            "p_value": pval,
            "fdr": benjamini_hochberg(pval),
        },
        index=pd.Index(names),
    )
    return out


def top_de_genes(real, control, n: int = 100) -> np.ndarray:
    """Column indices of the ``n`` genes most differentially expressed between ``real`` and ``control``.

    Wilcoxon rank-sum test (``scanpy.tl.rank_genes_groups(method="wilcoxon")``, real vs control), ranked by
    the absolute test statistic, both directions, as scGen / CPA evaluations do; ties keep scanpy's order.

    Parameters
    ----------
    real, control
        Cells x genes matrices (dense or sparse) of perturbed and control cells, same genes.
    n
        Number of genes to return.

    Returns
    -------
    numpy.ndarray
        Integer column indices, most differential first, length ``min(n, n_genes)``.

    Examples
    --------
    >>> import numpy as np
    >>> from perturbdiff_scvi.metrics import top_de_genes
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(60, 10))
    >>> real = control + np.r_[3.0, -2.0, np.zeros(8)]
    >>> top_de_genes(real, control, n=2)
    array([0, 1])
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
