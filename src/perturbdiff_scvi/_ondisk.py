"""Rows of an on-disk (backed) expression matrix, in any order, read in one sorted pass.

A backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps ``X`` in the file: a dense ``h5py.Dataset`` or
anndata's backed CSR/CSC dataset. Both read rows only at strictly increasing positions, while a training batch
asks for the rows of its sets in set order, with repeats (controls are drawn with replacement, small groups are
padded by resampling). :func:`take_rows` reads the distinct rows once, sorted, and puts them back in the order
asked for. Memory is bounded by the rows asked for, never by the file.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def is_on_disk(x) -> bool:
    """Whether ``x`` is a matrix kept on disk (h5py dataset, anndata backed sparse dataset, zarr array).

    Examples
    --------
    >>> import numpy as np
    >>> is_on_disk(np.zeros((2, 2)))
    False
    """
    if isinstance(x, np.ndarray) or sparse.issparse(x):
        return False
    module = type(x).__module__
    return module.startswith(("h5py", "zarr")) or "sparse_dataset" in module or type(x).__name__.endswith("Dataset")


def take_rows(x, rows: np.ndarray):
    """``x[rows]`` for any ``rows`` (unsorted, repeated) of an in-memory or on-disk matrix.

    On disk, the distinct rows are read once in increasing order and re-expanded; in memory this is ``x[rows]``.
    The result is a NumPy array or a SciPy sparse matrix, like ``x[rows]`` of an in-memory matrix.

    Examples
    --------
    >>> import numpy as np
    >>> take_rows(np.arange(6).reshape(3, 2), np.array([2, 0, 2])).tolist()
    [[4, 5], [0, 1], [4, 5]]
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not is_on_disk(x):
        return x[rows]
    unique, inverse = np.unique(rows, return_inverse=True)
    block = x[unique]
    return block[inverse]
