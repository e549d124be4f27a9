"""transport="quantile" (control cells onto the generated marginals) and the training options pairing="ot",
energy_pcs and p_high_noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TRAIN

from perturbdiff_scvi.model._ranges import principal_axes
from perturbdiff_scvi.model._transport import quantile_transport
from perturbdiff_scvi.module import energy_distance
from perturbdiff_scvi.module._module import PerturbDiffModule, ot_paired


# ----------------------------------------------------------------- quantile transport
def test_quantile_transport_has_the_generated_marginals_and_the_control_ranks():
    rng = np.random.default_rng(0)
    generated = rng.gamma(2.0, size=(200, 6))
    controls = rng.normal(size=(200, 6))  # no ties: the ranks are the controls' own
    out = quantile_transport(generated, controls, rng)
    np.testing.assert_array_equal(np.sort(out, axis=0), np.sort(generated, axis=0))  # same per-gene values
    for g in range(6):  # monotone in the control value, gene by gene
        order = np.argsort(controls[:, g])
        assert np.all(np.diff(out[order, g]) >= 0)
    # the controls' joint structure carries over: correlated control genes stay correlated
    controls[:, 1] = controls[:, 0] + 0.1 * rng.normal(size=200)
    out = quantile_transport(generated, controls, rng)
    assert np.corrcoef(out[:, 0], out[:, 1])[0, 1] > 0.9
    assert abs(np.corrcoef(generated[:, 0], generated[:, 1])[0, 1]) < 0.2


def test_quantile_transport_breaks_ties_at_random():
    generated = np.arange(100, dtype=float)[:, None]
    controls = np.zeros((100, 1))  # all tied (a gene that is zero in every control cell)
    a = quantile_transport(generated, controls, np.random.default_rng(0)).ravel()
    b = quantile_transport(generated, controls, np.random.default_rng(1)).ravel()
    assert sorted(a) == list(range(100)) and not np.array_equal(a, b)


def test_quantile_transport_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        quantile_transport(np.zeros((3, 2)), np.zeros((4, 2)), np.random.default_rng(0))


def test_predict_transport_keeps_the_generated_marginals(trained_model):
    kwargs = {"contexts": "c0", "n_cells": 37, "seed": 3, "progress_bar": False}  # not a multiple of set_size
    plain = trained_model.predict_population("A", **kwargs)
    moved = trained_model.predict_population("A", transport="quantile", **kwargs)
    assert moved.uns["perturbdiff"]["transport"] == "quantile"
    assert plain.uns["perturbdiff"]["transport"] == "none"
    x, y = np.asarray(plain.X), np.asarray(moved.X)
    np.testing.assert_allclose(np.sort(x, axis=0), np.sort(y, axis=0))
    assert not np.allclose(x, y)
    np.testing.assert_array_equal(moved.obs_names, plain.obs_names)


def test_predict_transport_rejects_unknown_values(trained_model):
    with pytest.raises(ValueError, match="transport must be one of"):
        trained_model.predict_population("A", contexts="c0", n_cells=4, transport="ot", progress_bar=False)


# ----------------------------------------------------------------- training options
def test_ot_paired_reorders_each_set_to_the_cheapest_matching():
    g = torch.Generator().manual_seed(0)
    x_ctrl = torch.rand(3, 8, 5, generator=g)
    perm = torch.stack([torch.randperm(8, generator=g) for _ in range(3)])
    x0 = torch.gather(x_ctrl + 0.01, 1, perm[:, :, None].expand(-1, -1, 5))  # shuffled near-copies
    paired = ot_paired(x0, x_ctrl)
    torch.testing.assert_close(paired, x_ctrl + 0.01)  # each target back next to its own control cell
    # a permutation of each set: the same cells, so the set-level energy is unchanged
    torch.testing.assert_close(energy_distance(paired, x_ctrl), energy_distance(x0, x_ctrl))


def _tiny_module(**kwargs) -> PerturbDiffModule:
    torch.manual_seed(0)
    cfg = {"set_size": 4, "n_hidden": 16, "depth": 1, "n_heads": 2, "n_cov": 8, "n_timesteps": 100}
    return PerturbDiffModule(6, 2, 1, 1, **{**cfg, **kwargs})


def test_p_high_noise_one_draws_only_the_top_tenth_of_timesteps():
    module = _tiny_module(p_high_noise=1.0)
    x = torch.rand(64, 4, 6)
    codes = torch.zeros(64, dtype=torch.long)
    out = module.generative(x, x, codes + 1, codes, codes, torch.zeros(64, dtype=torch.bool))
    assert out["t"].min() >= 90 and out["t"].max() <= 99
    out = _tiny_module().generative(x, x, codes + 1, codes, codes, torch.zeros(64, dtype=torch.bool))
    assert out["t"].min() < 90  # uniform otherwise


def test_principal_axes_are_the_top_directions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5.0, 3.0, 1, 1, 1, 1, 1, 1])
    axes = principal_axes(x, 2)
    assert axes.shape == (8, 2)
    np.testing.assert_allclose(axes.T @ axes, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(np.abs(axes[:2]), np.eye(2), atol=0.1)


def test_energy_pcs_fills_a_stored_basis_and_uses_it(setup_adata, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, energy_pcs=3, **TINY)
    basis = model.module.energy_basis
    assert basis.shape == (setup_adata.n_vars, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-4, rtol=0)
    model.train(**TINY_TRAIN)
    model.save(tmp_path / "m", save_anndata=True)
    loaded = PerturbDiff.load(tmp_path / "m")
    torch.testing.assert_close(loaded.module.energy_basis, model.module.energy_basis)
    # the loss's energy is the energy of the projected sets
    module = model.module.eval()
    g = torch.Generator().manual_seed(0)
    x0, x0_hat = torch.rand(2, 4, setup_adata.n_vars, generator=g), torch.rand(2, 4, setup_adata.n_vars, generator=g)
    out = module.loss({}, {"x0": x0}, {"x0_hat": x0_hat, "t": torch.zeros(2, dtype=torch.long)})
    expected = 0.5 * energy_distance(x0_hat @ basis, x0 @ basis)
    torch.testing.assert_close(out.extra_metrics["energy"], expected.mean())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pairing": "hungarian"}, "pairing must be"),
        ({"p_high_noise": 1.5}, "p_high_noise"),
        ({"energy_pcs": -1}, "energy_pcs"),
        ({"energy_pcs": 2.5}, "energy_pcs"),
        ({"energy_pcs": 10_000}, "energy_pcs=10000 exceeds"),
    ],
)
def test_training_options_reject_bad_values(setup_adata, kwargs, match):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(ValueError, match=match):
        PerturbDiff(setup_adata, **{**TINY, **kwargs})


def test_pairing_ot_trains(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, pairing="ot", **TINY)
    model.train(**TINY_TRAIN)
    assert model.module.pairing == "ot"
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()


def test_transport_draws_distinct_control_cells_even_from_repeated_conditioning_rows():
    # Every conditioning row is control cell 0 (the worst case of drawing with replacement): the transported
    # population must still be built from n distinct control cells, with the generated per-gene values.
    from perturbdiff_scvi.model._predict import Condition, Job, distinct_draw, transported

    class Source:  # the two ControlSource methods transported uses
        matrix = np.random.default_rng(0).normal(size=(10, 6))

        def pool(self, c, b):
            return np.arange(10)

        def rows(self, c, b, idx):
            return self.matrix[idx]

    n, set_size = 7, 4
    jobs = [Job(0, 0, np.zeros(set_size, dtype=int)) for _ in range(2)]
    cells = [np.random.default_rng(k).normal(size=(set_size, 6)) for k in range(2)]
    out, rows = transported(jobs, [Condition("A", 0, 0, 0, 0, n)], cells, Source(), np.random.default_rng(1))
    used = np.concatenate(rows)[:n]
    assert len(set(used.tolist())) == n
    moved = np.concatenate(out)[:n]
    np.testing.assert_allclose(np.sort(moved, axis=0), np.sort(np.concatenate(cells)[:n], axis=0))
    # each output cell has, gene by gene, the rank of the control cell it is said to come from
    ranks = lambda x: np.argsort(np.argsort(x, axis=0), axis=0)
    np.testing.assert_array_equal(ranks(moved), ranks(Source.matrix[used]))
    # the cells beyond n (cut by assemble) keep their generated values
    np.testing.assert_array_equal(np.concatenate(out)[n:], np.concatenate(cells)[n:])
    # once the pool is used up, every control cell is used as evenly as possible
    counts = np.bincount(distinct_draw(25, 10, np.random.default_rng(0)), minlength=10)
    assert counts.min() == 2 and counts.max() == 3
