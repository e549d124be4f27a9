"""population_summary(): how the K sampled populations of each condition spread, gene by gene.

The helpers here (condition keys, gene alignment, pseudobulk, log fold change, central intervals) are shared with
:func:`~perturbdiff_scvi.tl.calibration`, so that the intervals it checks are the ones this summary reports.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_obs_column, dense_rows, expression_matrix
from ..metrics import energy_distance, fit_pca
from ._conformal import ConformalIntervals, check_conformal

#: Default pseudocount of the log fold change, in normalised-expression units (``expm1`` of log1p data).
DEFAULT_PSEUDOCOUNT = 0.1
#: Default central-interval levels of :func:`population_summary`.
SUMMARY_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.95)


# --------------------------------------------------------------------------- shared helpers


def level_tag(level: float) -> str:
    """Column suffix of an interval level: ``0.8 -> "80"``, ``0.975 -> "97.5"``."""
    pct = round(100 * float(level), 6)
    return str(int(pct)) if float(pct).is_integer() else f"{pct:g}"


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Levels as a sorted tuple of distinct floats in ``(0, 1)``."""
    if isinstance(levels, int | float):
        levels = (levels,)
    out = tuple(sorted({float(v) for v in levels}))
    if not out or any(not np.isfinite(v) or not 0 < v < 1 for v in out):
        raise ValueError(f"levels must be numbers strictly between 0 and 1 (e.g. (0.5, 0.8, 0.95)); got {levels!r}.")
    return out


def check_pseudocount(pseudocount: float) -> float:
    if isinstance(pseudocount, bool) or not isinstance(pseudocount, int | float) or not pseudocount > 0:
        raise ValueError(f"pseudocount must be a number > 0 (normalised-expression units); got {pseudocount!r}.")
    return float(pseudocount)


def condition_keys(pred: AnnData, perturbation_key: str | None, context_key: str | None) -> tuple[str, str | None]:
    """The perturbation and context columns: as given, else as recorded in ``pred.uns["perturbdiff"]``."""
    recorded = pred.uns.get("perturbdiff", {}) if isinstance(pred.uns.get("perturbdiff"), dict) else {}
    if perturbation_key is None:
        perturbation_key = recorded.get("perturbation_key")
        if perturbation_key is None:
            raise ValueError(
                "perturbation_key is required: pred.uns['perturbdiff'] does not record it. Pass the obs column "
                f"naming the perturbation (one of {list(pred.obs.columns)})."
            )
    if context_key is None:
        context_key = recorded.get("context_key")
        context_key = None if context_key in (None, "None") else context_key
    check_obs_column(pred.obs, perturbation_key, "perturbation_key", where="pred.obs")
    check_obs_column(pred.obs, context_key, "context_key", where="pred.obs")
    return perturbation_key, context_key


def population_codes(pred: AnnData, population_key: str) -> np.ndarray:
    """The population label of every cell of ``pred``, with a clear error when the column is missing."""
    if population_key not in pred.obs.columns:
        raise KeyError(
            f"pred.obs has no population column {population_key!r} (columns: {list(pred.obs.columns)}). "
            "Predict several populations with model.predict_population(..., n_populations=K), or pass "
            "population_key= naming the column that tells them apart."
        )
    values = pred.obs[population_key]
    if values.isna().any():
        raise ValueError(f"pred.obs[{population_key!r}] has missing values.")
    return values.astype(str).to_numpy()


def gene_columns(pred: AnnData, others: dict[str, AnnData], genes: Sequence[str] | None) -> tuple[pd.Index, dict]:
    """The genes reported (``genes`` or all of ``pred``) and their column positions in every object."""
    for name, a in {"pred": pred, **others}.items():
        if not isinstance(a, AnnData):
            raise TypeError(f"{name} must be an AnnData; got {type(a).__name__}.")
        if not a.var_names.is_unique:
            raise ValueError(f"{name}.var_names are not unique; run {name}.var_names_make_unique() first.")
    names = pred.var_names
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise ValueError("genes is empty; pass None for all genes of pred.")
        missing = [g for g in genes if g not in names]
        if missing:
            raise ValueError(f"genes not in pred.var_names: {missing[:10]}.")
        names = pd.Index(genes)
    cols = {"pred": pred.var_names.get_indexer(names)}
    for name, a in others.items():
        idx = a.var_names.get_indexer(names)
        if (idx < 0).any():
            lacking = list(names[idx < 0][:5])
            raise ValueError(
                f"{name} lacks {int((idx < 0).sum())} of the {len(names)} genes of pred (e.g. {lacking}); "
                f"pass {name} with the predicted genes (e.g. {name}[:, pred.var_names])."
            )
        cols[name] = idx
    return names, cols


