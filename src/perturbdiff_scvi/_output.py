"""The one builder of predicted-population AnnData, shared by ``predict_population`` and the baselines.

Both return the same shape of object, so that scanpy, ``tl.evaluate`` and cell-eval read them alike: dense
float32 ``X`` over the training genes, categorical obs columns named after the user's keys, an int64
``population`` column, unique string ``obs_names`` and the settings in ``uns``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData


def population_adata(
    x: np.ndarray,
    *,
    obs: Mapping[str, pd.Categorical],
    population: np.ndarray,
    var_names: pd.Index,
    name_prefix: str,
    uns_key: str,
    uns: dict,
) -> AnnData:
    """AnnData of predicted cells.

    Parameters
    ----------
    x
        ``(n_cells, n_genes)`` predicted expression.
    obs
        ``{column: categorical of length n_cells}``: the user's perturbation / context / batch columns.
    population
        Population index of each cell.
    var_names
        The genes, in order.
    name_prefix
        ``obs_names`` are ``f"{name_prefix}_{i}"``.
    uns_key, uns
        The settings, stored as ``adata.uns[uns_key]``.

    Examples
    --------
    >>> out = population_adata(np.zeros((2, 3)), obs={"condition": pd.Categorical(["a", "a"])},
    ...                        population=np.zeros(2), var_names=pd.Index(["g1", "g2", "g3"]),
    ...                        name_prefix="baseline", uns_key="baseline", uns={"name": "control"})
    >>> out.obs_names.tolist()
    ['baseline_0', 'baseline_1']
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(var_names):
        raise ValueError(f"Predicted matrix of shape {x.shape} does not match {len(var_names)} genes.")
    frame = pd.DataFrame(index=pd.Index([f"{name_prefix}_{i}" for i in range(x.shape[0])]))
    for column, values in obs.items():
        frame[column] = values
    frame["population"] = np.asarray(population, dtype=np.int64)
    out = AnnData(X=x, obs=frame, var=pd.DataFrame(index=pd.Index(var_names).copy()))
    out.uns[uns_key] = uns
    return out
