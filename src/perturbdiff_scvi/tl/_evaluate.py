"""evaluate(): score predicted populations against real held-out cells, methods side by side, in one tidy table."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_obs_column, dense_rows, expression_matrix
from ..metrics import (
    baseline_normalized_score,
    de_metrics,
    differential_expression,
    discrimination_score,
    e_distance,
    fit_pca,
    mae,
    mmd_rbf,
    mse,
    pearson_delta,
    r2_mean,
    top_de_genes,
)

#: Best value of each reported metric (1: higher is better, bounded by 1; 0: an error). Metrics with
#: another range (E-distance, MMD) get no normalised score.
METRIC_BEST: dict[str, int] = {
    "mae": 0,
    "mse": 0,
    "pearson_delta": 1,
    "pearson_delta_top100_de": 1,
    "r2_all": 1,
    "r2_top100_de": 1,
    "overlap_at_N": 1,
    "overlap_at_100": 1,
    "precision_at_N": 1,
    "de_direction_match": 1,
    "de_spearman_lfc_sig": 1,
    "roc_auc": 1,
    "pr_auc": 1,
    "discrimination_score_l1": 1,
    "discrimination_score_l2": 1,
    "discrimination_score_cosine": 1,
}


def _matrix(adata: AnnData, layer: str | None, rows: np.ndarray, name: str) -> np.ndarray:
    return dense_rows(expression_matrix(adata, layer, name=name), rows)


def _rows(adata: AnnData, key: str | None, value, extra: tuple[str, object] | None = None) -> np.ndarray:
    mask = np.ones(adata.n_obs, dtype=bool)
    if key is not None:
        mask &= (adata.obs[key].astype(str) == str(value)).to_numpy()
    if extra is not None and extra[0] is not None and extra[0] in adata.obs.columns:
        mask &= (adata.obs[extra[0]].astype(str) == str(extra[1])).to_numpy()
    return np.flatnonzero(mask)


def evaluate(
    predictions: AnnData | Mapping[str, AnnData],
    real: AnnData,
    control: AnnData,
    *,
    perturbation_key: str,
    context_key: str | None = None,
    pca_reference: AnnData | None = None,
    baseline: str | None = "cell_mean",
    layer: str | None = None,
    n_pcs: int = 50,
    fdr: float = 0.05,
    max_cells: int | None = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Score predictions of several methods against real held-out cells, one row per (method, condition, metric).

    A condition is a (perturbation, context) of ``real``; its control cells are those of ``control`` in the
    same context (all of ``control`` when it has no ``context_key`` column). For each method and condition:

    - ``mae``, ``mse`` of pseudobulk means; ``pearson_delta`` (all genes and the top-100 DE genes);
      ``r2_all`` and ``r2_top100_de`` of mean expression (top-100 DE genes: Wilcoxon, real vs control);
    - cell-eval's DE agreement (``overlap_at_N``, ``overlap_at_100``, ``precision_at_N``,
      ``de_direction_match``, ``de_spearman_lfc_sig``, ``roc_auc``, ``pr_auc``) from Mann-Whitney U + BH DE
      of real vs control and predicted vs control (see :func:`~perturbdiff_scvi.metrics.de_metrics`);
    - ``e_distance`` (Euclidean, pertpy) and ``mmd_rbf`` (multi-gamma, CellFlow) on a PCA with ``n_pcs``
      components fitted on ``pca_reference`` (real training cells; default: ``control`` and ``real``);
    - per method, across its conditions: ``discrimination_score_{l1,l2,cosine}`` (needs >= 2 conditions).

    ``normalized_score`` scores each bounded metric against the ``baseline`` method on the same
    condition with cell-eval's normalisation (``(u - b) / (1 - b)``, or ``1 - u / b`` for errors, clipped
    at 0); ``nan`` where it does not apply. DE metrics use the predictions as they are: apply
    :func:`~perturbdiff_scvi.metrics.zero_small_values` first for a realistic zero pattern.

    Parameters
    ----------
    predictions
        One AnnData (named ``"model"``) or ``{method name: AnnData}``, each shaped like
        ``predict_population`` output (same genes as ``real``; obs holds ``perturbation_key`` and
        ``context_key``).
    real
        Real perturbed cells of the held-out conditions.
    control
        Real control cells (of the same contexts).
    perturbation_key, context_key
        Obs columns naming the perturbation and the context.
    pca_reference
        Cells to fit the PCA of the distributional metrics on (real training cells).
    baseline
        Method to normalise against (the VCC cell-mean baseline by default); ``None`` skips it.
    layer
        Layer to read instead of ``X`` (in every AnnData).
    n_pcs, fdr
        PCA components; DE significance threshold.
    max_cells, seed
        Cap on cells per set for the distributional metrics and DE (random subsample), and its seed.

    Returns
    -------
    DataFrame with columns ``method``, ``perturbation``, ``context``, ``metric``, ``value``,
    ``normalized_score``.

    Examples
    --------
    >>> from perturbdiff_scvi import baselines, tl
    >>> table = tl.evaluate({"PerturbDiff": pred, "cell_mean": cm}, real, control,
    ...                     perturbation_key="condition", context_key="cell_type")
    >>> table.pivot_table(index="metric", columns="method", values="value")
    """
    preds = {"model": predictions} if isinstance(predictions, AnnData) else dict(predictions)
    for what, obj in {"real": real, "control": control, "pca_reference": pca_reference, **preds}.items():
        if obj is not None and not isinstance(obj, AnnData):
            raise TypeError(f"{what} must be an AnnData; got {type(obj).__name__}.")
    for arg, key in (("perturbation_key", perturbation_key), ("context_key", context_key)):
        check_obs_column(real.obs, key, arg, where="real.obs")
        for name, ad in preds.items():
            check_obs_column(ad.obs, key, arg, where=f"predictions[{name!r}].obs")
    for name, ad in preds.items():
        if not ad.var_names.equals(real.var_names):
            raise ValueError(
                f"predictions[{name!r}] has other genes than `real` (or another order); align them with "
                "pred[:, real.var_names]."
            )
    if not control.var_names.equals(real.var_names):
        raise ValueError("`control` has other genes than `real` (or another order); use control[:, real.var_names].")
    if baseline is not None and baseline not in preds:
        raise ValueError(
            f"baseline={baseline!r} is not one of the methods {list(preds)}; pass baseline=None or add "
            "it (e.g. perturbdiff_scvi.baselines.cell_mean_baseline)."
        )
    rng = np.random.default_rng(seed)
    pca = fit_pca(
        _matrix(pca_reference, layer, np.arange(pca_reference.n_obs), "pca_reference")
        if pca_reference is not None
        else np.vstack(
            [
                _matrix(control, layer, np.arange(control.n_obs), "control"),
                _matrix(real, layer, np.arange(real.n_obs), "real"),
            ]
        ),
        n_comps=n_pcs,
        seed=seed,
    )
    keys = [perturbation_key] + ([context_key] if context_key is not None else [])
    conditions = real.obs[keys].astype(str).drop_duplicates().itertuples(index=False, name=None)
    records, deltas = [], {m: ({}, {}) for m in preds}
    for cond in conditions:
        pert, ctx = cond[0], (cond[1] if context_key is not None else None)
        r = _matrix(real, layer, _rows(real, perturbation_key, pert, (context_key, ctx)), "real")
        ctrl_key = context_key if context_key in control.obs.columns else None
        c = _cap(_matrix(control, layer, _rows(control, ctrl_key, ctx), "control"), max_cells, rng)
        if len(c) == 0:
            raise ValueError(f"`control` has no cell of context {ctx!r}; pass control cells of every held-out context.")
        top = top_de_genes(r, c, n=min(100, r.shape[1]))
        real_de = differential_expression(_cap(r, max_cells, rng), c)
        r_pcs = pca(_cap(r, max_cells, rng))
        for method, ad in preds.items():
            rows = _rows(ad, perturbation_key, pert, (context_key, ctx))
            if len(rows) == 0:
                continue
            p = _matrix(ad, layer, rows, f"predictions[{method!r}]")
            values = {
                "mae": mae(p, r),
                "mse": mse(p, r),
                "pearson_delta": pearson_delta(p, r, c),
                "pearson_delta_top100_de": pearson_delta(p, r, c, genes=top),
                "r2_all": r2_mean(p, r),
                "r2_top100_de": r2_mean(p, r, genes=top),
                "e_distance": e_distance(pca(_cap(p, max_cells, rng)), r_pcs),
                "mmd_rbf": mmd_rbf(pca(_cap(p, max_cells, rng)), r_pcs),
            }
            de = de_metrics(real_de, differential_expression(_cap(p, max_cells, rng), c), fdr=fdr, k_values=(100,))
            values.update(
                {
                    k: de[k]
                    for k in (
                        "overlap_at_N",
                        "overlap_at_100",
                        "precision_at_N",
                        "de_direction_match",
                        "de_spearman_lfc_sig",
                        "roc_auc",
                        "pr_auc",
                    )
                }
            )
            records += [(method, pert, ctx, k, float(v)) for k, v in values.items()]
            name = f"{pert}|{ctx}"
            deltas[method][0][name] = p.mean(0) - c.mean(0)
            deltas[method][1][name] = r.mean(0) - c.mean(0)
    for method, (pred_d, real_d) in deltas.items():
        if len(real_d) < 2:
            continue
        for metric in ("l1", "l2", "cosine"):
            for name, v in discrimination_score(pred_d, real_d, metric=metric).items():
                pert, ctx = name.split("|", 1)
                records.append((method, pert, None if ctx == "None" else ctx, f"discrimination_score_{metric}", v))
    table = pd.DataFrame(records, columns=["method", "perturbation", "context", "metric", "value"])
    table["normalized_score"] = np.nan
    if baseline is not None and len(table):
        keys = ["perturbation", "context", "metric"]
        base = table.loc[table["method"] == baseline, [*keys, "value"]].rename(columns={"value": "_base"})
        table = table.merge(base, on=keys, how="left")
        for best in (0, 1):
            rows = table["metric"].map(METRIC_BEST).eq(best) & (table["method"] != baseline)
            table.loc[rows, "normalized_score"] = baseline_normalized_score(
                table.loc[rows, "value"].to_numpy(), table.loc[rows, "_base"].to_numpy(), best=best
            )
        table = table.drop(columns="_base")
    return table


def _cap(x: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or len(x) <= max_cells:
        return x
    return x[np.sort(rng.choice(len(x), max_cells, replace=False))]
