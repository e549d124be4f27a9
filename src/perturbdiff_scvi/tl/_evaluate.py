"""evaluate(): score predicted populations against real held-out cells, methods side by side, in one tidy table."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_obs_column, dense_rows, expression_matrix
from ..metrics import (
    PCAProjection,
    baseline_normalized_score,
    c2st_auroc,
    de_metrics,
    detected_genes,
    differential_expression,
    discrimination_score,
    e_distance,
    fit_pca,
    knn_mixing,
    mae,
    max_over_training,
    mmd_rbf,
    mse,
    out_of_range_fraction,
    pearson_delta,
    r2_mean,
    spread_ratio,
    top_de_genes,
)

#: Best value of each reported metric (1: higher is better, bounded by 1; 0: an error). Metrics with
#: another range get no normalised score: E-distance, MMD, ``c2st_auroc`` (best 0.5, not 0 or 1),
#: ``knn_mixing``, ``detected_genes_ratio`` and ``max_over_training`` (best 1 but not bounded by it).
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
    "spread_ratio_mean_abs_log": 0,
    "out_of_range_fraction": 0,
}

#: Realism rows of :func:`evaluate` (``realism=True``), in the order they are added.
REALISM_METRICS: tuple[str, ...] = (
    "c2st_auroc",
    "knn_mixing",
    "spread_ratio_mean_abs_log",
    "detected_genes_ratio",
    "out_of_range_fraction",
    "max_over_training",
)

#: Spread ratios are clipped to [1/1000, 1000] before the log, so a collapsed set (ratio 0) scores log(1000).
_SPREAD_CLIP = 1e3


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
    realism: bool = True,
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
    - per method, across its conditions: ``discrimination_score_{l1,l2,cosine}`` (needs >= 2 conditions);
    - with ``realism=True`` (default), whether the predicted cells look like a sample of real cells
      (:mod:`perturbdiff_scvi.metrics` realism functions, on the same PCA, cells capped at ``max_cells``,
      seeded with ``seed``):

      - ``c2st_auroc``: random-forest classifier two-sample test, 5 folds, first ``min(30, n_pcs)`` PCs;
        0.5 = indistinguishable, 1 = separable;
      - ``knn_mixing``: share of real cells among the 15 nearest neighbours of predicted cells over its value
        under perfect mixing, same PCs; 1 = mixed, 0 = separate;
      - ``spread_ratio_mean_abs_log``: ``mean_k |log(std_k pred / std_k real)|`` over the first 10 PCs,
        ratios clipped to [1e-3, 1e3] (a collapsed set scores log(1000) = 6.9); 0 = same spread;
      - ``detected_genes_ratio``: mean genes > 0 per predicted cell over the same per real cell; 1 = as
        sparse as real;
      - ``out_of_range_fraction``: share of predicted values above the per-gene maximum or below the minimum
        of ``pca_reference`` (of ``control`` and ``real`` without it); 0 ideal;
      - ``max_over_training``: largest per-gene ratio of the predicted to the reference maximum.

      ``nan`` for the first three where a set has fewer than 2 cells. Pass ``pca_reference`` (real training
      cells): a PCA fitted on the held-out cells themselves favours them in the first three.

    ``normalized_score`` scores each bounded metric against the ``baseline`` method on the same
    condition with cell-eval's normalisation (``(u - b) / (1 - b)``, or ``1 - u / b`` for errors, clipped
    at 0); ``nan`` where it does not apply (it applies to the metrics in ``METRIC_BEST``; not to
    ``c2st_auroc``, whose best value is 0.5). DE metrics use the predictions as they are: apply
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
        Cap on cells per set for the distributional, realism and DE metrics (random subsample), and its seed.
        The realism metrics draw their own subsamples from ``seed``, so they leave the other rows unchanged.
    realism
        Add the realism rows (listed above; ``REALISM_METRICS``). They cost most of the time of ``evaluate``
        (the classifier is fitted 5 times per method and condition): pass ``False`` to skip them.

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
    if not isinstance(realism, (bool, np.bool_)):
        raise TypeError(f"realism must be True or False; got {realism!r}.")
    rng = np.random.default_rng(seed)
    reference = (
        _matrix(pca_reference, layer, np.arange(pca_reference.n_obs), "pca_reference")
        if pca_reference is not None
        else np.vstack(
            [
                _matrix(control, layer, np.arange(control.n_obs), "control"),
                _matrix(real, layer, np.arange(real.n_obs), "real"),
            ]
        )
    )
    pca = fit_pca(reference, n_comps=n_pcs, seed=seed)
    # Two rows with the per-gene minimum and maximum: the same range as the whole reference, far smaller.
    gene_range = np.vstack([reference.min(axis=0), reference.max(axis=0)]) if realism else None
    del reference
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
            if realism:
                values.update(_realism_values(p, r, pca, gene_range, max_cells, seed))
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


def _realism_values(
    p: np.ndarray,
    r: np.ndarray,
    pca: PCAProjection,
    gene_range: np.ndarray,
    max_cells: int | None,
    seed: int,
) -> dict[str, float]:
    """The realism rows of one (method, condition); ``nan`` for the set-level ones when a set has < 2 cells."""
    values = dict.fromkeys(REALISM_METRICS, np.nan)
    n = min(len(p), len(r), max_cells if max_cells is not None else len(p))
    if n >= 2:
        values["c2st_auroc"] = c2st_auroc(p, r, pca=pca, n_pcs=30, n_folds=min(5, n), max_cells=max_cells, seed=seed)
        values["knn_mixing"] = knn_mixing(p, r, pca=pca, n_pcs=30, k=min(15, 2 * n - 1), max_cells=max_cells, seed=seed)
        ratio = spread_ratio(p, r, pca=pca, n_pcs=10)
        ratio = np.abs(np.log(np.clip(ratio[np.isfinite(ratio)], 1.0 / _SPREAD_CLIP, _SPREAD_CLIP)))
        values["spread_ratio_mean_abs_log"] = float(ratio.mean()) if ratio.size else np.nan
    real_detected = detected_genes(r).mean()
    if real_detected > 0:
        values["detected_genes_ratio"] = float(detected_genes(p).mean() / real_detected)
    values["out_of_range_fraction"] = out_of_range_fraction(p, gene_range)
    values["max_over_training"] = max_over_training(p, gene_range)
    return values


def _cap(x: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or len(x) <= max_cells:
        return x
    return x[np.sort(rng.choice(len(x), max_cells, replace=False))]
