"""The one input-checking layer: bad AnnData and bad arguments become clear errors before scvi-tools or torch see them.

Used by the model (``setup_anndata``, ``predict_population``, ``load``), the baselines and ``tl.evaluate``, so the
same mistake gives the same message everywhere.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ._ondisk import is_on_disk, take_rows

# log1p(1e4-normalised counts) stays below ~10 and log1p(CPM) below ~14.
RAW_COUNT_MAX = 20.0
_FIX_LOGNORM = (
    "PerturbDiff models log1p of library-size-normalised expression. Keep the counts in a layer and "
    "run `sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)`, or pass `layer=` naming a "
    "log-normalised layer."
)


class MissingKeyError(KeyError, ValueError):
    """A column, layer or value the user named does not exist (a ``KeyError`` and a ``ValueError``).

    It prints its message as given (a plain ``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _close(value, options: Sequence, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=3, cutoff=cutoff)
    return f" Did you mean {close}?" if close else ""


def layer_names(adata) -> list[str]:
    """Names of ``adata.layers`` (anndata 0.13 may list ``None``, meaning ``X``, among them: left out)."""
    return [k for k in adata.layers.keys() if k is not None]


def expression_matrix(adata, layer: str | None, *, name: str = "adata"):
    """``adata.X`` or ``adata.layers[layer]`` as stored, with a clear error for a missing or empty one.

    Examples
    --------
    >>> x = expression_matrix(adata, "lognorm")  # doctest: +SKIP
    """
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{name}.X is empty (None); pass `layer=` naming the log-normalised expression layer.")
        x = adata.X
    else:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a layer name (str) or None; got {type(layer).__name__}.")
        available = layer_names(adata)
        if layer not in available:
            raise MissingKeyError(
                f"Layer {layer!r} not found in {name}.layers (available: {available}).{_close(layer, available)} "
                f"Pass `layer=None` to use {name}.X."
            )
        x = adata.layers[layer]
    if len(getattr(x, "shape", ())) != 2:
        raise ValueError(f"Expression must be a cells x genes matrix; got shape {getattr(x, 'shape', None)}.")
    return x


def dense_rows(x, rows: np.ndarray | slice | None = None, dtype=np.float64) -> np.ndarray:
    """Rows of a dense, sparse or on-disk matrix (all when ``rows`` is ``None``) as a dense array of ``dtype``.

    ``rows`` may be unsorted and repeat rows also for a backed AnnData's ``X`` (read in one sorted pass).
    """
    if rows is None:
        sub = x if not is_on_disk(x) else x[slice(None)]
    elif isinstance(rows, slice):
        sub = x[rows]
    else:
        sub = take_rows(x, rows)
    return np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=dtype)


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
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{where} holds {values.dtype} values; expression must be real numbers.")
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


def check_unique_var_names(adata, where: str = "adata") -> None:
    """Gene names must be unique: a duplicated name makes gene lookups and the saved gene order ambiguous."""
    names = adata.var_names
    if not names.is_unique:
        dup = list(pd.unique(names[names.duplicated()]))[:5]
        raise ValueError(
            f"{where}.var_names are not unique (duplicated: {dup}); run {where}.var_names_make_unique() or drop "
            "the duplicated genes first."
        )


def check_obs_column(obs: pd.DataFrame, key: str | None, arg: str, *, where: str = "adata.obs") -> None:
    """The column exists and has no missing values (``None`` passes)."""
    if key is None:
        return
    if not isinstance(key, str):
        raise TypeError(f"{arg} must be a column name (str) or None; got {type(key).__name__}.")
    if key not in obs.columns:
        raise MissingKeyError(
            f"{arg}={key!r} is not a column of {where}.{_close(key, obs.columns)} Available: {list(obs.columns)[:20]}"
        )
    n_missing = int(obs[key].isna().sum())
    if n_missing:
        raise ValueError(
            f"{where}[{key!r}] ({arg}) has {n_missing} missing values; fill or drop those cells before setup."
        )


def check_distinct_keys(**keys: str | None) -> None:
    """The obs keys name different columns, none of them the reserved ``population`` column."""
    for arg, key in keys.items():
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{arg} must be one obs column name (str) or None; got {type(key).__name__} {key!r}.")
    named = {arg: k for arg, k in keys.items() if k is not None}
    if len(set(named.values())) != len(named):
        raise ValueError(f"{', '.join(keys)} must name different columns; got {named}.")
    if "population" in named.values():
        raise ValueError("'population' is reserved for the output's population column; rename that obs column.")


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


def optional_positive_int(value, name: str) -> int | None:
    """``None`` or a positive whole number as an ``int``."""
    return None if value is None else positive_int(value, name, allow_none=True)


def optional_seed(seed) -> int | None:
    """``None`` or a non-negative integer seed as an ``int``."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None; got {seed!r}.")
    return int(seed)


def is_finite_number(value) -> bool:
    """Whether ``value`` is one real, finite number (Python or numpy; not a bool, a string or a complex)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and bool(np.isfinite(value))


def finite_number(value, name: str, *, minimum: float | None = None, hint: str = "") -> float:
    """A real, finite number (>= ``minimum``) as a ``float``; a ``ValueError`` naming ``name`` otherwise."""
    ok = is_finite_number(value) and (minimum is None or value >= minimum)
    if not ok:
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}{hint}; got {value!r}.")
    return float(value)


def as_list(values, name: str) -> list:
    """One value or a sequence of values as a non-empty list."""
    if isinstance(values, str | int | bool | np.integer) or not isinstance(values, Sequence | np.ndarray | pd.Index):
        return [values]
    if len(values) == 0:
        raise ValueError(f"{name} is empty; give at least one value (or None for all, where allowed).")
    return list(values)