def select(adata: AnnData, **values) -> np.ndarray:
    """Row positions whose obs columns equal the given values (as strings); a ``None`` column is skipped."""
    mask = np.ones(adata.n_obs, dtype=bool)
    for key, value in values.items():
        if key is not None and value is not None:
            mask &= (adata.obs[key].astype(str) == str(value)).to_numpy()
    return np.flatnonzero(mask)


def matrix(adata: AnnData, rows: np.ndarray, cols: np.ndarray, layer: str | None, name: str) -> np.ndarray:
    """Dense float64 ``(len(rows), len(cols))`` expression (log1p values)."""
    return dense_rows(expression_matrix(adata, layer, name=name), rows)[:, cols]


def lfc(x: np.ndarray, control_linear_mean: np.ndarray, pseudocount: float) -> np.ndarray:
    """Pseudobulk log2 fold change of the cells ``x`` (log1p, ``(n_cells, n_genes)``) against a control.

    ``log2((mean_i expm1(x_ig) + pc) / (c_g + pc))`` with ``c_g = mean expm1`` of the control cells
    (``control_linear_mean``): the ratio of mean normalised expression, as scanpy's ``logfoldchanges``.
    """
    return np.log2((np.expm1(x).mean(0) + pseudocount) / (control_linear_mean + pseudocount))


