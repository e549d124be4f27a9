"""Test helpers: a tiny synthetic perturbation AnnData and tiny model settings."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

# Sizes that keep a whole train -> predict -> save -> load cycle to a few seconds on 2 CPU cores.
TINY_SIZES = {"set_size": 8, "n_hidden": 16, "depth": 1, "n_heads": 2, "n_cov": 8}
TINY_TIMESTEPS = 100


def tiny(**kwargs) -> dict:
    """The ``PerturbDiff`` keywords of the tiny test model: ``TINY_SIZES`` (updated by the sizes in ``kwargs``) and
    ``options=`` a dict of ``DiffusionOptions`` fields (``n_timesteps=TINY_TIMESTEPS``, updated by the rest)."""
    sizes = {k: kwargs.pop(k) for k in list(kwargs) if k in TINY_SIZES}
    return {**TINY_SIZES, **sizes, "options": {"n_timesteps": TINY_TIMESTEPS, **kwargs}}


SAMPLER_FIELDS = ("sampler", "start_time", "batch_size", "use_ema", "progress_bar")
OUTPUT_FIELDS = (
    "x0_bound",
    "zero_threshold",
    "bias_correction",
    "shift_pcs",
    "pcs_anchor",
    "transport",
    "counts",
    "counts_layer",
)


def predict_kwargs(**kwargs) -> dict:
    """``predict_population`` keywords from one flat dict: the ``SamplerOptions`` and ``OutputOptions`` fields go
    into ``sampler_options=`` / ``output_options=`` dicts, the rest stay keywords (for parametrised tests)."""
    sampler = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLER_FIELDS}
    output = {k: kwargs.pop(k) for k in list(kwargs) if k in OUTPUT_FIELDS}
    return {
        **kwargs,
        **({"sampler_options": sampler} if sampler else {}),
        **({"output_options": output} if output else {}),
    }


TINY = tiny()
TINY_TRAIN = {"max_steps": 6, "sets_per_batch": 4, "enable_progress_bar": False, "accelerator": "cpu"}


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run the block with ``scvi.settings.seed = seed`` (python, numpy and torch seeded, and the seed the data
    splitter falls back to), then put the global RNG states and ``scvi.settings.seed`` back as they were.

    A model built and trained inside gets the same weights whatever ran before it, and the tests that run after it
    see the RNG states they would have seen without it.
    """
    import scvi
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    previous = scvi.settings.seed
    try:
        scvi.settings.seed = seed
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        scvi.settings._seed = previous  # the setter would reseed every RNG


def train_tiny_model(adata: AnnData, seed: int = 0, model_kwargs: dict | None = None, **train_kwargs):
    """A ``PerturbDiff`` with ``TINY`` (updated by ``model_kwargs``) on a set-up ``adata``, trained with
    ``TINY_TRAIN`` (updated by ``train_kwargs``) inside :func:`seeded`: the same weights on every call."""
    from perturbdiff_scvi import PerturbDiff

    with seeded(seed):
        model = PerturbDiff(adata, **tiny(**(model_kwargs or {})))
        model.train(**{**TINY_TRAIN, **train_kwargs})
    return model


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
