"""Shared plumbing of the baselines: checked inputs (the package's one validation layer), cell selection, means.

The output AnnData is built by :func:`perturbdiff_scvi._output.population_adata`, as for ``predict_population``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._output import population_adata
from .._validation import (
    check_distinct_keys,
    check_obs_column,
    expression_matrix,
    optional_positive_int,
    optional_seed,
)

_COMMON_PARAMS = """adata
        The **training** AnnData (cells x genes, log1p of library-size-normalised values, as the model was
        trained on). Cells of the predicted (``perturbation``, ``context``) combination are excluded from
        every estimate, so passing data that still holds them gives the same result as passing the
        training split; still, pass the training data only.
    perturbation
        Value of ``perturbation_key`` to predict. Must differ from ``control_value``.
    context
        Value of ``context_key`` to predict in (``None`` when ``context_key`` is ``None``). The context needs
        control cells in ``adata``.
    perturbation_key
        Column of ``adata.obs`` with the perturbation of each cell.
    control_value
        Value of ``perturbation_key`` that marks control cells.
    context_key
        Column of ``adata.obs`` with the cell type / cell line; ``None`` = all cells form one context.
    batch_key
        Column of ``adata.obs`` with the batch / donor; ``None`` = no batch column in the output. Each
        predicted cell takes the batch of the training cell it is built on.
    layer
        Read expression from ``adata.layers[layer]`` instead of ``adata.X`` (dense or sparse).
    n_cells
        Number of predicted cells; ``None`` = the number of control cells of ``context`` in ``adata``.
    seed
        Seed of the cell draws (``None`` = fresh entropy). The same seed draws the same control cells in
        every baseline that starts from control cells."""

_RETURNS = """AnnData
        ``X``: dense float32 (``n_cells`` x genes) in the space of ``adata.X`` / ``layer``; ``var_names``: the
        genes of ``adata``; ``obs``: ``perturbation_key``, ``context_key`` and ``batch_key`` (when not
        ``None``) as categoricals, plus an int64 ``population`` column (always 0); ``obs_names``:
        ``"baseline_<i>"``; ``uns["baseline"]``: the settings (``name``, keys, values, ``n_cells``,
        ``seed``, ...) and ``source_cells``, the ``obs_names`` of the ``adata`` cells each row is built on."""


def fill_doc(func):
    """Insert the shared parameter and return descriptions into ``func.__doc__``."""
    func.__doc__ = func.__doc__.replace("%(common_params)s", _COMMON_PARAMS).replace("%(returns)s", _RETURNS)
    return func


def _values_hint(col: np.ndarray, limit: int = 20) -> str:
    values = pd.unique(pd.Series(col, dtype=object).dropna())
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def obs_column(adata: AnnData, key: str | None, what: str) -> np.ndarray | None:
    """The obs column ``key`` as an object array (``None`` for no key), checked by the shared input layer."""
    if key is None:
        return None
    check_obs_column(adata.obs, key, what)
    return adata.obs[key].to_numpy(dtype=object)


def matrix(adata: AnnData, layer: str | None):
    """Expression of ``adata.X`` / ``layer`` as CSR or a dense 2-d array."""
    x = expression_matrix(adata, layer)
    return sparse.csr_matrix(x) if sparse.issparse(x) else np.asarray(x)


def _label(value: Any) -> str:
    return "None" if value is None else str(value)


def categorical(values: Sequence[Hashable] | np.ndarray, source: pd.Series | None) -> pd.Categorical:
    """Categorical of ``values`` whose categories are the used values, in ``source``'s category order."""
    values = np.asarray(values, dtype=object)
    used = pd.unique(pd.Series(values, dtype=object))
    if source is not None and isinstance(source.dtype, pd.CategoricalDtype):
        order = {c: i for i, c in enumerate(source.cat.categories)}
        categories = sorted(used, key=lambda v: order.get(v, len(order)))
    else:
        try:
            categories = sorted(used)
        except TypeError:
            categories = list(used)
    return pd.Categorical(values, categories=categories)


def mean_rows(x, mask: np.ndarray) -> np.ndarray:
    """Mean over the cells in ``mask`` (float64, one value per gene)."""
    rows = np.flatnonzero(mask)
    if sparse.issparse(x):
        return np.asarray(x[rows].sum(axis=0, dtype=np.float64)).ravel() / len(rows)
    return np.asarray(x[rows], dtype=np.float64).mean(axis=0)


