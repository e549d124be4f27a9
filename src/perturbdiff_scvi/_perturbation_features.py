"""Perturbations described by features: the checked feature table and its vocabulary.

With ``perturbation_features`` given at setup (a DataFrame indexed by perturbation name, or by component
name with ``combination_delimiter``), every perturbation is a set of rows of that table: one row for a single
perturbation, one per component for a combination, none for the control. The module encodes the rows with
:class:`~perturbdiff_scvi.nn.FeatureEncoder` and sums them, so any perturbation whose rows are in the table can
be generated, also one never seen in training.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._combinations import PADDING, PerturbationVocabulary, split_combination


def _listed(values: Sequence, n: int = 10) -> str:
    values = list(values)
    return f"{values[:n]}{f' (and {len(values) - n} more)' if len(values) > n else ''}"


def check_perturbation_features(
    features, labels: Sequence, delimiter: str | None, control_value, key: str
) -> pd.DataFrame | None:
    """The feature table as a float32 DataFrame with string index and columns, after every check.

    Parameters
    ----------
    features
        The user's ``perturbation_features`` (``None`` passes through).
    labels
        Perturbation labels of the training cells (values of ``key``).
    delimiter
        ``combination_delimiter``: rows are then components, not labels.
    control_value
        The control label (needs no row).
    key
        The perturbation obs column, for messages.

    Examples
    --------
    >>> table = pd.DataFrame({"f0": [0.1, 0.2]}, index=["A", "B"])
    >>> check_perturbation_features(table, ["ctrl", "A", "B"], None, "ctrl", "pert").shape
    (2, 1)
    """
    if features is None:
        return None
    if not isinstance(features, pd.DataFrame):
        raise TypeError(
            "perturbation_features must be a pandas DataFrame indexed by perturbation name (component name with "
            f"combination_delimiter), one numeric column per feature; got {type(features).__name__}."
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"perturbation_features is empty (shape {features.shape}); give one row per perturbation.")
    index = pd.Index([str(v) for v in features.index])
    if not index.is_unique:
        raise ValueError(
            f"perturbation_features has duplicate index entries {_listed(index[index.duplicated()].unique())}; "
            "give one row per perturbation."
        )
    bad = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise ValueError(f"perturbation_features has non-numeric columns {_listed(bad)}; keep numeric features only.")
    values = features.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        rows = index[~finite.all(1)]
        cols = [str(c) for c, ok in zip(features.columns, finite.all(0), strict=True) if not ok]
        raise ValueError(
            f"perturbation_features has NaN or infinite values in rows {_listed(rows)} (columns {_listed(cols)}); "
            "fill or drop them."
        )
    needed = sorted(
        {
            part
            for label in pd.unique(pd.Series([str(v) for v in labels]))
            for part in _parts(label, delimiter, control_value, key)
        }
    )
    missing = [name for name in needed if name not in index]
    if missing:
        what = "components" if delimiter is not None else "perturbations"
        raise ValueError(
            f"perturbation_features has no row for the training {what} {_listed(missing)} of {key!r}; every "
            f"perturbed {what[:-1]} needs features (the control {control_value!r} needs none)."
        )
    columns = pd.Index([str(c) for c in features.columns])
    return pd.DataFrame(values.astype(np.float32), index=index, columns=columns)


def _parts(label, delimiter: str | None, control_value, key: str) -> tuple[str, ...]:
    """The feature rows of ``label``: its components, the label itself without delimiter, none for the control."""
    if delimiter is not None:
        return split_combination(label, delimiter, control_value, key)
    return () if str(label) == str(control_value) else (str(label),)


class FeatureVocabulary(PerturbationVocabulary):
    """Rows of the feature table as the perturbation "components": a
    :class:`~perturbdiff_scvi._combinations.PerturbationVocabulary` whose components and codes come from the table.

    Parameters
    ----------
    labels
        The registered categories of the perturbation field, in code order.
    features
        The checked feature table (:func:`check_perturbation_features`).
    delimiter
        ``combination_delimiter`` or ``None``.
    control_value
        The control label (no row).
    """

    def __init__(self, labels: Sequence, features: pd.DataFrame, delimiter: str | None, control_value):
        self.delimiter = delimiter
        self.control_value = control_value
        self.features = features
        self.components: list[str] = [str(v) for v in features.index]
        self._index = {c: i for i, c in enumerate(self.components)}
        self.parts = [_parts(label, delimiter, control_value, "perturbation") for label in labels]
        width = max(1, max((len(p) for p in self.parts), default=1))
        self.matrix = np.full((len(self.parts), width), PADDING, dtype=np.int64)
        for i, parts in enumerate(self.parts):
            # a registered label without cells may lack features: it is never embedded (padding only)
            self.matrix[i, : len(parts)] = [self._index.get(p, PADDING) for p in parts]

    def codes(self, label, seen: set[str], key: str) -> np.ndarray:
        """Feature rows of ``label`` (possibly never registered); ``seen`` is not needed: features suffice."""
        parts = _parts(label, self.delimiter, self.control_value, key)
        for part in parts:
            if part not in self._index:
                close = difflib.get_close_matches(part, self.components, n=3, cutoff=0.5)
                hint = f" Close matches: {close}." if close else ""
                raise ValueError(
                    f"Cannot generate {str(label)!r}: {part!r} has no row in perturbation_features (given at "
                    f"setup), so the model cannot encode it.{hint}"
                )
        return np.asarray([self._index[p] for p in parts], dtype=np.int64)
