"""Input checks that turn bad AnnData into clear errors before scvi-tools or torch see it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

# log1p(1e4-normalised counts) stays below ~10 and log1p(CPM) below ~14.
RAW_COUNT_MAX = 20.0
_FIX_LOGNORM = (
    "PerturbDiff models log1p of library-size-normalised expression. Keep the counts in a layer and "
    "run `sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)`, or pass `layer=` naming a "
    "log-normalised layer."
)


def expression_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty (None); pass `layer=` naming the log-normalised expression layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
            "Pass `layer=None` to use adata.X."
        )
    return adata.layers[layer]


def _sample_values(matrix, max_rows: int = 2000) -> np.ndarray:
    """Stored values of up to ``max_rows`` evenly spaced rows (enough to spot counts or NaNs cheaply)."""
    n = matrix.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).astype(np.int64))
    block = matrix[rows]
    if sparse.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


def check_log_normalised(matrix, where: str) -> None:
    """Raise a ``ValueError`` for NaN/inf, negative values or obvious raw counts in ``matrix``."""
    values = _sample_values(matrix)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} contains NaN or infinite values; remove or impute them before setup.")
    if values.min() < 0:
        raise ValueError(
            f"{where} contains negative values (min {values.min():.3g}); scaled or centred data "
            f"cannot be modelled. {_FIX_LOGNORM}"
        )
    vmax = float(values.max())
    nonzero = values[values != 0]
    # log1p of normalised counts is essentially never integer-valued; a matrix of integers is counts.
    if (vmax > RAW_COUNT_MAX or nonzero.size >= 10) and np.array_equal(nonzero, np.round(nonzero)):
        raise ValueError(f"{where} looks like raw counts (all integers, max {vmax:.0f}). {_FIX_LOGNORM}")
    if vmax > 50:
        raise ValueError(f"{where} has values up to {vmax:.3g}, far above log1p-normalised expression. {_FIX_LOGNORM}")


def check_obs_column(obs: pd.DataFrame, key: str | None, arg: str) -> None:
    """The column exists and has no missing values."""
    if key is None:
        return
    if key not in obs.columns:
        close = difflib.get_close_matches(str(key), [str(c) for c in obs.columns], n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"{arg}={key!r} is not a column of adata.obs.{hint} Available: {list(obs.columns)[:20]}")
    n_missing = int(obs[key].isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{key!r}] ({arg}) has {n_missing} missing values; fill or drop those cells before setup."
        )


def find_category(mapping: Sequence, value, what: str, key: str):
    """Index of ``value`` in a registry ``mapping`` (matching as-is or as string), with close matches on failure."""
    mapping = list(mapping)
    for i, cat in enumerate(mapping):
        if cat == value and type(cat) is type(value):
            return i
    as_str = [str(c) for c in mapping]
    if str(value) in as_str:
        return as_str.index(str(value))
    close = difflib.get_close_matches(str(value), as_str, n=3, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"Unknown {what} {value!r}: it is not a value of {key!r} in the training data.{hint} "
        f"Known values: {as_str[:20]}{' ...' if len(as_str) > 20 else ''}"
    )


def check_control_value(column: pd.Series, control_value, key: str) -> None:
    """``control_value`` must be one of the values of the perturbation column."""
    values = pd.unique(column.astype(str))
    if str(control_value) not in values:
        close = difflib.get_close_matches(str(control_value), list(values), n=3, cutoff=0.5)
        hint = f" Close matches: {close}." if close else ""
        raise ValueError(
            f"control_value={control_value!r} does not occur in adata.obs[{key!r}].{hint} "
            f"Values present: {sorted(values)[:20]}"
        )


def positive_int(value, name: str, upper: int | None = None, upper_name: str = "", allow_none: bool = False) -> int:
    """``value`` as an ``int`` if it is a whole number in ``1..upper``; a ``ValueError`` naming ``name`` otherwise."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    ok = ok and float(value).is_integer() and value >= 1 and (upper is None or value <= upper)
    if not ok:
        if upper is not None:
            raise ValueError(f"{name} must be an integer between 1 and {upper_name}={upper}; got {value!r}.")
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}.")
    return int(value)
