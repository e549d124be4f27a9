"""predict_population options: zero_threshold (a realistic zero pattern for DE) and the default guidance."""

from __future__ import annotations

import numpy as np
import pytest

from perturbdiff_scvi.metrics import realistic_zero_threshold
from perturbdiff_scvi.model import OutputOptions


def test_auto_threshold_zeroes_exactly_the_values_below_the_training_quantile(shared_model):
    kwargs = {"contexts": "c0", "batches": "b0", "n_cells": 40, "seed": 0, "n_steps": 10}
    dense = shared_model.predict_population("A", **kwargs)
    zeroed = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(zero_threshold="auto"))
    threshold = realistic_zero_threshold(shared_model.adata.X)
    assert threshold > 0
    assert zeroed.uns["perturbdiff"]["zero_threshold"] == pytest.approx(threshold)
    assert dense.uns["perturbdiff"]["zero_threshold"] == "None"
    below = np.asarray(dense.X) < threshold
    assert below.any() and (~below).any()  # the check can fail both ways on this data
    np.testing.assert_array_equal(np.asarray(zeroed.X)[below], 0.0)
    np.testing.assert_array_equal(np.asarray(zeroed.X)[~below], np.asarray(dense.X)[~below])
    assert (np.asarray(zeroed.X) == 0).mean() > (np.asarray(dense.X) == 0).mean()


def test_numeric_threshold_and_zero_is_a_no_op(shared_model):
    kwargs = {"n_cells": 10, "seed": 1, "n_steps": 5}
    dense = shared_model.predict_population("B", **kwargs)
    np.testing.assert_array_equal(
        shared_model.predict_population("B", **kwargs, output_options=OutputOptions(zero_threshold=0)).X, dense.X
    )
    high = shared_model.predict_population("B", **kwargs, output_options=OutputOptions(zero_threshold=1e9))
    assert (np.asarray(high.X) == 0).all()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "median", True, [0.1]])
def test_bad_zero_threshold_is_a_clear_error(shared_model, bad):
    with pytest.raises(ValueError, match="zero_threshold"):
        shared_model.predict_population("A", n_cells=4, output_options=OutputOptions(zero_threshold=bad))


def test_default_guidance_is_recorded_and_differs_from_the_released_value(shared_model):
    from perturbdiff_scvi.model import DEFAULT_GUIDANCE_SCALE

    kwargs = {"n_cells": 10, "seed": 2, "n_steps": 5}
    default = shared_model.predict_population("A", **kwargs)
    assert default.uns["perturbdiff"]["guidance_scale"] == DEFAULT_GUIDANCE_SCALE == 0.5
    explicit = shared_model.predict_population("A", guidance_scale=0.5, **kwargs)
    np.testing.assert_array_equal(default.X, explicit.X)
    released = shared_model.predict_population("A", guidance_scale=1.0, **kwargs)
    assert not np.allclose(default.X, released.X)
