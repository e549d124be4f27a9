"""``population_spread`` and ``lfc_intervals``: many sampled populations beside the real ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from ..tl._populations import level_tag, matrix, population_codes, populations_of, select
from ._plots import _axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ..tl import CalibrationResult


def _real_groups(real: AnnData, cols: np.ndarray, group_key: str | None, layer: str | None) -> dict[str, np.ndarray]:
    """``{group: pseudobulk (G,)}`` of the real cells, one entry (``"real"``) without ``group_key``."""
    if group_key is None:
        return {"real": matrix(real, np.arange(real.n_obs), cols, layer, "real").mean(0)}
    if group_key not in real.obs.columns:
        raise KeyError(f"group_key={group_key!r} is not a column of real.obs (columns: {list(real.obs.columns)}).")
    groups = sorted(real.obs[group_key].astype(str).unique())
    return {g: matrix(real, select(real, **{group_key: g}), cols, layer, "real").mean(0) for g in groups}


def population_spread(
    pred: AnnData,
    real: AnnData | None = None,
    *,
    genes: Sequence[str] | None = None,
    n_genes: int = 8,
    population_key: str = "population",
    group_key: str | None = None,
    layer: str | None = None,
    seed: int = 0,
    ax: Axes | None = None,
) -> Axes:
    """Per gene, the pseudobulk of every sampled population (dots) beside that of each real donor or batch.

    The pseudobulk of a population is its mean log1p expression per gene. For each gene, the sampled
    populations of ``pred`` are drawn as a jittered strip on the left of the gene's slot and the real groups
    (``real.obs[group_key]``; all of ``real`` as one group without it) as black diamonds on the right. Real
    groups inside the strip are what calibrated populations look like. Pass one condition's cells (subset
    ``pred`` and ``real`` to one perturbation and context first).

    Parameters
    ----------
    pred
        Predicted cells with several populations (``predict_population(..., n_populations=K)``).
    real
        Real cells of the same condition; ``None`` = the sampled populations only.
    genes
        Genes to draw; ``None`` = the ``n_genes`` genes whose pseudobulk varies most across populations.
    n_genes
        Genes drawn when ``genes`` is ``None``.
    population_key
        Obs column of ``pred`` telling the populations apart.
    group_key
        Obs column of ``real`` naming its populations (donor, batch); ``None`` = one real group.
    layer
        Layer of ``pred`` and ``real`` to read instead of ``X``.
    seed
        Seed of the horizontal jitter.
    ax
        Axes to draw into; ``None`` = a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = pdiff.pl.population_spread(pred, real, genes=["ISG15", "IFI6", "CXCL10"], group_key="donor")
    >>> ax.figure.savefig("spread.png")
    """
    if not isinstance(pred, AnnData):
        raise TypeError(f"pred must be an AnnData; got {type(pred).__name__}.")
    pops = population_codes(pred, population_key)
    populations = populations_of(pred, np.arange(pred.n_obs), pops, np.arange(pred.n_vars), layer)
    bulk = np.stack([x.mean(0) for x in populations])  # (K, G)
    if genes is None:
        order = np.argsort(-bulk.std(0), kind="stable")[: max(1, int(n_genes))]
    else:
        genes = [genes] if isinstance(genes, str) else list(genes)
        order = pred.var_names.get_indexer(genes)
        if len(order) == 0 or (order < 0).any():
            raise ValueError(f"genes not in pred.var_names: {[g for g, i in zip(genes, order, strict=True) if i < 0]}.")
    names = pred.var_names[order]
    fig, ax = _axes(ax, figsize=(max(4.0, 0.7 * len(names) + 1.5), 4.0))
    rng = np.random.default_rng(seed)
    k = bulk.shape[0]
    x = np.repeat(np.arange(len(names)) - 0.15, k) + rng.uniform(-0.08, 0.08, k * len(names))
    ax.scatter(x, bulk[:, order].T.ravel(), s=14, alpha=0.7, color="tab:blue", linewidths=0, label=f"sampled (K={k})")
    if real is not None:
        if not isinstance(real, AnnData):
            raise TypeError(f"real must be an AnnData; got {type(real).__name__}.")
        missing = names.difference(real.var_names)
        if len(missing):
            raise ValueError(f"real lacks {len(missing)} of the genes drawn (e.g. {list(missing[:3])}).")
        groups = _real_groups(real, real.var_names.get_indexer(names), group_key, layer)
        values = np.stack(list(groups.values()))  # (n_groups, n_genes drawn)
        xr = np.repeat(np.arange(len(names)) + 0.15, len(groups))
        ax.scatter(xr, values.T.ravel(), s=30, marker="D", color="black", label=f"real ({len(groups)} groups)")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([str(n) for n in names], rotation=45, ha="right")
    ax.set_ylabel("pseudobulk (mean log1p expression)")
    ax.set_title("sampled populations vs real groups")
    ax.legend(frameon=False, fontsize=8)
    return ax


def _real_lfc_table(real_lfc, summary: pd.DataFrame) -> pd.DataFrame:
    """``real_lfc`` as a frame with ``gene``, ``real_lfc`` (and ``group``), restricted to the summary's condition."""
    if hasattr(real_lfc, "per_gene"):
        real_lfc = real_lfc.per_gene
    if isinstance(real_lfc, pd.Series):
        return pd.DataFrame({"gene": real_lfc.index.astype(str), "real_lfc": real_lfc.to_numpy(), "group": "real"})
    if not isinstance(real_lfc, pd.DataFrame) or not {"gene", "real_lfc"} <= set(real_lfc.columns):
        raise TypeError(
            "real_lfc must be a CalibrationResult, a DataFrame with 'gene' and 'real_lfc' columns (e.g. "
            "CalibrationResult.per_gene) or a Series of log fold changes indexed by gene."
        )
    table = real_lfc.copy()
    for col in ("perturbation", "context"):
        if col in table.columns and col in summary.columns:
            table = table[table[col].astype(str).isin(summary[col].astype(str).unique())]
    if "group" not in table.columns:
        table["group"] = "real"
    return table


