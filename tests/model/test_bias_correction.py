"""predict_population(bias_correction=True): subtract the model's per-gene error on regenerated controls."""

from __future__ import annotations

import numpy as np


def _mean(x) -> np.ndarray:
    return np.asarray(x.mean(axis=0)).ravel()


def test_bias_correction_moves_generated_controls_onto_real_controls(trained_model, setup_adata):
    # An under-trained model regenerates the controls of a context with a clear per-gene error; the
    # correction estimates that error from the same control draws and removes it.
    kwargs = {"contexts": "c0", "batches": "b0", "n_cells": 256, "seed": 0, "n_steps": 10}
    plain = trained_model.predict_population("ctrl", **kwargs)
    corrected = trained_model.predict_population("ctrl", bias_correction=True, **kwargs)
    obs = setup_adata.obs
    real = _mean(setup_adata[(obs["pert"] == "ctrl") & (obs["ctx"] == "c0") & (obs["batch"] == "b0")].X)
    error_plain = np.abs(_mean(plain.X) - real).mean()
    error_corrected = np.abs(_mean(corrected.X) - real).mean()
    assert error_corrected < 0.5 * error_plain, (error_plain, error_corrected)
    assert (np.asarray(corrected.X) >= 0).all()
    assert corrected.uns["perturbdiff"]["bias_correction"] is True
    assert plain.uns["perturbdiff"]["bias_correction"] is False


def test_bias_correction_is_seeded_and_keeps_the_layout(trained_model):
    a = trained_model.predict_population(["A", "B"], n_cells=5, n_populations=2, seed=3, bias_correction=True)
    b = trained_model.predict_population(["A", "B"], n_cells=5, n_populations=2, seed=3, bias_correction=True)
    plain = trained_model.predict_population(["A", "B"], n_cells=5, n_populations=2, seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.shape == plain.shape
    assert a.obs.equals(plain.obs)
    assert not np.allclose(a.X, plain.X)
