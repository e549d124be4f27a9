"""Combinatorial perturbations: ``"A+B"`` as the set of its components, embedded as ``e_A + e_B``.

With ``combination_delimiter`` set at setup, each perturbation label is split into components; the
control has none. The module then embeds a label as the sum of its component embeddings, which is
what lets the model generate a combination never measured (CPA / GEARS use the same additive code).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

PADDING = -1


def check_delimiter(delimiter) -> None:
    if delimiter is not None and (not isinstance(delimiter, str) or not delimiter.strip()):
        raise ValueError(
            f"combination_delimiter must be a non-empty string such as '+' (or None for one embedding per "
            f"perturbation label); got {delimiter!r}."
        )


def split_combination(label, delimiter: str, control_value, key: str = "perturbation_key") -> tuple[str, ...]:
    """Sorted, de-duplicated components of ``label``; ``()`` for the control."""
    label = str(label)
    if label == str(control_value):
        return ()
    parts = [p.strip() for p in label.split(delimiter)]
    if any(not p for p in parts):
        raise ValueError(
            f"The perturbation {label!r} of {key!r} has an empty component when split on "
            f"combination_delimiter={delimiter!r}; write combinations as 'A{delimiter}B'."
        )
    if str(control_value) in parts:
        parts = [p for p in parts if p != str(control_value)]  # "ctrl+A" means A alone (Norman/GEARS style)
    return tuple(sorted(set(parts)))


def check_labels(labels: Sequence, delimiter: str | None, control_value, key: str) -> None:
    """Fail at setup (not at training) on labels that do not split into components."""
    if delimiter is None:
        return
    for label in labels:
        if str(label) != str(control_value) and not split_combination(label, delimiter, control_value, key):
            raise ValueError(
                f"The perturbation {label!r} of {key!r} has no component other than the control "
                f"{control_value!r}; label such cells with the control value itself."
            )


class PerturbationVocabulary:
    """Components of the registered perturbation labels and the ``(n_labels, K)`` code matrix.

    Parameters
    ----------
    labels
        The registered categories of the perturbation field, in code order.
    delimiter
        The ``combination_delimiter`` given at setup.
    control_value
        The control label (no component).
    """

    def __init__(self, labels: Sequence, delimiter: str, control_value):
        self.delimiter = delimiter
        self.control_value = control_value
        self.parts = [split_combination(label, delimiter, control_value) for label in labels]
        self.components: list[str] = sorted({p for parts in self.parts for p in parts})
        self._index = {c: i for i, c in enumerate(self.components)}
        width = max(1, max(len(p) for p in self.parts))
        self.matrix = np.full((len(self.parts), width), PADDING, dtype=np.int64)
        for i, parts in enumerate(self.parts):
            self.matrix[i, : len(parts)] = [self._index[p] for p in parts]

    def codes(self, label, seen: set[str], key: str) -> np.ndarray:
        """Component codes of ``label`` (possibly a combination never registered), checked against ``seen``."""
        parts = split_combination(label, self.delimiter, self.control_value, key)
        for part in parts:
            if part not in self._index or part not in seen:
                close = difflib.get_close_matches(part, self.components, n=3, cutoff=0.5)
                hint = f" Close matches: {close}." if close else ""
                state = "never occurs" if part not in self._index else "occurs only in labels without cells"
                raise ValueError(
                    f"Cannot generate {str(label)!r}: its component {part!r} {state} in the training data of "
                    f"{key!r}, so the model has no embedding for it.{hint}"
                )
        return np.asarray([self._index[p] for p in parts], dtype=np.int64)

    def seen_components(self, label_codes_with_cells: np.ndarray) -> set[str]:
        return {p for code in np.unique(label_codes_with_cells) for p in self.parts[int(code)]}
