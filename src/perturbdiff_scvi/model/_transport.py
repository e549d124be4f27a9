"""``predict_population(transport="quantile")``: control cells moved gene by gene onto the generated marginals."""

from __future__ import annotations

import numpy as np

TRANSPORTS = ("none", "quantile")


def check_transport(value) -> str:
    """``transport`` as given if it is one of :data:`TRANSPORTS`; a ``ValueError`` otherwise."""
    if not isinstance(value, str) or value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}; got {value!r}.")
    return value


def _ranks(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks ``0 .. n-1`` of each column of ``values`` ``(n, G)``, ties (e.g. zeros) broken at random."""
    tie_break = rng.random(values.shape)
    order = np.lexsort((tie_break, values), axis=0)  # sorts by value, then by the random key
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[0])[:, None], axis=0)
    return ranks


def quantile_transport(generated: np.ndarray, controls: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each control cell moved, one gene at a time, to the generated population's value of the same rank.

    For gene ``g`` the control cell of rank ``r`` among the ``n`` control cells (ties broken at random) takes
    the ``r``-th smallest generated value: the monotone (one-dimensional optimal transport) map from the
    control cells' distribution of the gene to the generated one. The output has exactly the generated
    per-gene distributions, and the control cells' joint structure (which genes are high together in a cell).

    Parameters
    ----------
    generated
        Generated cells ``(n, G)``.
    controls
        The control cells that conditioned them ``(n, G)`` (rows may repeat).
    rng
        Breaks ties.

    Returns
    -------
    np.ndarray
        ``(n, G)``, dtype of ``generated``.

    Examples
    --------
    >>> import numpy as np
    >>> gen = np.array([[5.0], [1.0], [3.0]])
    >>> ctrl = np.array([[0.2], [0.9], [0.5]])
    >>> quantile_transport(gen, ctrl, np.random.default_rng(0)).ravel().tolist()
    [1.0, 5.0, 3.0]
    """
    if generated.shape != controls.shape:
        raise ValueError(f"generated {generated.shape} and controls {controls.shape} must have the same shape.")
    sorted_generated = np.sort(generated, axis=0)
    return np.take_along_axis(sorted_generated, _ranks(controls, rng), axis=0).astype(generated.dtype, copy=False)
