"""``predict_population(counts=True)``, ``energy_weighting="abar"``, ``preconditioning="edm"``,
``context_embedding=False``, ``control_skip=True``; the removed
``init="control"`` and ``preconditioning="edm_shrink"``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, tiny

from perturbdiff_scvi.model import OutputOptions, SamplerOptions
from perturbdiff_scvi.model._counts import sample_counts

SETUP = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}


@pytest.fixture
def counts_model(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(with_counts=True)
    PerturbDiff.setup_anndata(adata, **SETUP)
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    return model


def test_sample_counts_keeps_library_and_rates():
    rng = np.random.default_rng(0)
    rates = np.array([[1.0, 3.0, 0.0, 6.0]] * 4000)
    x = np.log1p(rates)
    library = np.full(4000, 50.0)
    counts, renorm = sample_counts(x, library, rng)
    assert np.all(counts.sum(1) == 50) and np.all(counts == np.floor(counts))
    assert np.all(counts[:, 2] == 0)  # a zero rate never gets a count
    np.testing.assert_allclose(counts.mean(0), 50 * rates[0] / rates[0].sum(), rtol=0.02)
    # re-normalised on the cell's own scale: expm1 sums back to sum(expm1(x)) = 10
    np.testing.assert_allclose(np.expm1(renorm).sum(1), 10.0, rtol=1e-5)
    # an all-zero cell or a zero library gives zeros, not NaN
    c0, x0 = sample_counts(np.zeros((2, 3)), np.array([0.0, 10.0]), rng)
    assert not c0.any() and not x0.any()


def test_counts_output_uses_control_library_sizes(counts_model):
    model = counts_model
    pred = model.predict_population(
        "A", contexts="c0", batches="b0", n_cells=40, seed=0, output_options=OutputOptions(counts=True)
    )
    counts = pred.layers["counts"]
    assert counts.shape == pred.shape and np.all(counts == np.floor(counts)) and counts.min() >= 0
    real_lib = np.asarray(model.adata.layers["counts"].sum(1)).ravel()
    ctrl = (model.adata.obs["pert"] == "ctrl").to_numpy()
    lib = counts.sum(1)
    assert real_lib[ctrl].min() <= lib.min() and lib.max() <= real_lib[ctrl].max()
    assert np.all(pred.X[counts == 0] == 0)  # X re-normalised from the counts: their zeros
    assert pred.uns["perturbdiff"]["counts"] == "counts"
    # same seed, same counts; counts=False keeps its draws unchanged
    again = model.predict_population(
        "A", contexts="c0", batches="b0", n_cells=40, seed=0, output_options=OutputOptions(counts=True)
    )
    np.testing.assert_array_equal(again.layers["counts"], counts)
    plain = model.predict_population("A", contexts="c0", batches="b0", n_cells=40, seed=0)
    assert "counts" not in plain.layers and plain.uns["perturbdiff"]["counts"] == "None"


def test_counts_missing_layer_is_a_clear_error(shared_model):
    with pytest.raises(KeyError, match="counts=True needs the raw counts.*no layer 'counts'"):
        shared_model.predict_population("A", contexts="c0", n_cells=8, output_options=OutputOptions(counts=True))
    with pytest.raises(ValueError, match="counts must be True or False"):
        shared_model.predict_population("A", contexts="c0", n_cells=8, output_options=OutputOptions(counts="yes"))


def test_counts_rejects_non_integer_layer(counts_model):
    counts_model.adata.layers["lognorm"] = counts_model.adata.X.copy()
    with pytest.raises(ValueError, match="non-integer values"):
        counts_model.predict_population(
            "A", contexts="c0", n_cells=8, output_options=OutputOptions(counts=True, counts_layer="lognorm")
        )


def test_counts_from_control_adata(counts_model):
    ctrl = counts_model.adata[counts_model.adata.obs["pert"] == "ctrl"].copy()
    ctrl.layers["counts"] = ctrl.layers["counts"] * 3  # bigger libraries than the registered cells
    pred = counts_model.predict_population(
        "A", contexts="c0", n_cells=16, seed=0, control_adata=ctrl, output_options=OutputOptions(counts=True)
    )
    assert pred.layers["counts"].sum(1).min() >= 3 * np.asarray(counts_model.adata.layers["counts"].sum(1)).min()


def test_init_was_removed_and_start_time_stays_for_the_truncated_sampler(shared_model):
    with pytest.raises(TypeError, match="no longer takes init=: removed in 0.2.0"):
        shared_model.predict_population("A", contexts="c0", n_cells=8, init="control")
    with pytest.raises(ValueError, match="start_time=20 only applies"):
        shared_model.predict_population("A", contexts="c0", n_cells=8, sampler_options=SamplerOptions(start_time=20))


def test_energy_weighting_abar_scales_the_energy_term(setup_adata):
    from perturbdiff_scvi import PerturbDiff
    from perturbdiff_scvi._constants import PDIFF_KEYS

    model = PerturbDiff(setup_adata, **tiny(energy_weighting="abar"))
    module = model.module
    s, g = module.set_size, module.n_genes
    x = torch.rand(2 * 2 * s, g)
    tensors = {PDIFF_KEYS.X_KEY: x}
    for key in (PDIFF_KEYS.PERT_KEY, PDIFF_KEYS.CONTEXT_KEY, PDIFF_KEYS.BATCH_KEY):
        tensors[key] = torch.zeros(2 * 2 * s, 1)
    x0_hat = torch.rand(2, s, g)
    t = torch.tensor([0, 99])
    unpacked = module._get_inference_input(tensors)  # the target sets travel in the inference outputs
    weighted = module.loss(tensors, unpacked, {"x0_hat": x0_hat, "t": t}).reconstruction_loss["reconstruction_loss"]
    module.energy_weighting = "constant"
    plain = module.loss(tensors, unpacked, {"x0_hat": x0_hat, "t": t}).reconstruction_loss["reconstruction_loss"]
    module.energy_weight = 0.0
    mse_only = module.loss(tensors, unpacked, {"x0_hat": x0_hat, "t": t}).reconstruction_loss["reconstruction_loss"]
    abar = module.diffusion.alphas_cumprod[t]
    torch.testing.assert_close(weighted - mse_only, abar * (plain - mse_only))
    assert abar[0] > 0.99 and abar[1] < 0.01  # low noise keeps the energy term, pure noise almost drops it
    with pytest.raises(ValueError, match="energy_weighting must be"):
        PerturbDiff(setup_adata, **tiny(energy_weighting="t"))


def test_edm_preconditioning_passes_the_state_through_at_low_noise(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **tiny(preconditioning="edm"))
    module = model.module
    x = setup_adata.X.toarray()
    assert module.sigma_data == pytest.approx(x.std(), rel=1e-4)  # "auto": std of every training value
    assert not module.denoiser.final.nonnegative  # raw network output; the ReLU comes after the skip term

    def zero_net(x_t, t, *condition):
        return torch.zeros_like(x_t)

    x_t = torch.rand(2, 3, 4)
    low = module._x0(zero_net, x_t, torch.tensor([0, 0]))
    high = module._x0(zero_net, x_t, torch.tensor([99, 99]))
    abar0 = float(module.diffusion.alphas_cumprod[0])
    torch.testing.assert_close(low, x_t / abar0**0.5, rtol=0.02, atol=1e-3)  # c_skip ~ 1 at t = 0
    assert high.abs().max() < 0.05  # c_skip ~ 0 at pure noise: the network gives the whole estimate
    assert PerturbDiff(setup_adata, **TINY).module.sigma_data == 1.0  # unused without preconditioning
    with pytest.raises(ValueError, match="preconditioning must be"):
        PerturbDiff(setup_adata, **tiny(preconditioning="karras"))
    with pytest.raises(ValueError, match="sigma_data must be"):
        PerturbDiff(setup_adata, **tiny(preconditioning="edm", sigma_data=-1.0))


def test_edm_shrink_was_removed(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(ValueError, match="preconditioning='edm_shrink' was removed in 0.2.0"):
        PerturbDiff(setup_adata, **tiny(preconditioning="edm_shrink"))


def test_progress_bar_flag(shared_model, monkeypatch):
    import scvi.utils

    seen = []
    real_track = scvi.utils.track

    def spy(iterable, **kwargs):
        seen.append(kwargs.get("disable"))
        return real_track(iterable, **kwargs)

    monkeypatch.setattr(scvi.utils, "track", spy)
    shared_model.predict_population(
        "A", contexts="c0", n_cells=64, seed=0, sampler_options=SamplerOptions(batch_size=2, progress_bar=False)
    )
    shared_model.predict_population(
        "A", contexts="c0", n_cells=64, seed=0, sampler_options=SamplerOptions(batch_size=2)
    )
    assert seen == [True, False]
    with pytest.raises(ValueError, match="progress_bar must be True or False"):
        shared_model.predict_population(
            "A", contexts="c0", n_cells=8, sampler_options=SamplerOptions(progress_bar="no")
        )


def test_transport_counts_take_the_library_of_distinct_control_cells(counts_model):
    # transport="quantile" builds the population from distinct control cells; counts=True then gives each output
    # cell the library size of the control cell it comes from, so the libraries are those of distinct pool cells.
    model = counts_model
    obs = model.adata.obs
    pool = ((obs["pert"] == "ctrl") & (obs["ctx"] == "c0") & (obs["batch"] == "b0")).to_numpy()
    n = int(pool.sum())
    pred = model.predict_population(
        "A",
        contexts="c0",
        batches="b0",
        n_cells=n,
        seed=0,
        output_options=OutputOptions(counts=True, transport="quantile"),
    )
    pool_libs = np.sort(np.asarray(model.adata.layers["counts"][pool].sum(1)).ravel())
    np.testing.assert_array_equal(np.sort(pred.layers["counts"].sum(1)), pool_libs)


def test_context_embedding_false_trains_saves_and_loads(setup_adata, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **tiny(context_embedding=False))
    assert model.module.denoiser.cov_embed.context is None
    assert not any("cov_embed.context" in name for name in model.module.state_dict())
    model.train(**TINY_TRAIN)
    a = model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=2)
    # the context still picks the control cells the prediction starts from
    b = model.predict_population("A", contexts="c1", n_cells=9, seed=3, n_steps=2)
    assert np.isfinite(a.X).all() and not np.allclose(a.X, b.X)
    model.save(tmp_path / "model", overwrite=True)
    loaded = PerturbDiff.load(tmp_path / "model", adata=setup_adata.copy())
    assert loaded.init_params_["non_kwargs"]["options"]["context_embedding"] is False
    c = loaded.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=2)
    np.testing.assert_array_equal(a.X, c.X)


def test_control_skip_starts_each_cell_from_its_paired_control_cell(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **tiny(control_skip=True))
    module = model.module
    assert not module.denoiser.final.nonnegative  # raw change; the ReLU comes after adding the control cell

    def zero_net(x_t, t, *condition):
        return torch.zeros_like(x_t)

    def minus_one(x_t, t, *condition):
        return -torch.ones_like(x_t)

    x_t, x_ctrl = torch.randn(2, 3, 4), torch.rand(2, 3, 4) * 3
    t = torch.tensor([999, 0])
    torch.testing.assert_close(module._x0(zero_net, x_t, t, x_ctrl), x_ctrl)  # no change = the control cells
    torch.testing.assert_close(module._x0(minus_one, x_t, t, x_ctrl), torch.relu(x_ctrl - 1))
    # it trains and predicts (whether it helps is measured in benchmarks/results/peers_ablations)
    model.train(**TINY_TRAIN)
    pred = model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=2)
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    with pytest.raises(ValueError, match="control_skip must be True or False"):
        PerturbDiff(setup_adata, **tiny(control_skip=1))
    with pytest.raises(ValueError, match="needs preconditioning='none'"):
        PerturbDiff(setup_adata, **tiny(control_skip=True, preconditioning="edm"))
