"""Array conversion shared by the metric modules."""

from __future__ import annotations

import numpy as np
from scipy import sparse


def _dense(x) -> np.ndarray:
    """``x`` as a dense float64 numpy array (scipy sparse matrices are densified)."""
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)