def group_means(x, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean expression of each group (``codes`` in ``0..n_groups-1``, -1 = unused), float64."""
    used = codes >= 0
    rows, groups = np.flatnonzero(used), codes[used]
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    avg = sparse.csr_matrix((1.0 / counts[groups], (groups, rows)), shape=(n_groups, x.shape[0]))
    out = avg @ x
    return np.asarray(out.toarray() if sparse.issparse(out) else out, dtype=np.float64)


class BaselineInput:
    """Checked inputs of one baseline call and the cell masks it needs."""

    def __init__(
        self,
        adata: AnnData,
        perturbation,
        context,
        *,
        perturbation_key: str,
        control_value,
        context_key: str | None,
        batch_key: str | None,
        layer: str | None,
        n_cells: int | None,
        seed: int | None,
    ):
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        if perturbation_key is None:
            raise ValueError("perturbation_key is required.")
        check_distinct_keys(perturbation_key=perturbation_key, context_key=context_key, batch_key=batch_key)
        self.adata = adata
        self.keys = {"perturbation": perturbation_key, "context": context_key, "batch": batch_key}
        self.pert = obs_column(adata, perturbation_key, "perturbation_key")
        self.ctx = obs_column(adata, context_key, "context_key")
        self.batch = obs_column(adata, batch_key, "batch_key")
        self.x = matrix(adata, layer)
        self.layer = layer
        self.n_cells = optional_positive_int(n_cells, "n_cells")
        self.seed = optional_seed(seed)
        self.perturbation, self.context, self.control_value = perturbation, context, control_value

        self.control = self.pert == control_value
        if not self.control.any():
            raise ValueError(
                f"No cell has {perturbation_key!r} == {control_value!r} (control_value); values of "
                f"{perturbation_key!r}: {_values_hint(self.pert)}."
            )
        if perturbation == control_value:
            raise ValueError(
                f"perturbation={perturbation!r} is the control value; the baselines predict perturbed cells."
            )
        if context_key is None:
            if context is not None:
                raise ValueError(f"context={context!r} was given but context_key is None; pass context=None.")
            self.in_context = np.ones(adata.n_obs, dtype=bool)
        else:
            if context is None:
                raise ValueError(f"context_key={context_key!r} is set, so context must be one of its values.")
            self.in_context = self.ctx == context
        # The (perturbation, context) cells are never used, whatever the baseline.
        self.held_out = (self.pert == perturbation) & self.in_context
        self.train = ~self.held_out
        if context_key is not None and not (self.in_context & self.train).any():
            raise ValueError(
                f"Unknown context {context!r}: no training cell has {context_key!r} == {context!r} (outside the "
                f"predicted combination); values of {context_key!r}: {_values_hint(self.ctx[self.train])}."
            )
        self.control_pool = np.flatnonzero(self.control & self.in_context)
        if len(self.control_pool) == 0:
            where = f" of context {context!r}" if context_key is not None else ""
            raise ValueError(
                f"No control cells{where} ({perturbation_key!r} == {control_value!r}) in adata; the baselines "
                "start from (or are sized by) the control cells of the context."
            )

    # ------------------------------------------------------------------ cells
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def size(self) -> int:
        return self.n_cells if self.n_cells is not None else len(self.control_pool)

    def draw(self, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``size()`` cells of ``pool``: without replacement when the pool is large enough, else with."""
        n = self.size()
        return rng.choice(pool, n, replace=n > len(pool))

    def draw_controls(self, rng: np.random.Generator) -> np.ndarray:
        return self.draw(self.control_pool, rng)

    def seen_perturbation(self) -> np.ndarray:
        """Training cells of ``perturbation`` (necessarily outside ``context``)."""
        mask = (self.pert == self.perturbation) & self.train
        if not mask.any():
            key = self.keys["perturbation"]
            where = f" outside context {self.context!r}" if self.keys["context"] is not None else ""
            raise ValueError(
                f"Unknown perturbation {self.perturbation!r}: no training cell{where} has {key!r} == "
                f"{self.perturbation!r}; values of {key!r}: {_values_hint(self.pert[self.train])}."
            )
        return mask

    def context_order(self, values: np.ndarray) -> list:
        """Distinct context values in the column's category order (or order of appearance)."""
        used = list(pd.unique(pd.Series(values, dtype=object)))
        source = self.adata.obs[self.keys["context"]]
        if isinstance(source.dtype, pd.CategoricalDtype):
            order = {c: i for i, c in enumerate(source.cat.categories)}
            used.sort(key=lambda v: order.get(v, len(order)))
        return used

    # ------------------------------------------------------------------ output
    def assemble(self, name: str, x: np.ndarray, source: np.ndarray, extra: dict | None = None) -> AnnData:
        """The output AnnData for predicted rows ``x`` built on the ``adata`` cells ``source``."""
        n = x.shape[0]
        obs_src = self.adata.obs
        pk, ck, bk = self.keys["perturbation"], self.keys["context"], self.keys["batch"]
        obs = {pk: categorical([self.perturbation] * n, obs_src[pk])}
        if ck is not None:
            obs[ck] = categorical([self.context] * n, obs_src[ck])
        if bk is not None:
            obs[bk] = categorical(self.batch[source], obs_src[bk])
        uns = {
            "name": name,
            "perturbation": _label(self.perturbation),
            "context": _label(self.context),
            "control_value": _label(self.control_value),
            "perturbation_key": pk,
            "context_key": _label(ck),
            "batch_key": _label(bk),
            "layer": _label(self.layer),
            "n_cells": int(n),
            "seed": "None" if self.seed is None else self.seed,
            **(extra or {}),
            "source_cells": np.asarray(self.adata.obs_names[source], dtype=str),
        }
        return population_adata(
            x,
            obs=obs,
            population=np.zeros(n, dtype=np.int64),
            var_names=self.adata.var_names,
            name_prefix="baseline",
            uns_key="baseline",
            uns=uns,
        )
