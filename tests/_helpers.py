"""Test helpers: a tiny synthetic perturbation AnnData and tiny model settings."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

# Sizes that keep a whole train -> predict -> save -> load cycle to a few seconds on 2 CPU cores.
TINY = {"set_size": 8, "n_hidden": 16, "depth": 1, "n_heads": 2, "n_cov": 8, "n_timesteps": 100}
TINY_TRAIN = {"max_steps": 6, "sets_per_batch": 4, "enable_progress_bar": False, "accelerator": "cpu"}


def make_perturbation_adata(
    n_cells: int = 240, n_genes: int = 30, seed: int = 0, sparse_x: bool = True, with_counts: bool = False
) -> AnnData:
    """Log-normalised synthetic data: perturbation A up-regulates genes 0-4 and B down-regulates 5-9.

    ``with_counts=True`` also stores the Poisson counts behind ``X`` in ``layers["counts"]``.
    """
    rng = np.random.default_rng(seed)
    pert = rng.choice(["ctrl", "A", "B"], n_cells, p=[0.4, 0.3, 0.3])
    ctx = rng.choice(["c0", "c1"], n_cells)
    batch = rng.choice(["b0", "b1"], n_cells)
    rate = np.full((n_cells, n_genes), 2.0)
    rate[ctx == "c1", 10:15] *= 3
    rate[pert == "A", :5] *= 6
    rate[pert == "B", 5:10] *= 0.1
    counts = rng.poisson(rate).astype(np.float32)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 100).astype(np.float32)
    obs = pd.DataFrame({"pert": pert, "ctx": ctx, "batch": batch}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    out = AnnData(X=sparse.csr_matrix(x) if sparse_x else x, obs=obs, var=var)
    if with_counts:
        out.layers["counts"] = sparse.csr_matrix(counts)
    return out


def make_dense_kang(n_genes: int = 300, n_cells: int | None = 600, seed: int = 0) -> AnnData:
    """Dense, high-valued log1p data: the bundled Kang cells on their ``n_genes`` most expressed genes, re-normalised
    over those genes (``normalize_total`` to 1e4, then ``log1p``): about 2/3 zeros, values up to about 8.8.

    ``n_cells`` cells are drawn at random (without replacement; ``None`` keeps all 1,975) to keep tests fast.
    """
    import scanpy as sc

    from perturbdiff_scvi.datasets import kang2018

    kang = kang2018()
    total = np.asarray(kang.layers["counts"].sum(0)).ravel()
    genes = np.sort(np.argsort(-total, kind="stable")[:n_genes])
    cells = np.arange(kang.n_obs)
    if n_cells is not None:
        cells = np.sort(np.random.default_rng(seed).choice(kang.n_obs, n_cells, replace=False))
    dense = kang[cells, genes].copy()
    dense.X = sparse.csr_matrix(dense.layers["counts"], dtype=np.float32)
    sc.pp.normalize_total(dense, target_sum=1e4)
    sc.pp.log1p(dense)
    return dense
