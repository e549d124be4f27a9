"""Reference baselines for population prediction: control, cell-mean, additive shift, pooled, linear, ceiling."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._combinations import check_delimiter, split_combination
from .._context_kernel import kernel_weights
from .._output import population_adata
from .._validation import check_distinct_keys, dense_rows, is_finite_number, optional_seed
from ._common import (
    BaselineInput,
    categorical,
    fill_doc,
    group_means,
    matrix,
    mean_rows,
    obs_column,
)

_RIDGE = 0.01


@fill_doc
def control_baseline(
    adata: AnnData,
    perturbation,
    context,
    *,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    seed: int | None = 0,
) -> AnnData:
    r"""Predict "no effect": control cells of the context, unchanged.

    .. math:: \hat x_i = x^{\mathrm{ctrl}, c}_{j_i}, \qquad j_i \sim \mathrm{Uniform}\{1, \dots, n_{\mathrm{ctrl}, c}\}

    The ``n_cells`` cells are drawn without replacement when the context has at least that many control
    cells, else with replacement; the default ``n_cells`` returns every control cell of the context in a
    random order. Scores high on all-gene R² despite predicting no response (design notes, §2.3), so always
    read it with top-DEG and delta metrics.

    Parameters
    ----------
    %(common_params)s

    Returns
    -------
    %(returns)s

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import control_baseline
    >>> pred = control_baseline(
    ...     train, "stimulated", "CD4T", perturbation_key="condition", control_value="control", context_key="cell_type"
    ... )
    >>> pred.obs["condition"].unique().tolist(), pred.obs["population"].unique().tolist()
    (['stimulated'], [0])
    """
    data = BaselineInput(
        adata,
        perturbation,
        context,
        perturbation_key=perturbation_key,
        control_value=control_value,
        context_key=context_key,
        batch_key=batch_key,
        layer=layer,
        n_cells=n_cells,
        seed=seed,
    )
    source = data.draw_controls(data.rng())
    return data.assemble("control", dense_rows(data.x, source), source)


@fill_doc
def cell_mean_baseline(
    adata: AnnData,
    perturbation,
    context,
    *,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    seed: int | None = 0,
) -> AnnData:
    r"""The Virtual Cell Challenge "cell-mean" baseline: every cell is the mean of all perturbed training cells.

    .. math:: \hat x_i = \frac{1}{|P|} \sum_{j \in P} x_j, \qquad
              P = \{ j : p_j \neq \mathrm{ctrl},\ (p_j, c_j) \neq (p, c) \}

    pooled over every perturbation and context (cells weighted equally). All rows are identical. The
    perturbation and context only label the output, so the perturbation may be unseen in ``adata``. The
    rows' batch labels (with ``batch_key``) come from a draw of control cells of the context, the same draw
    as :func:`control_baseline` with the same seed (recorded in ``uns["baseline"]["source_cells"]``).

    Parameters
    ----------
    %(common_params)s

    Returns
    -------
    %(returns)s

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import cell_mean_baseline
    >>> pred = cell_mean_baseline(
    ...     train, "KLF1+ctrl", "K562", perturbation_key="perturbation", control_value="control",
    ...     context_key="cell_line",
    ... )
    >>> bool((pred.X == pred.X[0]).all())
    True
    """
    data = BaselineInput(
        adata,
        perturbation,
        context,
        perturbation_key=perturbation_key,
        control_value=control_value,
        context_key=context_key,
        batch_key=batch_key,
        layer=layer,
        n_cells=n_cells,
        seed=seed,
    )
    perturbed = ~data.control & data.train
    if not perturbed.any():
        raise ValueError("adata has no perturbed (non-control) training cells to average.")
    source = data.draw_controls(data.rng())
    mean = mean_rows(data.x, perturbed)
    x = np.broadcast_to(mean, (len(source), mean.size))
    return data.assemble("cell_mean", x, source, {"n_cells_averaged": int(perturbed.sum())})


@fill_doc
def additive_shift_baseline(
    adata: AnnData,
    perturbation,
    context,
    *,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    seed: int | None = 0,
    average: Literal["contexts", "cells", "kernel"] = "contexts",
) -> AnnData:
    r"""Control cells of the context shifted by the perturbation's mean effect in the other contexts.

    .. math:: \hat x_i = \max\!\left(0,\; x^{\mathrm{ctrl}, c}_{j_i} + \Delta\right)

    With ``average="contexts"`` (default), :math:`\Delta` is the mean over the other contexts
    :math:`c' \in C` of each context's own shift, so unequal cell numbers do not mix in context effects:

    .. math:: \Delta = \frac{1}{|C|} \sum_{c' \in C} \left( \bar x_{p, c'} - \bar x_{\mathrm{ctrl}, c'} \right)

    With ``average="cells"``, the cells of all those contexts are pooled (the scGen-style "delta"):
    :math:`\Delta = \bar x_{p, C} - \bar x_{\mathrm{ctrl}, C}`. With ``average="kernel"``, the per-context
    shifts are weighted by how close each context's control cells are to those of ``context``,
    :math:`w_{c'} = \exp(-(d_{c'} / \min_{c''} d_{c''})^2)` with :math:`d_{c'} = \lVert \bar x_{\mathrm{ctrl}, c'}
    - \bar x_{\mathrm{ctrl}, c} \rVert` (the kernel of ``predict_population(guidance_scale="auto")``), so that
    a held-out cell type takes the response of the types that resemble it. :math:`C` is the set of contexts other
    than ``context`` that have cells of ``perturbation`` and control cells; the control cells :math:`j_i`
    are the same draw as :func:`control_baseline` with the same seed. Predictions are dense: setting small
    values to 0 changes DES a lot (design notes, §2.3).

    Parameters
    ----------
    %(common_params)s
    average
        ``"contexts"``: mean of the per-context shifts; ``"cells"``: shift of the pooled cell means;
        ``"kernel"``: per-context shifts weighted by the closeness of the contexts' control means (see above).

    Returns
    -------
    %(returns)s
        ``uns["baseline"]`` also holds ``shift`` (:math:`\Delta`, float32 per gene), ``average`` and
        ``other_contexts`` (and, for ``average="kernel"``, ``weights``: each other context's share of the shift).

    Raises
    ------
    ValueError
        If ``context_key`` is ``None`` or the perturbation has no cells in another context with controls.

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import additive_shift_baseline
    >>> pred = additive_shift_baseline(
    ...     train, "stimulated", "CD4T", perturbation_key="condition", control_value="control", context_key="cell_type"
    ... )
    >>> list(pred.uns["baseline"]["other_contexts"])  # the cell types the shift was estimated on
    ['B', 'CD14+Mono', ...]
    """
    if average not in ("contexts", "cells", "kernel"):
        raise ValueError(f"average must be 'contexts', 'cells' or 'kernel', got {average!r}.")
    if context_key is None:
        raise ValueError("additive_shift_baseline needs other contexts to estimate the shift; context_key is None.")
    data = BaselineInput(
        adata,
        perturbation,
        context,
        perturbation_key=perturbation_key,
        control_value=control_value,
        context_key=context_key,
        batch_key=batch_key,
        layer=layer,
        n_cells=n_cells,
        seed=seed,
    )
    pert_cells = data.seen_perturbation()
    others = [c for c in data.context_order(data.ctx[pert_cells]) if (data.control & (data.ctx == c)).any()]
    if not others:
        raise ValueError(
            f"The perturbation {perturbation!r} is seen in no other context with control cells (it has training "
            f"cells only in contexts without controls), so its shift cannot be estimated."
        )
    weights = None
    if average in ("contexts", "kernel"):
        control_means = np.stack([mean_rows(data.x, data.control & (data.ctx == c)) for c in others])
        per_context = np.stack([mean_rows(data.x, pert_cells & (data.ctx == c)) for c in others]) - control_means
        if average == "contexts":
            shift = per_context.mean(axis=0)
        else:
            here = mean_rows(data.x, data.control & data.in_context)
            weights = kernel_weights(np.linalg.norm(control_means - here, axis=1))
            weights = weights / weights.sum()
            shift = weights @ per_context
    else:
        in_others = np.isin(data.ctx, np.asarray(others, dtype=object))
        shift = mean_rows(data.x, pert_cells & in_others) - mean_rows(data.x, data.control & in_others)
    source = data.draw_controls(data.rng())
    x = np.maximum(dense_rows(data.x, source) + shift, 0.0)
    extra = {
        "average": average,
        "other_contexts": np.asarray([str(c) for c in others], dtype=str),
        "shift": shift.astype(np.float32),
    }
    if average == "kernel":
        extra["weights"] = weights.astype(np.float32)
    return data.assemble("additive_shift", x, source, extra)


@fill_doc
def pooled_other_contexts_baseline(
    adata: AnnData,
    perturbation,
    context,
    *,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    seed: int | None = 0,
) -> AnnData:
    r"""Real cells of the same perturbation from the other contexts, relabelled as ``context``.

    .. math:: \hat x_i = x_{j_i}, \qquad j_i \sim \mathrm{Uniform}\{ j : p_j = p,\ c_j \neq c \}

    Cells are drawn without replacement when the pool is large enough, else with replacement, pooled
    over all other contexts (each cell equally likely). The batch column keeps each source cell's batch.

    Parameters
    ----------
    %(common_params)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    ValueError
        If ``context_key`` is ``None`` or the perturbation has no cells in another context.

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import pooled_other_contexts_baseline
    >>> pred = pooled_other_contexts_baseline(
    ...     train, "stimulated", "CD4T", perturbation_key="condition", control_value="control", context_key="cell_type"
    ... )
    >>> bool(train[pred.uns["baseline"]["source_cells"]].obs["cell_type"].eq("CD4T").any())
    False
    """
    if context_key is None:
        raise ValueError("pooled_other_contexts_baseline needs other contexts to pool from; context_key is None.")
    data = BaselineInput(
        adata,
        perturbation,
        context,
        perturbation_key=perturbation_key,
        control_value=control_value,
        context_key=context_key,
        batch_key=batch_key,
        layer=layer,
        n_cells=n_cells,
        seed=seed,
    )
    pool = np.flatnonzero(data.seen_perturbation())
    source = data.draw(pool, data.rng())
    extra = {"other_contexts": np.asarray([str(c) for c in data.context_order(data.ctx[pool])], dtype=str)}
    return data.assemble("pooled_other_contexts", dense_rows(data.x, source), source, extra)


@fill_doc
def linear_baseline(
    adata: AnnData,
    perturbation,
    context,
    *,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    n_cells: int | None = None,
    seed: int | None = 0,
    ridge: float = _RIDGE,
    combination_delimiter: str | None = None,
) -> AnnData:
    r"""Additive linear model of pseudobulks (ridge), applied to control cells of the context.

    Each training (perturbation, context) group :math:`g` with cells gives a pseudobulk :math:`y_g`, the
    mean of its cells (the predicted combination is left out). Per gene, with one-hot context and
    non-control perturbation indicators (control is the reference, :math:`\delta_{\mathrm{ctrl}} = 0`):

    .. math:: y_{p, c} \approx \beta_0 + \alpha_c + \delta_p

    fitted in closed form (numpy, all genes at once; solved as the equivalent augmented least-squares
    problem, stable for any :math:`\lambda \ge 0`) with an unpenalised intercept:

    .. math:: \hat B = \arg\min_B \lVert Y - D B \rVert_F^2 + \lambda \lVert P B \rVert_F^2
              = (D^\top D + \lambda P)^{-1} D^\top Y, \qquad P = \mathrm{diag}(0, 1, \dots, 1)

    where :math:`D` holds one row per pseudobulk (groups weighted equally, whatever their size) and
    :math:`\lambda` = ``ridge``. With ``combination_delimiter`` the perturbation indicators are those of
    the components (``"A+B"`` sets the columns of ``A`` and ``B``), so :math:`\delta_{A+B} = \delta_A +
    \delta_B`: the additive model of combinations (GEARS' and CPA's "additive" baseline), which also
    predicts a combination, or a single perturbation, seen only inside other combinations. The prediction is

    .. math:: \hat x_i = \max\!\left(0,\; x^{\mathrm{ctrl}, c}_{j_i} + \hat y_{p, c} - \hat y_{\mathrm{ctrl}, c}\right)
              = \max\!\left(0,\; x^{\mathrm{ctrl}, c}_{j_i} + \hat\delta_p\right)

    with the control cells :math:`j_i` drawn as in :func:`control_baseline`. Unlike
    :func:`additive_shift_baseline`, the effect is estimated jointly with the context effects from all
    pseudobulks, so it accounts for which contexts each perturbation was seen in.

    Parameters
    ----------
    %(common_params)s
    ridge
        :math:`\lambda \ge 0`, on the pseudobulk scale. The default 0.01 only keeps the normal equations
        well-posed (the one-hot contexts are collinear with the intercept); it shrinks an effect seen in
        :math:`k` pseudobulks by roughly a factor :math:`k / (k + \lambda)`. 0 gives the minimum-norm
        least-squares fit.
    combination_delimiter
        Split perturbation labels into components on this string (e.g. ``"+"``), as
        :meth:`~perturbdiff_scvi.PerturbDiff.setup_anndata` does; ``None`` = one indicator per label.

    Returns
    -------
    %(returns)s
        ``uns["baseline"]`` also holds ``effect`` (:math:`\hat\delta_p`, float32 per gene), ``ridge`` and
        ``n_pseudobulks``.

    Raises
    ------
    ValueError
        If the perturbation has no training cells outside the predicted combination.

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import linear_baseline
    >>> pred = linear_baseline(
    ...     train, "stimulated", "CD4T", perturbation_key="condition", control_value="control",
    ...     context_key="cell_type", ridge=0.1,
    ... )
    >>> pred.uns["baseline"]["effect"].shape == (train.n_vars,)
    True
    """
    if not is_finite_number(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}.")
    data = BaselineInput(
        adata,
        perturbation,
        context,
        perturbation_key=perturbation_key,
        control_value=control_value,
        context_key=context_key,
        batch_key=batch_key,
        layer=layer,
        n_cells=n_cells,
        seed=seed,
    )
    check_delimiter(combination_delimiter)
    if combination_delimiter is None:
        data.seen_perturbation()
    train = data.train
    pert_values = pd.Series(data.pert[train], dtype=object)
    ctx_values = pd.Series(data.ctx[train] if data.ctx is not None else np.zeros(train.sum()), dtype=object)
    pert_codes, pert_levels = pd.factorize(pert_values)
    ctx_codes, ctx_levels = pd.factorize(ctx_values)
    valid = (pert_codes >= 0) & (ctx_codes >= 0)  # cells with a missing label stay out of the fit
    group_of_cell = pert_codes[valid].astype(np.int64) * len(ctx_levels) + ctx_codes[valid]
    groups, group_codes = np.unique(group_of_cell, return_inverse=True)
    codes = np.full(data.adata.n_obs, -1, dtype=np.int64)
    codes[np.flatnonzero(train)[valid]] = group_codes
    y = group_means(data.x, codes, len(groups))

    # Design: intercept | one-hot context | indicators of the non-control perturbations (or components).
    def components(label) -> tuple:
        if combination_delimiter is None:
            return () if label == control_value else (label,)
        return split_combination(label, combination_delimiter, control_value, perturbation_key)

    parts = [components(v) for v in pert_levels]
    effect_names = sorted({c for p in parts for c in p}, key=str)
    n_ctx = len(ctx_levels)
    design = np.zeros((len(groups), 1 + n_ctx + len(effect_names)))
    design[:, 0] = 1.0
    design[np.arange(len(groups)), 1 + groups % n_ctx] = 1.0
    col = {name: 1 + n_ctx + k for k, name in enumerate(effect_names)}
    for row, g in enumerate(groups):
        design[row, [col[c] for c in parts[g // n_ctx]]] = 1.0
    target = components(perturbation)
    if missing := [c for c in target if c not in col]:
        raise ValueError(
            f"Cannot predict {perturbation!r}: component(s) {missing} have no training cells in "
            f"{perturbation_key!r}, so the linear model has no effect for them."
        )
    penalty = np.sqrt(float(ridge)) * np.eye(design.shape[1])[1:]
    augmented = np.vstack([design, penalty])
    stacked = np.vstack([y, np.zeros((penalty.shape[0], y.shape[1]))])
    coef = np.linalg.lstsq(augmented, stacked, rcond=None)[0]
    effect = coef[[col[c] for c in target]].sum(axis=0)

    source = data.draw_controls(data.rng())
    x = np.maximum(dense_rows(data.x, source) + effect, 0.0)
    extra = {"ridge": float(ridge), "n_pseudobulks": int(len(groups)), "effect": effect.astype(np.float32)}
    return data.assemble("linear", x, source, extra)


def half_vs_half_ceiling(
    real_adata: AnnData,
    *,
    perturbation_key: str,
    context_key: str | None,
    batch_key: str | None = None,
    layer: str | None = None,
    seed: int | None = 0,
) -> tuple[AnnData, AnnData]:
    r"""Noise ceiling: a random half of the real cells "predicts" the other half.

    Within each (perturbation, context) group of ``real_adata`` the cells are shuffled; the first
    :math:`\lfloor n/2 \rfloor` are the prediction and the remaining :math:`\lceil n/2 \rceil` the reference:

    .. math:: \hat X = X_{\pi(1..\lfloor n/2 \rfloor)}, \qquad X^{\mathrm{ref}} = X_{\pi(\lfloor n/2 \rfloor + 1..n)}

    Score ``pred`` against ``reference`` (not against all real cells, which would include ``pred``): the
    score of real cells against real cells at half the sample size, the practical ceiling of a model. The
    halves are disjoint and together cover every cell.

    Parameters
    ----------
    real_adata
        The **real held-out** cells (one or several (perturbation, context) groups), in the same space as
        the predictions.
    perturbation_key
        Column of ``real_adata.obs`` with the perturbation.
    context_key
        Column of ``real_adata.obs`` with the context; ``None`` = split by perturbation only.
    batch_key
        Column of ``real_adata.obs`` with the batch, copied to the outputs; ``None`` = none.
    layer
        Read expression from ``real_adata.layers[layer]`` instead of ``real_adata.X``.
    seed
        Seed of the split (``None`` = fresh entropy).

    Returns
    -------
    pred : AnnData
        The prediction half, in the format of the other baselines (``obs_names`` ``"baseline_<i>"``,
        categorical key columns, ``population`` = 0, ``uns["baseline"]`` with ``role="prediction"``
        and the real ``source_cells``).
    reference : AnnData
        The reference half, same format, ``obs_names`` ``"reference_<i>"`` and ``role="reference"``.

    Raises
    ------
    ValueError
        If a group has fewer than 2 cells.

    Examples
    --------
    >>> from perturbdiff_scvi.baselines import half_vs_half_ceiling
    >>> real = adata[(adata.obs["condition"] == "stimulated") & (adata.obs["cell_type"] == "CD4T")]
    >>> pred, reference = half_vs_half_ceiling(real, perturbation_key="condition", context_key="cell_type")
    >>> pred.n_obs + reference.n_obs == real.n_obs
    True
    """
    if not isinstance(real_adata, AnnData):
        raise TypeError(f"real_adata must be an AnnData, got {type(real_adata).__name__}.")
    if perturbation_key is None:
        raise ValueError("perturbation_key is required.")
    named = {"perturbation_key": perturbation_key, "context_key": context_key, "batch_key": batch_key}
    check_distinct_keys(**named)
    keys = [k for k in named.values() if k is not None]
    columns = {k: obs_column(real_adata, k, what) for what, k in named.items() if k is not None}
    x = matrix(real_adata, layer)
    seed = optional_seed(seed)
    if real_adata.n_obs == 0:
        raise ValueError("real_adata has no cells.")
    group_keys = [k for k in (perturbation_key, context_key) if k is not None]
    frame = pd.DataFrame({k: columns[k] for k in group_keys})
    groups = frame.groupby(group_keys, sort=False, dropna=False).indices
    rng = np.random.default_rng(seed)
    halves: tuple[list, list] = ([], [])
    for name, rows in groups.items():
        if len(rows) < 2:
            raise ValueError(f"The group {name!r} has {len(rows)} cell; splitting in halves needs at least 2.")
        perm = rng.permutation(rows)
        halves[0].append(perm[: len(rows) // 2])
        halves[1].append(perm[len(rows) // 2 :])

    out = []
    for role, prefix, parts in (("prediction", "baseline", halves[0]), ("reference", "reference", halves[1])):
        rows = np.concatenate(parts)
        uns = {
            "name": "half_vs_half_ceiling",
            "role": role,
            "perturbation_key": perturbation_key,
            "context_key": "None" if context_key is None else context_key,
            "batch_key": "None" if batch_key is None else batch_key,
            "layer": "None" if layer is None else layer,
            "n_cells": int(len(rows)),
            "seed": "None" if seed is None else int(seed),
            "source_cells": np.asarray(real_adata.obs_names[rows], dtype=str),
        }
        ad = population_adata(
            dense_rows(x, rows),
            obs={k: categorical(columns[k][rows], real_adata.obs[k]) for k in keys},
            population=np.zeros(len(rows), dtype=np.int64),
            var_names=real_adata.var_names,
            name_prefix=prefix,
            uns_key="baseline",
            uns=uns,
        )
        out.append(ad)
    return out[0], out[1]


__all__ = [
    "additive_shift_baseline",
    "cell_mean_baseline",
    "control_baseline",
    "half_vs_half_ceiling",
    "linear_baseline",
    "pooled_other_contexts_baseline",
]
