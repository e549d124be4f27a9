"""Embeddings of a trained model: perturbations, contexts / batches and populations (``model/_embeddings.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TIMESTEPS, TINY_TRAIN, make_perturbation_adata


def test_perturbation_embedding_is_the_lookup_table(shared_model):
    emb = shared_model.get_perturbation_embedding()
    assert list(emb.obs_names) == ["A", "B", "ctrl"]
    assert emb.shape == (3, TINY["n_cov"])
    assert list(emb.var_names[:2]) == ["dim_0", "dim_1"]
    assert emb.obs["in_training"].all() and emb.obs["n_components"].tolist() == [1, 1, 0]
    table = shared_model.module.ema.cov_embed.perturbation.weight.detach().numpy()
    np.testing.assert_allclose(emb.X, table)  # registry order A, B, ctrl
    np.testing.assert_array_equal(shared_model.get_perturbation_embedding().X, emb.X)  # deterministic
    assert not np.allclose(emb["A"].X, emb["B"].X)
    raw = shared_model.get_perturbation_embedding(["B"], use_ema=False)
    np.testing.assert_allclose(raw.X[0], shared_model.module.denoiser.cov_embed.perturbation.weight[1].detach())


def test_perturbation_embedding_errors(shared_model):
    with pytest.raises(ValueError, match="Unknown perturbation 'Q'"):
        shared_model.get_perturbation_embedding(["A", "Q"])
    with pytest.raises(ValueError, match="names a perturbation twice"):
        shared_model.get_perturbation_embedding(["A", "A"])
    with pytest.raises(ValueError, match="use_ema must be True or False"):
        shared_model.get_perturbation_embedding(use_ema="yes")


def test_combination_embeddings_list_components_and_sum_them(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=200, sparse_x=False)
    adata.obs["pert"] = adata.obs["pert"].astype(str)
    adata.obs.loc[adata.obs_names[:30], "pert"] = "A+C"
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", combination_delimiter="+")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    emb = model.get_perturbation_embedding()
    assert list(emb.obs_names) == ["A", "A+C", "B", "ctrl", "C"]
    assert emb.obs["kind"].tolist() == ["label"] * 4 + ["component"]
    assert emb.obs["n_components"].tolist() == [1, 2, 1, 0, 1]
    np.testing.assert_allclose(emb["A+C"].X, emb["A"].X + emb["C"].X, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb["ctrl"].X, 0)
    unseen = model.get_perturbation_embedding(["B+C"])  # a combination never measured
    assert unseen.obs["in_training"].tolist() == [False]
    np.testing.assert_allclose(unseen.X, emb["B"].X + emb["C"].X, rtol=1e-5, atol=1e-6)


def test_context_and_batch_embeddings(shared_model):
    ctx = shared_model.get_context_embedding()
    assert list(ctx.obs_names) == ["c0", "c1"] and ctx.shape == (2, TINY["n_cov"])
    assert ctx.obs["n_cells"].sum() == shared_model.adata.n_obs
    assert (ctx.obs["n_control_cells"] > 0).all()
    np.testing.assert_allclose(ctx.X, shared_model.module.ema.cov_embed.context.weight.detach())
    batch = shared_model.get_context_embedding(covariate="batch")
    assert list(batch.obs_names) == ["b0", "b1"]
    with pytest.raises(ValueError, match="covariate must be 'context' or 'batch'"):
        shared_model.get_context_embedding(covariate="donor")


def test_population_embedding_shapes_determinism_and_differences(shared_model):
    import scanpy as sc

    emb = shared_model.get_population_embedding()
    assert emb.shape == (12, TINY["n_hidden"])  # 3 perturbations x 2 contexts x 2 batches
    assert list(emb.obs.columns) == ["pert", "ctx", "batch", "n_cells"]
    assert emb.obs_names[0] == "A|c0|b0"
    assert emb.obs["n_cells"].sum() == shared_model.adata.n_obs
    assert emb.uns["perturbdiff_embedding"]["timestep"] == TINY_TIMESTEPS // 50
    np.testing.assert_array_equal(shared_model.get_population_embedding().X, emb.X)
    assert not np.allclose(shared_model.get_population_embedding(seed=1).X, emb.X)
    by_pert = shared_model.get_population_embedding(groupby="pert")
    assert list(by_pert.obs_names) == ["A", "B", "ctrl"]
    assert np.linalg.norm(by_pert["A"].X - by_pert["B"].X) > 1e-3
    sc.pp.pca(by_pert, n_comps=2)
    assert by_pert.obsm["X_pca"].shape == (3, 2)


def test_population_embedding_of_predictions_and_subsets(shared_model):
    pred = shared_model.predict_population(["A", "B"], contexts="c0", batches="b0", n_cells=12, seed=0)
    pred = pred[:, ::-1].copy()  # genes are matched by name
    emb = shared_model.get_population_embedding(pred, groupby="pert", set_size=4, timestep=0)
    assert list(emb.obs_names) == ["A", "B"] and emb.obs["n_cells"].tolist() == [12, 12]
    only = shared_model.get_population_embedding(groupby=["pert", "ctx"], groups=[("B", "c1")])
    assert list(only.obs_names) == ["B|c1"]


def test_population_embedding_errors(shared_model):
    from perturbdiff_scvi._validation import MissingKeyError

    with pytest.raises(MissingKeyError, match="groupby column 'celltype' is not a column"):
        shared_model.get_population_embedding(groupby="celltype")
    with pytest.raises(ValueError, match=r"Unknown group\(s\) \['Q'\]"):
        shared_model.get_population_embedding(groupby="pert", groups=["A", "Q"])
    with pytest.raises(ValueError, match="lacks 5 of the 30 training genes"):
        shared_model.get_population_embedding(shared_model.adata[:, 5:].copy(), groupby="pert")
    with pytest.raises(ValueError, match="timestep must be an integer from 0"):
        shared_model.get_population_embedding(timestep=TINY_TIMESTEPS)
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        shared_model.get_population_embedding(np.zeros((3, 30)))
    no_keys = shared_model.adata.copy()
    no_keys.obs = no_keys.obs[[]]
    with pytest.raises(MissingKeyError, match="pass groupby="):
        shared_model.get_population_embedding(no_keys)


def test_denoiser_forward_is_final_layer_of_encode():
    from perturbdiff_scvi.nn import SetDiT

    torch.manual_seed(0)
    net = SetDiT(6, 3, 1, 1, n_hidden=8, depth=2, n_heads=2, n_cov=4)
    x, ctrl = torch.rand(2, 5, 6), torch.rand(2, 5, 6)
    args = (x, torch.tensor([3, 7]), ctrl, torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long))
    h, c = net.encode(*args, torch.zeros(2, dtype=torch.long))
    assert h.shape == (2, 5, 8) and c.shape == (2, 8)
    torch.testing.assert_close(net(*args, torch.zeros(2, dtype=torch.long)), net.final(h, c))
