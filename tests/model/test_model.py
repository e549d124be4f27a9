"""PerturbDiff model API: setup, train, predict, save/load, MuData, control_adata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, predict_kwargs


def test_setup_registers_fields_and_leaves_data(scvi_module, adata):
    from perturbdiff_scvi import PerturbDiff

    x_before, obs_before = adata.X.copy(), adata.obs.copy()
    PerturbDiff.setup_anndata(
        adata, perturbation_key="pert", control_value="ctrl", context_key="ctx", batch_key="batch"
    )
    model = PerturbDiff(adata, **TINY)
    assert model.summary_stats["n_perturbation"] == 3
    assert model.summary_stats["n_context"] == 2
    assert model.summary_stats["n_batch"] == 2
    assert (adata.X != x_before).nnz == 0
    new_cols = set(adata.obs.columns) - set(obs_before.columns)
    assert all(c.startswith("_scvi_") for c in new_cols)
    pd.testing.assert_frame_equal(adata.obs[obs_before.columns], obs_before)


def test_setup_without_context_or_batch(scvi_module, adata):
    from perturbdiff_scvi import PerturbDiff

    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    pred = model.predict_population(["A"], n_cells=5, seed=0, n_steps=3)
    assert list(pred.obs.columns) == ["pert", "population"]
    assert pred.n_obs == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"perturbation_key": "nope", "control_value": "ctrl"}, KeyError, "perturbation_key='nope'"),
        ({"perturbation_key": "pert", "control_value": "control"}, ValueError, "control_value='control'"),
        ({"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctxx"}, KeyError, "Did you mean"),
        ({"perturbation_key": "pert", "control_value": "ctrl", "layer": "counts"}, KeyError, "Layer 'counts'"),
    ],
)
def test_setup_errors(scvi_module, adata, kwargs, error, match):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(error, match=match):
        PerturbDiff.setup_anndata(adata, **kwargs)


def test_setup_rejects_raw_counts(scvi_module, adata):
    from perturbdiff_scvi import PerturbDiff

    adata.X = np.round(np.expm1(adata.X.toarray()) * 10)
    with pytest.raises(ValueError, match="raw counts.*normalize_total"):
        PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")


def test_train_history_and_loss_terms(shared_model):
    hist = shared_model.history
    for key in ("train_loss", "mse_train", "energy_train"):
        assert key in hist, key
        assert np.isfinite(hist[key].to_numpy(dtype=float)).all()
    assert shared_model.is_trained
    assert shared_model.module.ema_updates.item() == TINY_TRAIN["max_steps"]


def test_validation_and_early_stopping(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    model.train(
        max_epochs=3,
        sets_per_batch=4,
        validation_size=0.3,
        split="cell",
        early_stopping=True,
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    assert "validation_loss" in model.history
    assert len(np.intersect1d(model.train_indices, model.validation_indices)) == 0


def test_early_stopping_without_validation_is_clear(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    with pytest.raises(ValueError, match="needs a validation set"):
        model.train(max_steps=2, validation_size=0.0, early_stopping=True, enable_progress_bar=False)


def test_predict_population_output(shared_model):
    pred = shared_model.predict_population(
        ["A", "B"], contexts=["c0", "c1"], n_cells=10, n_populations=2, seed=1, n_steps=4, guidance_scale=1.0
    )
    # 2 perturbations x 2 contexts x 2 batches (each with controls) x 2 populations x 10 cells
    assert pred.shape == (2 * 2 * 2 * 2 * 10, shared_model.adata.n_vars)
    assert list(pred.var_names) == list(shared_model.adata.var_names)
    for key in ("pert", "ctx", "batch"):
        assert isinstance(pred.obs[key].dtype, pd.CategoricalDtype)
    assert set(pred.obs["pert"]) == {"A", "B"}
    assert sorted(pred.obs["population"].unique()) == [0, 1]
    assert not any(c.startswith("_scvi") for c in pred.obs.columns)
    assert pred.uns["perturbdiff"]["n_steps"] == 4
    assert pred.X.dtype == np.float32 and (pred.X >= 0).all()
    assert pred.obs.groupby(["pert", "ctx", "batch", "population"], observed=True).size().eq(10).all()


def test_predict_default_n_cells_and_contexts(shared_model):
    pred = shared_model.predict_population("A", seed=0, n_steps=2)
    obs = shared_model.adata.obs
    for (ctx, batch), n in pred.obs.groupby(["ctx", "batch"], observed=True).size().items():
        assert n == ((obs.pert == "A") & (obs.ctx == ctx) & (obs.batch == batch)).sum()


def test_predict_unseen_combination(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    keep = ~((adata.obs.pert == "A") & (adata.obs.ctx == "c1")).to_numpy()
    adata = adata[keep].copy()
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", context_key="ctx")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    pred = model.predict_population("A", contexts="c1", n_cells=7, seed=0, n_steps=2)
    assert pred.n_obs == 7 and set(pred.obs.ctx) == {"c1"}


def test_predict_unknown_names(shared_model):
    with pytest.raises(ValueError, match=r"Unknown perturbation 'AA'.*Close matches: \['A'\]"):
        shared_model.predict_population("AA")
    with pytest.raises(ValueError, match="Unknown context 'c3'"):
        shared_model.predict_population("A", contexts="c3")


def test_predict_category_without_cells(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    adata.obs["pert"] = pd.Categorical(adata.obs["pert"], categories=["ctrl", "A", "B", "Z"])
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    with pytest.raises(ValueError, match="'Z' has no cells in the training data"):
        model.predict_population("Z")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_steps": 0}, "n_steps"),
        ({"n_steps": 101}, "n_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"sampler": "euler"}, "sampler"),
    ],
)
def test_predict_bad_arguments(shared_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        shared_model.predict_population("A", **predict_kwargs(**kwargs))


def test_same_seed_same_prediction_and_save_load(shared_model, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    a = shared_model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    b = shared_model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    c = shared_model.predict_population("A", contexts="c0", n_cells=9, seed=4, n_steps=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    shared_model.save(tmp_path / "model", overwrite=True)
    fresh = make_perturbation_adata()  # a never-set-up copy of the same data
    loaded = PerturbDiff.load(tmp_path / "model", adata=fresh)
    assert loaded.init_params_ == shared_model.init_params_
    d = loaded.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    np.testing.assert_array_equal(a.X, d.X)


def test_control_adata(shared_model):
    own = make_perturbation_adata(seed=5, sparse_x=False)
    own = own[own.obs.pert == "ctrl"].copy()
    own = own[:, own.var_names[::-1]].copy()  # genes in another order are matched by name
    pred = shared_model.predict_population(
        "A", contexts="c0", batches="b0", control_adata=own, n_cells=6, seed=0, n_steps=2
    )
    assert pred.uns["perturbdiff"]["controls"] == "control_adata"
    assert list(pred.var_names) == list(shared_model.adata.var_names)
    with pytest.raises(ValueError, match="lacks 5 of the 30 training genes"):
        shared_model.predict_population("A", control_adata=own[:, 5:].copy(), n_steps=2)
    renamed = own.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="shares no gene"):
        shared_model.predict_population("A", control_adata=renamed, n_steps=2)


def test_control_adata_changes_prediction(shared_model):
    """Conditioning on other control cells changes the generated cells (the control set is used)."""
    own = make_perturbation_adata(seed=9, sparse_x=False)
    own = own[own.obs.pert == "ctrl"].copy()
    own.X = own.X * 0.2
    a = shared_model.predict_population("A", contexts="c0", batches="b0", n_cells=8, seed=0, n_steps=3)
    b = shared_model.predict_population(
        "A", contexts="c0", batches="b0", n_cells=8, seed=0, n_steps=3, control_adata=own
    )
    assert not np.allclose(a.X, b.X)


def test_setup_mudata_obs_on_modality(scvi_module):
    import mudata

    from perturbdiff_scvi import PerturbDiff

    rna = make_perturbation_adata()
    mdata = mudata.MuData({"rna": rna})
    mdata.obs["pert"] = rna.obs["pert"]  # one key on the MuData, the others only on the modality
    PerturbDiff.setup_mudata(
        mdata,
        perturbation_key="pert",
        control_value="ctrl",
        context_key="ctx",
        batch_key="batch",
        modalities={"rna_layer": "rna"},
    )
    model = PerturbDiff(mdata, **TINY)
    model.train(**TINY_TRAIN)
    pred = model.predict_population("B", contexts="c1", n_cells=4, seed=0, n_steps=2)
    assert list(pred.var_names) == list(rna.var_names)
    assert set(pred.obs["pert"]) == {"B"}


def test_setup_mudata_modality_names(scvi_module):
    import mudata

    from perturbdiff_scvi import PerturbDiff

    mdata = mudata.MuData({"gex": make_perturbation_adata()})
    PerturbDiff.setup_mudata(mdata, perturbation_key="pert", control_value="ctrl", modalities={"rna": "gex"})
    assert PerturbDiff(mdata, **TINY).summary_stats["n_perturbation"] == 3
    with pytest.raises(KeyError, match="Modality 'rna' not found"):
        PerturbDiff.setup_mudata(mdata, perturbation_key="pert", control_value="ctrl")


def test_paper_config_builds(setup_adata):
    from perturbdiff_scvi import PAPER_CONFIG, PerturbDiff

    model = PerturbDiff(setup_adata, **{**PAPER_CONFIG, "depth": 1})
    module, net = model.module, model.module.denoiser
    # every PAPER_CONFIG entry reaches the network it configures (not only the constructor's arguments)
    assert module.set_size == PAPER_CONFIG["set_size"] == 256
    assert net.x_embed.out_features == PAPER_CONFIG["n_hidden"] == 512
    assert net.blocks[0].attn.qkv.in_features == 2 * 512  # joint attention at twice the token width
    assert net.blocks[0].attn.n_heads == PAPER_CONFIG["n_heads"] == 8
    assert net.cov_embed.perturbation.embedding_dim == PAPER_CONFIG["n_cov"] == 128
    assert net.cov_embed.project.out_features == setup_adata.n_vars  # n_cov_hidden=None: the gene count
    assert len(net.blocks) == 1  # overrides win
    assert module.ema.x_embed.out_features == 512  # the EMA copy has the same shape
    assert module.p_drop_cond == 0.5 and module.ema_every == 10 and module.input_scale == 10.0
    # input_scale is applied: sets are divided by 10 for diffusion and multiplied back after sampling
    with torch.no_grad():
        module.ema.final.linear.weight.zero_()
        module.ema.final.linear.bias.fill_(0.25)
    x_ctrl = torch.ones(1, 256, setup_adata.n_vars)
    codes = torch.zeros(1, dtype=torch.long)
    out = module.sample(x_ctrl, codes, codes, codes, n_steps=1, guidance_scale=0.0)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
