"""``DiffusionOptions(reference_shift=True)``: the denoiser adds the leave-its-context-out kernel response."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import TINY_TRAIN, make_perturbation_adata, tiny

from perturbdiff_scvi._context_kernel import kernel_weights

SETUP = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}


def _mean(adata, pert, ctx) -> np.ndarray:
    rows = ((adata.obs["pert"] == pert) & (adata.obs["ctx"] == ctx)).to_numpy()
    return np.asarray(adata.X[rows].mean(0)).ravel()


def test_kernel_weights_follow_the_nearest_context():
    np.testing.assert_allclose(kernel_weights(np.array([1.0, 2.0])), np.exp([-1.0, -4.0]))
    np.testing.assert_allclose(kernel_weights(np.array([0.0, 3.0])), np.exp([0.0, -1.0]))  # d_min: smallest > 0


def test_reference_is_the_response_in_the_other_context_and_zero_without_one(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    held = ((adata.obs["pert"] == "A") & (adata.obs["ctx"] == "c1")).to_numpy()
    train = adata[~held].copy()  # A measured in c0 only, as a held-out (A, c1)
    PerturbDiff.setup_anndata(train, **SETUP)
    model = PerturbDiff(train, **tiny(reference_shift=True))
    module, registry = model.module, model.registry_view
    assert not module.denoiser.final.nonnegative  # the ReLU comes after adding the reference
    code = {what: list(registry.categories(what)) for what in ("perturbation", "context")}
    a, b, ctrl = (code["perturbation"].index(p) for p in ("A", "B", "ctrl"))
    c0, c1 = (code["context"].index(c) for c in ("c0", "c1"))
    ref = module.reference_shift.numpy()
    shift = lambda p, c: _mean(train, p, c) - _mean(train, "ctrl", c)
    np.testing.assert_allclose(ref[a, c1], shift("A", "c0"), rtol=1e-5, atol=1e-6)  # held out: from c0
    np.testing.assert_allclose(ref[b, c0], shift("B", "c1"), rtol=1e-5, atol=1e-6)  # never its own context
    np.testing.assert_allclose(ref[b, c1], shift("B", "c0"), rtol=1e-5, atol=1e-6)
    assert not ref[a, c0].any() and not ref[ctrl].any()  # A in no other context; the control
    assert not np.allclose(ref[b, c0], shift("B", "c0"))

    # x0 = relu(F + r) in training and sampling; a never-registered code (-1) gets no reference
    zero_net = lambda x_t, t, *condition: torch.zeros_like(x_t)
    r = module.reference(torch.tensor([a, -1]), torch.tensor([c1, c1]))
    torch.testing.assert_close(r[0], torch.from_numpy(ref[a, c1]))
    assert not r[1].any()
    x_t = torch.randn(2, 3, train.n_vars)
    expected = torch.relu(r)[:, None].expand(2, 3, -1)
    torch.testing.assert_close(module._x0(zero_net, x_t, torch.tensor([5, 0]), ref=r), expected)

    model.train(**TINY_TRAIN)
    pred = model.predict_population("A", contexts="c1", n_cells=9, seed=3, n_steps=2)
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()


def test_reference_shift_saves_loads_and_checks_its_options(scvi_module, setup_adata, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(ValueError, match="reference_shift must be True or False"):
        PerturbDiff(setup_adata, **tiny(reference_shift=1))
    with pytest.raises(ValueError, match="needs preconditioning='none' and control_skip=False"):
        PerturbDiff(setup_adata, **tiny(reference_shift=True, preconditioning="edm"))
    with pytest.raises(ValueError, match="needs preconditioning='none' and control_skip=False"):
        PerturbDiff(setup_adata, **tiny(reference_shift=True, control_skip=True))
    model = PerturbDiff(setup_adata, **tiny(reference_shift=True))
    model.train(**TINY_TRAIN)
    a = model.predict_population("B", contexts="c0", n_cells=9, seed=3, n_steps=2)
    model.save(tmp_path / "model", overwrite=True)
    loaded = PerturbDiff.load(tmp_path / "model", adata=setup_adata.copy())
    torch.testing.assert_close(loaded.module.reference_shift, model.module.reference_shift)
    np.testing.assert_array_equal(a.X, loaded.predict_population("B", contexts="c0", n_cells=9, seed=3, n_steps=2).X)


def test_reference_table_too_large_is_a_clear_error(scvi_module, setup_adata, monkeypatch):
    from perturbdiff_scvi import PerturbDiff
    from perturbdiff_scvi.model import _model

    monkeypatch.setattr(_model, "MAX_REFERENCE_VALUES", 10)  # 3 perturbations x 2 contexts x 30 genes = 180
    with pytest.raises(ValueError, match="needs a table of 3 perturbations x 2 contexts x 30 genes"):
        PerturbDiff(setup_adata, **tiny(reference_shift=True))