def lfc_intervals(
    summary: pd.DataFrame,
    *,
    genes: Sequence[str] | None = None,
    n_top: int = 20,
    level: float = 0.8,
    real_lfc: pd.DataFrame | pd.Series | CalibrationResult | None = None,
    perturbation: str | None = None,
    context: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Forest plot of the predicted log fold changes with their central intervals, optionally real marks.

    One row per gene: the mean log fold change over the sampled populations (dot) and the central interval at
    ``level`` (line), from :func:`~perturbdiff_scvi.tl.population_summary` (its conformal intervals when it was
    given ``conformal=``; the legend says so). ``real_lfc`` adds each real group's
    log fold change (a cross per group, e.g. per donor), so that real values outside the lines are visible.

    Parameters
    ----------
    summary
        Output of :func:`~perturbdiff_scvi.tl.population_summary` with ``level`` among its levels.
    genes
        Genes to draw, top to bottom; ``None`` = the ``n_top`` genes with the largest ``|lfc_mean|``.
    n_top
        Genes drawn when ``genes`` is ``None``.
    level
        Interval level to draw.
    real_lfc
        Real log fold changes: a :class:`~perturbdiff_scvi.tl.CalibrationResult`, its ``per_gene`` table (any
        frame with ``gene``, ``real_lfc`` and optionally ``group`` columns) or a Series indexed by gene.
    perturbation, context
        The condition to draw when ``summary`` holds several.
    ax
        Axes to draw into; ``None`` = a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> summary = pdiff.tl.population_summary(pred, control, perturbation_key="condition")
    >>> ax = pdiff.pl.lfc_intervals(summary, n_top=15, level=0.8, real_lfc=result)
    """
    if not isinstance(summary, pd.DataFrame) or "lfc_mean" not in summary.columns:
        raise TypeError("summary must be the DataFrame returned by perturbdiff_scvi.tl.population_summary.")
    lo_col, hi_col = f"lfc_lower_{level_tag(level)}", f"lfc_upper_{level_tag(level)}"
    if lo_col not in summary.columns:
        have = sorted(c.removeprefix("lfc_lower_") for c in summary.columns if c.startswith("lfc_lower_"))
        raise ValueError(f"summary has no {level:g} interval (levels in percent: {have}); pass one of those.")
    table = summary
    for col, value in (("perturbation", perturbation), ("context", context)):
        if value is not None:
            table = table[table[col].astype(str) == str(value)]
    conditions = table[["perturbation", "context"]].astype(str).drop_duplicates()
    if len(conditions) != 1:
        raise ValueError(
            f"summary holds {len(conditions)} conditions {conditions.to_records(index=False).tolist()[:5]}; "
            "choose one with perturbation= (and context=)."
        )
    table = table.set_index("gene")
    if genes is None:
        genes = table["lfc_mean"].abs().sort_values(ascending=False, kind="stable").index[: max(1, int(n_top))]
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in table.index]
    if missing or not genes:
        raise ValueError(f"genes not in summary: {missing[:10]}.")
    rows = table.loc[genes]
    y = np.arange(len(genes))[::-1]
    fig, ax = _axes(ax, figsize=(4.5, max(3.0, 0.25 * len(genes) + 1.0)))
    kind = " conformal" if summary.attrs.get("lfc_intervals") == "conformal" else ""
    label = f"{level_tag(level)} %{kind} interval"
    ax.hlines(y, rows[lo_col], rows[hi_col], color="tab:blue", lw=2, alpha=0.6, label=label)
    ax.scatter(rows["lfc_mean"], y, s=16, color="tab:blue", zorder=3, label="predicted mean")
    if real_lfc is not None:
        marks = _real_lfc_table(real_lfc, summary)
        marks = marks[marks["gene"].astype(str).isin([str(g) for g in genes])]
        pos = dict(zip([str(g) for g in genes], y, strict=True))
        for i, (group, part) in enumerate(marks.groupby("group", sort=True)):
            ax.scatter(
                part["real_lfc"],
                [pos[str(g)] for g in part["gene"]],
                marker="x",
                s=28,
                color=f"C{(i + 1) % 10}",
                zorder=4,
                label=f"real {group}",
            )
    ax.axvline(0, color="0.6", lw=0.8, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels([str(g) for g in genes])
    ax.set_xlabel("log2 fold change vs control")
    ax.set_title("predicted log fold change across populations")
    ax.legend(frameon=False, fontsize=8, loc="best")
    return ax
