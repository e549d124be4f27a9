"""The control cells a prediction conditions on: the registered ones, or a user's ``control_adata``.

Both sources widen an empty (context, batch) pool by the same rule as training,
:func:`perturbdiff_scvi.data.control_pool` (:data:`~perturbdiff_scvi.data.FALLBACK_ORDER`).
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._validation import MissingKeyError, check_log_normalised, check_unique_var_names, dense_rows, layer_names
from ..data import control_pool
from ._counts import counts_matrix, library_sizes
from ._registry import Registry


class ControlSource:
    """Control cells to condition on, pooled per (context, batch).

    Parameters
    ----------
    registry
        What setup registered: the registered cells, their codes and the category mappings.
    control_adata
        The user's control cells, or ``None`` for the registered ones.
    """

    def __init__(self, registry: Registry, control_adata: AnnData | None = None):
        self.registry = registry
        self.control_adata = control_adata
        self._counts = None
        self.codes = registry.codes
        self.control_code = registry.control_code
        self._pools: dict[tuple[int, int], np.ndarray] = {}
        if control_adata is None:
            self.matrix = registry.matrix
            self.user = None
        else:
            self.matrix, self.user = prepare_control_adata(registry, control_adata)

    @property
    def label(self) -> str:
        return "registered" if self.user is None else "control_adata"

    def batches_for(self, c: int, requested: list[int] | None) -> list[int]:
        """Batches to predict in for context ``c``: the requested ones, else those with controls of ``c``."""
        if requested is not None:
            return requested
        pert, ctx, batch = self.codes
        if self.user is not None:
            user_batches = self.user["batch"][(self.user["ctx"] == c) | self.user["no_ctx"]]
            found = sorted(set(user_batches[user_batches >= 0].tolist()))
            if found:
                return found
        with_ctrl = sorted(set(batch[(pert == self.control_code) & (ctx == c)].tolist()))
        return with_ctrl or sorted(set(batch[ctx == c].tolist()))

    def pool(self, c: int, b: int) -> np.ndarray:
        """Rows of ``self.matrix`` holding the controls of (context ``c``, batch ``b``), widened when empty."""
        if (c, b) not in self._pools:
            if self.user is None:
                rows, _ = control_pool(*self.codes, self.control_code, c, b)
            else:
                ctx = np.full(len(self.user["ctx"]), c) if self.user["no_ctx"] else self.user["ctx"]
                if not np.any(ctx == c):
                    name = self.registry.categories("context")[c]
                    raise ValueError(
                        f"control_adata has no cell of context {name!r} in column "
                        f"{self.registry.context_key!r}; add such control cells or drop "
                        "that column to use all its cells for every context."
                    )
                # Every user cell is a control: the same widening as training, on the user's codes.
                rows, _ = control_pool(np.zeros_like(ctx), ctx, self.user["batch"], 0, c, b)
            self._pools[(c, b)] = rows
        return self._pools[(c, b)]

    def rows(self, c: int, b: int, idx: np.ndarray) -> np.ndarray:
        """Dense float32 expression of the pool's cells at positions ``idx``."""
        return dense_rows(self.matrix, self.pool(c, b)[idx], dtype=np.float32)

    def load_counts(self, counts_layer: str) -> None:
        """Read (and check) the raw counts layer that :meth:`library_sizes` sums."""
        user_rows = None if self.user is None else self.user["rows"]
        self._counts = counts_matrix(self.registry, self.control_adata, counts_layer, user_rows)

    def library_sizes(self, c: int, b: int, idx: np.ndarray) -> np.ndarray:
        """Total raw counts over the model's genes of the pool's cells at positions ``idx`` (after ``load_counts``)."""
        return library_sizes(self._counts, self.pool(c, b)[idx])


def prepare_control_adata(registry: Registry, control_adata: AnnData):
    """Gene-aligned expression of the user's control cells and their context/batch codes (-1 = unknown)."""
    if not isinstance(control_adata, AnnData):
        raise TypeError(f"control_adata must be an AnnData; got {type(control_adata).__name__}.")
    genes = registry.var_names
    overlap = genes.intersection(control_adata.var_names)
    if len(overlap) == 0:
        raise ValueError(
            "control_adata shares no gene with the training data (compare control_adata.var_names "
            f"with model.var_names, e.g. {list(genes[:3])}); use the same gene identifiers."
        )
    if len(overlap) < len(genes):
        missing = genes.difference(control_adata.var_names)
        raise ValueError(
            f"control_adata lacks {len(missing)} of the {len(genes)} training genes (e.g. "
            f"{list(missing[:5])}); subset or pad it to model.var_names."
        )
    check_unique_var_names(control_adata, "control_adata")
    layer = registry.layer
    if layer is not None and layer not in layer_names(control_adata):
        raise MissingKeyError(
            f"control_adata has no layer {layer!r}, the layer the model was set up with "
            f"(available: {layer_names(control_adata)})."
        )
    cols = control_adata.var_names.get_indexer(genes)
    matrix = (control_adata.X if layer is None else control_adata.layers[layer])[:, cols]
    check_log_normalised(matrix, "control_adata expression")
    obs = control_adata.obs
    keep = np.ones(control_adata.n_obs, dtype=bool)
    pert_key = registry.perturbation_key
    if pert_key in obs.columns:
        keep = (obs[pert_key].astype(str) == str(registry.control_value)).to_numpy()
        if not keep.any():
            raise ValueError(
                f"control_adata.obs[{pert_key!r}] has no cell equal to the control value {registry.control_value!r}."
            )
    codes = {}
    for name, key, what in (("ctx", registry.context_key, "context"), ("batch", registry.batch_key, "batch")):
        mapping = [str(v) for v in registry.categories(what)]
        if key is not None and key in obs.columns:
            codes[name] = np.array([mapping.index(v) if v in mapping else -1 for v in obs[key].astype(str)])[keep]
        else:
            codes[name] = np.full(int(keep.sum()), -1)
    codes["no_ctx"] = registry.context_key not in obs.columns
    rows = np.flatnonzero(keep)
    codes["rows"] = rows  # positions in control_adata of the cells kept (its control cells)
    return matrix[rows], codes
