"""``perturbdiff_scvi.pl`` under the Agg backend: each plot returns matplotlib objects that hold the data drawn."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _helpers import make_perturbation_adata

from perturbdiff_scvi import pl


@pytest.fixture
def parts():
    adata = make_perturbation_adata(n_cells=300)
    real = adata[adata.obs["pert"] == "A"].copy()
    control = adata[adata.obs["pert"] == "ctrl"].copy()
    return adata, real, control


def test_delta_scatter_draws_the_mean_shifts(parts):
    _, real, control = parts
    pred = real.copy()  # a perfect prediction lies on the diagonal
    ax = pl.delta_scatter(pred, real, control, n_label=3)
    xy = ax.collections[0].get_offsets()
    assert xy.shape == (real.n_vars, 2)
    np.testing.assert_allclose(xy[:, 0], xy[:, 1], atol=1e-6)
    expected = real.X.toarray().mean(0) - control.X.toarray().mean(0)
    np.testing.assert_allclose(xy[:, 0], expected, rtol=1e-5, atol=1e-6)
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 3 and set(labels) <= {f"gene{i}" for i in range(5)}  # A moves genes 0-4 most
    assert "pearson r = 1.000" in ax.get_title()
    sub = pl.delta_scatter(pred, real, control, genes=["gene0", "gene7"], n_label=0)
    assert sub.collections[0].get_offsets().shape == (2, 2) and not sub.texts
    with pytest.raises(ValueError, match="genes not in pred.var_names"):
        pl.delta_scatter(pred, real, control, genes=["nope"])
    with pytest.raises(ValueError, match="real lacks 1 of the predicted genes"):
        pl.delta_scatter(pred, real[:, 1:].copy(), control)
    with pytest.raises(TypeError, match="pred must be an AnnData"):
        pl.delta_scatter(pred.X, real, control)
    plt.close("all")


@pytest.mark.slow  # umap-learn compiles its numba kernels
def test_umap_overlay_embeds_without_touching_inputs(parts):
    adata, real, control = parts
    pred = adata[adata.obs["pert"] == "B"].copy()
    before = (set(real.obs.columns), set(real.obsm.keys()))
    fig, combined = pl.umap_overlay(real, pred, control=control, color=["source", "ctx"], return_adata=True)
    assert len(fig.axes) >= 2
    assert combined.obsm["X_umap"].shape == (real.n_obs + pred.n_obs + control.n_obs, 2)
    assert set(combined.obs["source"]) == {"real", "predicted", "control"}
    assert (set(real.obs.columns), set(real.obsm.keys())) == before
    with pytest.raises(KeyError, match="color \\['nope'\\]"):
        pl.umap_overlay(real, pred, color="nope")
    plt.close("all")


def test_loss_curve(shared_model):
    ax = pl.loss_curve(shared_model, log=True)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert "train_loss" in lines
    np.testing.assert_allclose(
        lines["train_loss"].get_ydata(), shared_model.history["train_loss"].to_numpy(dtype=float).ravel()
    )
    with pytest.raises(KeyError, match="model.history has no"):
        pl.loss_curve(shared_model, keys=["nope"])
    plt.close("all")
