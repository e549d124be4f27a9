"""predict_population(bias_correction=True): subtract the model's per-gene error on regenerated controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_scvi.model import OutputOptions


def _mean(x) -> np.ndarray:
    return np.asarray(x.mean(axis=0)).ravel()


def test_bias_correction_moves_generated_controls_onto_real_controls(shared_model):
    # An under-trained model regenerates the controls of a context with a clear per-gene error; the
    # correction estimates that error from the same control draws and removes it.
    kwargs = {"contexts": "c0", "batches": "b0", "n_cells": 256, "seed": 0, "n_steps": 10}
    plain = shared_model.predict_population("ctrl", **kwargs)
    corrected = shared_model.predict_population("ctrl", **kwargs, output_options=OutputOptions(bias_correction=True))
    data = shared_model.adata
    obs = data.obs
    real = _mean(data[(obs["pert"] == "ctrl") & (obs["ctx"] == "c0") & (obs["batch"] == "b0")].X)
    error_plain = np.abs(_mean(plain.X) - real).mean()
    error_corrected = np.abs(_mean(corrected.X) - real).mean()
    assert error_corrected < 0.5 * error_plain, (error_plain, error_corrected)
    assert (np.asarray(corrected.X) >= 0).all()
    assert corrected.uns["perturbdiff"]["bias_correction"] is True
    assert plain.uns["perturbdiff"]["bias_correction"] is False


def test_bias_correction_is_seeded_and_keeps_the_layout(shared_model):
    a = shared_model.predict_population(
        ["A", "B"], n_cells=5, n_populations=2, seed=3, output_options=OutputOptions(bias_correction=True)
    )
    b = shared_model.predict_population(
        ["A", "B"], n_cells=5, n_populations=2, seed=3, output_options=OutputOptions(bias_correction=True)
    )
    plain = shared_model.predict_population(["A", "B"], n_cells=5, n_populations=2, seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.shape == plain.shape
    assert a.obs.equals(plain.obs)
    assert not np.allclose(a.X, plain.X)


# ------------------------------------------------------------------------------- a known bias on a real perturbation
G = 30
EFFECT_A = np.zeros(G, dtype=np.float32)
EFFECT_A[:5], EFFECT_A[5:10] = 1.0, -0.6  # the real effect of A: genes 0-4 up, 5-9 down
BIAS_C0 = np.zeros(G, dtype=np.float32)
BIAS_C0[10:15], BIAS_C0[20:] = 0.8, 0.3  # the model's systematic error in context c0, for every perturbation


def _code(model, key: str, value: str) -> int:
    return list(model.adata_manager.get_state_registry(key).categorical_mapping).index(value)


class _FakeSampler:
    """Stands in for ``module.sample``: generated set = controls + real effect of its perturbation + the context's
    bias, clipped at 0 like the model's ReLU output. Records every call's inputs."""

    def __init__(self, model, bias: bool):
        self.effect = torch.zeros(3, G)
        self.effect[_code(model, "perturbation", "A")] = torch.from_numpy(EFFECT_A)
        self.bias = torch.zeros(2, G)
        if bias:
            self.bias[_code(model, "context", "c0")] = torch.from_numpy(BIAS_C0)
        self.calls = []

    def __call__(self, x_ctrl, pert, ctx, batch, **kwargs):
        self.calls.append((x_ctrl.clone(), pert.clone(), ctx.clone()))
        return (x_ctrl + (self.effect[pert] + self.bias[ctx])[:, None, :]).clamp_min(0)


def test_bias_correction_removes_a_known_context_bias_and_keeps_the_real_effect(shared_model, monkeypatch):
    kwargs = {"contexts": ["c0", "c1"], "batches": "b0", "n_cells": 24, "seed": 0, "n_steps": 2}  # 3 sets each
    unbiased = _FakeSampler(shared_model, bias=False)
    monkeypatch.setattr(shared_model.module, "sample", unbiased)
    truth = shared_model.predict_population("A", **kwargs)  # controls + real effect, no bias
    biased = _FakeSampler(shared_model, bias=True)
    monkeypatch.setattr(shared_model.module, "sample", biased)
    plain = shared_model.predict_population("A", **kwargs)
    biased.calls.clear()
    corrected = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(bias_correction=True))

    # Two passes over the same control draws: the requested perturbation, then the control (to estimate the bias).
    ctrl_code, a_code = _code(shared_model, "perturbation", "ctrl"), _code(shared_model, "perturbation", "A")
    first, second = biased.calls
    assert (first[1] == a_code).all() and (second[1] == ctrl_code).all()
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])
    x_ctrl = first[0].numpy().reshape(-1, G)  # the controls behind the output cells, in output order

    x_plain, x_corr, x_truth = (np.asarray(a.X) for a in (plain, corrected, truth))
    c0 = (corrected.obs["ctx"] == "c0").to_numpy()
    np.testing.assert_array_equal(plain.obs["ctx"].to_numpy(), corrected.obs["ctx"].to_numpy())
    # The corrected prediction is the unbiased one: the bias is removed, A's effect (up and down) is kept.
    np.testing.assert_allclose(x_corr, x_truth, atol=1e-5)
    np.testing.assert_allclose(x_corr, np.maximum(x_ctrl + EFFECT_A, 0), atol=1e-5)
    shift = _mean(x_corr[c0]) - _mean(x_ctrl[c0])
    np.testing.assert_allclose(shift[:5], 1.0, atol=1e-5)  # up-regulation kept in full
    assert (shift[5:10] < -0.3).all()  # down-regulation kept (less than 0.6 where controls are near 0)
    # Against the uncorrected prediction the difference is exactly the bias, where clipping at 0 cannot interfere
    # (genes A does not lower); in c1, where the model has no bias, the correction changes nothing.
    unclipped = EFFECT_A >= 0
    np.testing.assert_allclose(
        (x_plain - x_corr)[c0][:, unclipped], np.broadcast_to(BIAS_C0[unclipped], (24, 25)), atol=1e-5
    )
    np.testing.assert_allclose(x_corr[~c0], x_plain[~c0], atol=1e-6)
    assert np.abs(x_plain[c0] - x_corr[c0]).max() == pytest.approx(0.8)


def test_bias_correction_cancels_an_offset_added_to_the_shared_model(shared_model, monkeypatch):
    """Wrap the trained model's own sampler so that every generated set of context c0 gets a per-gene offset:
    the uncorrected prediction moves by exactly that offset, the corrected one does not move."""
    kwargs = {"contexts": ["c0", "c1"], "batches": "b0", "n_cells": 16, "seed": 4, "n_steps": 3}
    before_plain = shared_model.predict_population("A", **kwargs)
    before_corr = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(bias_correction=True))
    offset = torch.linspace(0.2, 1.0, G)
    c0 = _code(shared_model, "context", "c0")
    real_sample = shared_model.module.sample

    def offset_sample(x_ctrl, pert, ctx, batch, **kw):
        return real_sample(x_ctrl, pert, ctx, batch, **kw) + (ctx == c0).float()[:, None, None] * offset

    monkeypatch.setattr(shared_model.module, "sample", offset_sample)
    after_plain = shared_model.predict_population("A", **kwargs)
    after_corr = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(bias_correction=True))
    in_c0 = (after_plain.obs["ctx"] == "c0").to_numpy()
    shift = np.asarray(after_plain.X) - np.asarray(before_plain.X)
    np.testing.assert_allclose(shift[in_c0], np.broadcast_to(offset.numpy(), (16, G)), atol=1e-5)
    np.testing.assert_array_equal(shift[~in_c0], 0)
    np.testing.assert_allclose(np.asarray(after_corr.X), np.asarray(before_corr.X), atol=1e-5)
    # the model's own error is corrected too: the corrected prediction is not the uncorrected one minus the offset
    assert not np.allclose(np.asarray(before_corr.X), np.asarray(before_plain.X), atol=1e-3)