def central_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-column central interval of ``samples`` ``(K, G)`` at ``level``: the ``(1 -/+ level) / 2`` quantiles.

    Quantiles use ``method="weibull"`` (position ``p (K + 1)``), under which a new draw exchangeable with the
    ``K`` samples falls inside with probability ``level`` (up to interpolation), whereas numpy's default
    (position ``p (K - 1) + 1``) covers only about ``level (K - 1) / (K + 1)``: 65 % for ``level=0.8``, ``K=10``.
    Levels above ``(K - 1) / (K + 1)`` cannot be reached: the interval is then ``[min, max]``.
    """
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0, method="weibull")
    return lo, hi


def populations_of(
    pred: AnnData, rows: np.ndarray, pops: np.ndarray, cols: np.ndarray, layer: str | None
) -> list[np.ndarray]:
    """The cells ``(n_k, G)`` of each population among ``rows``, in sorted population order."""
    labels = pops[rows]
    order = sorted(set(labels.tolist()), key=lambda v: (len(v), v))  # "2" before "10"
    x = matrix(pred, rows, cols, layer, "pred")
    return [x[labels == p] for p in order]


# --------------------------------------------------------------------------- E-distance spread


def _edistance_spread(
    populations: list[np.ndarray], project, max_cells: int | None, rng: np.random.Generator
) -> dict[str, float]:
    """Mean / sd / min / max of the pairwise E-distances between populations (``nan`` for fewer than 2)."""
    sets = []
    for x in populations:
        if max_cells is not None and len(x) > max_cells:
            x = x[np.sort(rng.choice(len(x), max_cells, replace=False))]
        sets.append(project(x))
    d = np.array([energy_distance(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))])
    if d.size == 0:
        return dict.fromkeys(("edist_mean", "edist_sd", "edist_min", "edist_max"), np.nan)
    return {
        "edist_mean": float(d.mean()),
        "edist_sd": float(d.std(ddof=1)) if d.size > 1 else np.nan,
        "edist_min": float(d.min()),
        "edist_max": float(d.max()),
    }


# --------------------------------------------------------------------------- population_summary


def population_summary(
    pred: AnnData,
    control: AnnData,
    *,
    perturbation_key: str | None = None,
    context_key: str | None = None,
    population_key: str = "population",
    levels: Sequence[float] = SUMMARY_LEVELS,
    genes: Sequence[str] | None = None,
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
    layer: str | None = None,
    n_pcs: int | None = 50,
    max_cells: int | None = 500,
    seed: int = 0,
    key_added: str | None = None,
    conformal: ConformalIntervals | None = None,
) -> pd.DataFrame:
    """Per condition and gene: how the sampled populations spread, with intervals and P(up) / P(down).

    A condition is a (perturbation, context) of ``pred``; its control cells are those of ``control`` in the same
    context (all of ``control`` when it has no ``context_key`` column). For each of the ``K`` populations of a
    condition (``pred.obs[population_key]``), and each gene ``g``:

    - pseudobulk expression ``e_kg = mean_i x_ig`` over the population's cells (log1p scale, as
      :func:`~perturbdiff_scvi.pl.delta_scatter`);
    - log fold change against the control,
      ``lfc_kg = log2((mean_i expm1(x_ig) + pc) / (mean_j expm1(c_jg) + pc))``: the log2 ratio of mean
      normalised expression, with the pseudocount ``pc`` (``pseudocount``) damping genes near zero in both.

    Across the ``K`` populations it reports their mean, standard deviation (``ddof=1``) and central intervals
    (``(1 -/+ level) / 2`` quantiles, ``method="weibull"``, so that a new population exchangeable with the
    sampled ones falls inside with probability ``level``: see :func:`~perturbdiff_scvi.tl.calibration`), and
    ``p_up`` / ``p_down``: the share of populations with ``lfc > 0`` / ``< 0``. Per condition, the spread of the
    ``K (K - 1) / 2`` pairwise E-distances between populations
    (:func:`~perturbdiff_scvi.metrics.energy_distance`) on a PCA with ``n_pcs`` components fitted on the control
    cells, over all genes of ``pred`` (``n_pcs=None``: on the genes themselves), repeated on every row of the
    condition.

    Parameters
    ----------
    pred
        Predicted cells, e.g. ``model.predict_population(..., n_populations=K)`` (log1p expression).
    control
        Real control cells holding every gene of ``pred`` (aligned by name).
    perturbation_key, context_key
        Obs columns of ``pred`` naming the perturbation and the context. ``None``: as recorded in
        ``pred.uns["perturbdiff"]`` (``perturbation_key`` is then required if it is not recorded;
        ``context_key`` stays ``None``, one context).
    population_key
        Obs column telling the populations apart.
    levels
        Nominal levels of the central intervals.
    genes
        Genes to report; ``None`` = all genes of ``pred``.
    pseudocount
        Pseudocount of the log fold change, in normalised-expression units (``expm1`` of ``X``).
    layer
        Layer of ``pred`` and ``control`` to read instead of ``X``.
    n_pcs, max_cells, seed
        PCA components of the E-distances (``None``: genes), cells per population used for them (random
        subsample; ``None`` = all) and the seed of that subsample.
    key_added
        Also store the table in ``pred.uns[key_added]`` (nothing else of ``pred`` changes); ``None`` = only
        return it.
    conformal
        Log-fold-change intervals that include the model's own error: ``lfc_lower_<L>`` / ``lfc_upper_<L>``
        become ``lfc_mean -/+ q_L (lfc_sd + offset)`` of :func:`~perturbdiff_scvi.tl.conformal_intervals`,
        learnt on held-out real populations (``attrs["lfc_intervals"]`` says ``"conformal"``). The central
        intervals of the samples alone (``None``, the default) show population-to-population variability only
        and are far too narrow for the model's error on unseen contexts (``benchmarks/README.md``). ``p_up``,
        ``p_down`` and the expression intervals stay those of the samples.

    Returns
    -------
    DataFrame, one row per (condition, gene), with columns ``perturbation``, ``context`` (``None`` without
    ``context_key``), ``gene``, ``n_populations``, ``n_cells`` (mean cells per population), ``control_expr``
    (control pseudobulk, log1p), ``expr_mean``, ``expr_sd``, ``expr_lower_<L>``, ``expr_upper_<L>``,
    ``lfc_mean``, ``lfc_sd``, ``lfc_lower_<L>``, ``lfc_upper_<L>``, ``p_up``, ``p_down``, ``edist_mean``,
    ``edist_sd``, ``edist_min``, ``edist_max``, where ``<L>`` is the level in percent (``80``). ``attrs`` holds the
    levels, pseudocount and the E-distance space. With one population per condition the spreads and intervals
    are ``nan`` (with a warning); the means are still given.

    Examples
    --------
    >>> pred = model.predict_population("stimulated", contexts="CD4T", n_populations=20, seed=0)
    >>> summary = pdiff.tl.population_summary(pred, control, perturbation_key="condition", context_key="cell_type")
    >>> summary.sort_values("lfc_mean").tail()[["gene", "lfc_mean", "lfc_lower_80", "lfc_upper_80", "p_up"]]
    """
    levels = check_levels(levels)
    pseudocount = check_pseudocount(pseudocount)
    check_conformal(conformal)
    perturbation_key, context_key = condition_keys(pred, perturbation_key, context_key)
    pops = population_codes(pred, population_key)
    names, cols = gene_columns(pred, {"control": control}, genes)
    if n_pcs is not None:
        all_cols = control.var_names.get_indexer(pred.var_names)
        if (all_cols < 0).any():
            raise ValueError("control lacks genes of pred; pass control[:, pred.var_names].")
        reference = matrix(control, np.arange(control.n_obs), all_cols, layer, "control")
        pca = fit_pca(reference, n_comps=min(int(n_pcs), *reference.shape), seed=seed)
        del reference
        edist_cols, project = np.arange(pred.n_vars), pca
    else:
        edist_cols, project = cols["pred"], lambda x: x
    keys = [perturbation_key] + ([context_key] if context_key is not None else [])
    conditions = pred.obs[keys].astype(str).drop_duplicates().itertuples(index=False, name=None)
    ctrl_ctx_key = context_key if context_key is not None and context_key in control.obs.columns else None
    rng = np.random.default_rng(seed)
    frames, single = [], []
    for cond in conditions:
        pert, ctx = cond[0], (cond[1] if context_key is not None else None)
        rows = select(pred, **{perturbation_key: pert}, **({context_key: ctx} if context_key else {}))
        c_rows = select(control, **({ctrl_ctx_key: ctx} if ctrl_ctx_key else {}))
        if len(c_rows) == 0:
            raise ValueError(f"control has no cell of context {ctx!r}; pass control cells of every predicted context.")
        ctrl = matrix(control, c_rows, cols["control"], layer, "control")
        ctrl_linear = np.expm1(ctrl).mean(0)
        populations = populations_of(pred, rows, pops, cols["pred"], layer)
        k = len(populations)
        if k < 2:
            single.append((pert, ctx))
        expr = np.stack([x.mean(0) for x in populations])  # (K, G)
        lfcs = np.stack([lfc(x, ctrl_linear, pseudocount) for x in populations])  # (K, G)
        frame = {
            "perturbation": pert,
            "context": ctx,
            "gene": names.to_numpy(),
            "n_populations": k,
            "n_cells": float(np.mean([len(x) for x in populations])),
            "control_expr": ctrl.mean(0),
        }
        for what, values in (("expr", expr), ("lfc", lfcs)):
            frame[f"{what}_mean"] = values.mean(0)
            frame[f"{what}_sd"] = values.std(0, ddof=1) if k > 1 else np.full(len(names), np.nan)
            for level in levels:
                if k < 2:
                    lo, hi = (np.full(len(names), np.nan),) * 2
                elif what == "lfc" and conformal is not None:
                    lo, hi = conformal.interval(frame["lfc_mean"], frame["lfc_sd"], level)
                else:
                    lo, hi = central_interval(values, level)
                frame[f"{what}_lower_{level_tag(level)}"] = lo
                frame[f"{what}_upper_{level_tag(level)}"] = hi
        frame["p_up"] = (lfcs > 0).mean(0)
        frame["p_down"] = (lfcs < 0).mean(0)
        edist_pops = populations_of(pred, rows, pops, edist_cols, layer) if n_pcs is not None else populations
        frame.update(_edistance_spread(edist_pops, project, max_cells, rng))
        frames.append(pd.DataFrame(frame))
    if single:
        warnings.warn(
            f"{len(single)} condition(s) have a single population (e.g. {single[0]}): their spreads and intervals "
            "are nan. Predict with n_populations >= 2 (e.g. 20) for intervals.",
            UserWarning,
            stacklevel=2,
        )
    table = pd.concat(frames, ignore_index=True)
    table.attrs.update(
        {
            "levels": list(levels),
            "pseudocount": pseudocount,
            "lfc": "log2((mean expm1(x) + pseudocount) / (mean expm1(control) + pseudocount))",
            "edistance_space": "genes" if n_pcs is None else f"PCA of control ({pca.n_comps} components)",
            "perturbation_key": perturbation_key,
            "context_key": context_key,
            "lfc_intervals": "sampled" if conformal is None else "conformal",
        }
    )
    if key_added is not None:
        pred.uns[key_added] = table
    return table
