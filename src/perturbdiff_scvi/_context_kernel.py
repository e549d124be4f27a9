"""The similarity kernel between contexts, shared by the kernel baseline, ``guidance_scale="auto"`` and
``DiffusionOptions(reference_shift=True)``."""

from __future__ import annotations

import numpy as np


def kernel_weights(dists: np.ndarray) -> np.ndarray:
    """``exp(-(d / d_min)^2)`` of distances between control means, ``d_min`` the smallest non-zero one (1 if none).

    Examples
    --------
    >>> kernel_weights(np.array([1.0, 2.0])).round(4)
    array([0.3679, 0.0183])
    """
    positive = dists[dists > 0]
    scale = positive.min() if positive.size else 1.0
    return np.exp(-((dists / scale) ** 2))
