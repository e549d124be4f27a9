"""Count output of ``predict_population(counts=True)``: counts sampled from predicted expression.

Each predicted cell is paired with the control cell its set was conditioned on (cell ``i`` of a set with control
cell ``i`` of the set's control draw); that control cell's library size over the model's genes, read from a raw
counts layer, is the total of the sampled counts.
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._validation import MissingKeyError, _sample_values, layer_names
from ._registry import Registry


def sample_counts(
    x: np.ndarray, library: np.ndarray, rng: np.random.Generator, upper: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Counts drawn from predicted log1p expression, and that expression re-normalised from the counts.

    ``counts_i ~ Multinomial(L_i, p_i)`` with ``p_ig = expm1(x_ig) / sum_g expm1(x_ig)`` and ``L_i`` the rounded
    library size of cell ``i``; the re-normalised expression is ``log1p(counts_ig * s_i / L_i)`` with
    ``s_i = sum_g expm1(x_ig)``, i.e. on the predicted cell's own normalisation scale (``0`` where ``L_i = 0``
    or the cell is all zeros).

    Parameters
    ----------
    x
        ``(n, G)`` predicted log1p expression (non-negative).
    library
        ``(n,)`` library sizes (total counts over the ``G`` genes).
    rng
        Random generator.
    upper
        Optional per-gene cap ``(G,)`` of ``x`` before ``expm1`` (``predict_population`` passes the training
        maximum of each gene): ``expm1`` turns one value far above the data range into a rate that would take
        nearly all of a cell's counts.

    Returns
    -------
    ``(counts, x_renormalised)``, both ``(n, G)``: ``float32`` whole numbers and ``float32``.

    Examples
    --------
    >>> counts, x = sample_counts(np.log1p(np.array([[1.0, 3.0]])), np.array([8.0]), np.random.default_rng(0))
    >>> int(counts.sum())
    8
    """
    x = np.clip(np.asarray(x, dtype=np.float64), 0, None)
    if upper is not None:
        x = np.minimum(x, np.asarray(upper, dtype=np.float64))
    rates = np.expm1(x)
    totals = rates.sum(1)
    library = np.rint(np.clip(np.asarray(library, dtype=np.float64), 0, None)).astype(np.int64)
    ok = (totals > 0) & (library > 0)
    counts = np.zeros(rates.shape, dtype=np.int64)
    if ok.any():
        p = rates[ok] / totals[ok, None]
        p /= p.sum(1, keepdims=True)  # exact sums for numpy's check
        counts[ok] = rng.multinomial(library[ok], p)
    scale = np.divide(totals, library, out=np.zeros_like(totals), where=ok)
    return counts.astype(np.float32), np.log1p(counts * scale[:, None]).astype(np.float32)


def counts_matrix(registry: Registry, control_adata: AnnData | None, layer: str, user_rows: np.ndarray | None):
    """The raw counts of the control cells ``ControlSource`` draws from, genes in the model's order.

    ``control_adata=None``: ``layer`` of the registered AnnData (its RNA modality for MuData); else ``layer`` of
    ``control_adata``, restricted to its control cells ``user_rows``.
    """
    if not isinstance(layer, str):
        raise ValueError(f"counts_layer must be the name of a layer holding raw counts; got {layer!r}.")
    if control_adata is None:
        adata = registry.adata
        if not isinstance(adata, AnnData):  # MuData: the modelled RNA modality
            from ._setup import rna_modality

            adata = adata.mod[rna_modality(adata, registry.setup_arg("modalities"))]
        where, cols, rows = "the registered AnnData", None, None
    else:
        adata, where = control_adata, "control_adata"
        cols, rows = control_adata.var_names.get_indexer(registry.var_names), user_rows
    if layer not in layer_names(adata):
        raise MissingKeyError(
            f"counts=True needs the raw counts of the control cells: {where} has no layer {layer!r} (available: "
            f"{layer_names(adata)}). Store them, e.g. adata.layers['counts'] = adata.X.copy() before "
            "normalising, or pass counts_layer= naming the layer that holds them."
        )
    matrix = adata.layers[layer]
    if cols is not None:
        matrix = matrix[:, cols]
    if rows is not None:
        matrix = matrix[rows]
    probe = _sample_values(matrix)  # evenly spaced rows, as the log-normalisation check at setup reads them
    if not np.all(np.isfinite(probe)) or probe.min(initial=0) < 0:
        raise ValueError(f"{where}.layers[{layer!r}] holds negative or non-finite values; it must hold raw counts.")
    if not np.all(probe == np.floor(probe)):
        raise ValueError(
            f"{where}.layers[{layer!r}] holds non-integer values (e.g. {probe[probe != np.floor(probe)][0]:.3g}); "
            "counts=True needs raw counts (whole numbers) to take library sizes from."
        )
    return matrix


def library_sizes(matrix, rows: np.ndarray) -> np.ndarray:
    """Total counts over the model's genes of the cells ``rows`` of ``matrix``."""
    return np.asarray(matrix[rows].sum(1), dtype=np.float64).ravel()
