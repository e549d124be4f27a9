"""Data-derived scales of the registered training expression: ``input_scale="auto"`` and ``x0_bound="auto"``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._validation import dense_rows, is_finite_number

#: ``x0_bound="auto"`` caps each gene at this multiple of its training maximum.
AUTO_BOUND_FACTOR = 1.5
_CHUNK_ROWS = 4096


def _chunks(matrix):
    """Dense float64 blocks of rows of a dense or sparse (or backed) matrix."""
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        yield dense_rows(matrix, slice(start, start + _CHUNK_ROWS))


def nonzero_rms(matrix) -> float:
    """Root mean square of the non-zero entries of ``matrix`` (0.0 if it has none), exact, in row blocks."""
    total, count = 0.0, 0
    for block in _chunks(matrix):
        nz = block[block != 0]
        total += float(np.sum(nz**2))
        count += nz.size
    return float(np.sqrt(total / count)) if count else 0.0


def gene_max(matrix) -> np.ndarray:
    """Per-gene (column) maximum of ``matrix``, float64 ``(G,)``."""
    out = np.zeros(matrix.shape[1], dtype=np.float64)  # expression is >= 0 (checked at setup)
    for block in _chunks(matrix):
        np.maximum(out, block.max(axis=0), out=out)
    return out


def input_scale_value(value, training_matrix: Callable[[], object]):
    """``input_scale`` as given, or for ``"auto"`` the root mean square of the non-zero training values.

    Other strings raise a ``ValueError``; numbers are checked by ``check_hyperparameters``.
    """
    if not isinstance(value, str):
        return value
    if value != "auto":
        raise ValueError(f"input_scale must be a number > 0 or 'auto'; got {value!r}.")
    scale = nonzero_rms(training_matrix())
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(
            "input_scale='auto' needs non-zero training expression, but the registered matrix is all zeros; "
            "pass a number (e.g. input_scale=1.0)."
        )
    return scale


def sigma_data_value(value, input_scale: float, training_matrix: Callable[[], object]) -> float:
    """``sigma_data`` as a float: for ``"auto"`` the standard deviation of every training value / ``input_scale``."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"sigma_data must be a number > 0 or 'auto'; got {value!r}.")
        x = training_matrix()
        total, squares = 0.0, 0.0
        for block in _chunks(x):  # the same row blocks as nonzero_rms / gene_max (dense, sparse or backed)
            total += float(block.sum())
            squares += float(np.square(block).sum())
        n = x.shape[0] * x.shape[1]
        var = squares / n - (total / n) ** 2
        value = float(np.sqrt(max(var, 0.0))) / float(input_scale)
        if not np.isfinite(value) or value <= 0:
            raise ValueError("sigma_data='auto' needs varying training expression; pass a number (e.g. 1.0).")
        return value
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"sigma_data must be a number > 0 or 'auto'; got {value!r}.")
    return float(value)


def x0_bound_value(value, training_gene_max: Callable[[], np.ndarray]) -> np.ndarray | float | None:
    """``x0_bound`` in expression units: ``None``; ``"auto"`` = 1.5 x the per-gene training maximum ``(G,)``
    (``training_gene_max()``, read only for ``"auto"``); or a number > 0 (one cap for every gene)."""
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        return (AUTO_BOUND_FACTOR * training_gene_max()).astype(np.float32)
    if not is_finite_number(value):
        raise ValueError(f"x0_bound must be None, 'auto' or a finite number > 0; got {value!r}.")
    if value <= 0:
        raise ValueError(f"x0_bound must be > 0 (predictions are capped at it); got {value!r}.")
    return float(value)
