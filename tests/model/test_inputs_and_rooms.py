"""Inputs a careless user gives (clear errors from the one validation layer) and the deprecated train(batch_size=)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, tiny

from perturbdiff_scvi.model import SamplerOptions


def test_missing_key_error_is_key_and_value_error_and_prints_plainly():
    from perturbdiff_scvi._validation import MissingKeyError, expression_matrix

    adata = make_perturbation_adata(n_cells=20)
    with pytest.raises(MissingKeyError) as info:
        expression_matrix(adata, "lognrm")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("Layer 'lognrm' not found in adata.layers (available: [])")


def test_duplicate_gene_names_are_refused_at_setup(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=40)
    adata.var_names = ["gene0", "gene1"] + [f"gene{j}" for j in range(adata.n_vars - 2)]
    before = adata.obs.copy()
    with pytest.raises(ValueError, match=r"adata\.var_names are not unique \(duplicated: \['gene0', 'gene1'\]\)"):
        PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")
    assert adata.obs.equals(before) and "_scvi_uuid" not in adata.uns


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"perturbation_key": ["pert"]}, TypeError, r"perturbation_key must be one obs column name \(str\)"),
        ({"context_key": "pert"}, ValueError, "must name different columns"),
        ({"context_key": "population"}, ValueError, "'population' is reserved"),
    ],
)
def test_bad_keys_at_setup(scvi_module, kwargs, error, match):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=40)
    adata.obs["population"] = adata.obs["ctx"]
    with pytest.raises(error, match=match):
        PerturbDiff.setup_anndata(adata, **{"perturbation_key": "pert", "control_value": "ctrl", **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"set_size": 0}, "set_size must be a positive integer"),
        ({"n_heads": 3}, r"2 \* n_hidden \(32\) must be divisible by n_heads \(3\)"),
        ({"p_drop_cond": 1.5}, "p_drop_cond is a probability"),
        ({"ema_decay": -0.1}, "ema_decay must be a finite number >= 0"),
        ({"beta_schedule": "quadratic"}, "beta_schedule must be 'linear' or 'cosine'"),
        ({"input_scale": 0}, "input_scale must be > 0"),
        ({"energy_weight": 0, "mse_weight": 0}, "both 0"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number"),
        ({"context_embedding": "no"}, "context_embedding must be True or False"),
    ],
)
def test_bad_hyperparameters_name_the_argument(setup_adata, kwargs, match):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(ValueError, match=match):
        PerturbDiff(setup_adata, **tiny(**kwargs))


def test_train_counts_sets_per_batch_and_refuses_batch_size(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    train = {k: v for k, v in TINY_TRAIN.items() if k != "sets_per_batch"}
    with pytest.raises(TypeError, match="takes sets_per_batch="):  # not Lightning's Trainer error
        model.train(**{**train, "max_steps": 2}, batch_size=3)
    model.train(**{**train, "max_steps": 2}, sets_per_batch=3)
    loader = model.trainer.train_dataloader
    # A batch holds sets_per_batch perturbed sets and their control sets of set_size cells each.
    batch = next(iter(loader))
    first = next(iter(batch.values()))
    assert first.shape[0] == 2 * 3 * TINY["set_size"]
    with pytest.raises(ValueError, match="sets_per_batch must be a positive integer"):
        model.train(**{**train, "sets_per_batch": 0})


def test_predict_rejects_batches_without_batch_key_and_non_bool_use_ema(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=120)
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", context_key="ctx")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    with pytest.raises(ValueError, match="set up without batch_key; pass batches=None"):
        model.predict_population("A", contexts="c0", batches="b0", n_cells=3, n_steps=2)
    with pytest.raises(ValueError, match="use_ema must be True or False; got 'no'"):
        model.predict_population("A", contexts="c0", n_cells=3, n_steps=2, sampler_options=SamplerOptions(use_ema="no"))
    pred = model.predict_population(
        "A", contexts="c0", n_cells=3, n_steps=2, seed=1, sampler_options=SamplerOptions(use_ema=np.bool_(False))
    )
    assert pred.uns["perturbdiff"]["use_ema"] is False
