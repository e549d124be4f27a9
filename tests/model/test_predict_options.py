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


def test_auto_guidance_targets_the_response_size_of_similar_contexts(shared_model):
    """guidance_scale="auto": per condition, the target is the kernel-weighted response size of the perturbation in
    the training contexts (computed here independently from the training cells), the scale is one of the grid, and
    the choice is recorded; a seed gives the same cells."""
    from perturbdiff_scvi.model._auto_guidance import GUIDANCE_GRID

    adata = shared_model.adata
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float64)
    ctx, pert = adata.obs["ctx"].astype(str).to_numpy(), adata.obs["pert"].astype(str).to_numpy()
    kwargs = {"contexts": ["c0", "c1"], "batches": "b0", "n_cells": 20, "seed": 4, "n_steps": 2}
    auto = shared_model.predict_population("A", guidance_scale="auto", **kwargs)
    record = auto.uns["perturbdiff"]["auto_guidance"]
    assert auto.uns["perturbdiff"]["guidance_scale"] == "auto"
    assert list(record["context"]) == ["c0", "c1"] and list(record["perturbation"]) == ["A", "A"]
    assert set(record["guidance_scale"]) <= set(GUIDANCE_GRID)
    contexts = sorted(set(ctx))
    ctrl = {c: X[(ctx == c) & (pert == "ctrl")].mean(0) for c in contexts}
    size = {c: np.linalg.norm(X[(ctx == c) & (pert == "A")].mean(0) - ctrl[c]) for c in contexts}
    for here, target in zip(["c0", "c1"], record["target_shift"], strict=True):
        d = np.array([np.linalg.norm(ctrl[c] - ctrl[here]) for c in contexts])
        w = np.exp(-((d / d[d > 0].min()) ** 2))
        assert target == pytest.approx(np.sum(w * [size[c] for c in contexts]) / w.sum())
    again = shared_model.predict_population("A", guidance_scale="auto", **kwargs)
    np.testing.assert_array_equal(auto.X, again.X)
    # each condition's cells are those of its chosen scale (the probes do not move the final draws)
    if len(set(record["guidance_scale"])) == 1:
        fixed = shared_model.predict_population("A", guidance_scale=float(record["guidance_scale"][0]), **kwargs)
        np.testing.assert_array_equal(auto.X, fixed.X)


def test_auto_guidance_falls_back_to_the_default_without_an_estimate(shared_model):
    from perturbdiff_scvi.model import DEFAULT_GUIDANCE_SCALE
    from perturbdiff_scvi.model._auto_guidance import response_size_target

    means = {(0, 0): np.zeros(3), (1, 0): np.ones(3)}
    assert response_size_target(means, control_code=0, code=2, ctx=0) is None  # never measured
    assert response_size_target(means, control_code=0, code=-1, ctx=0) is None  # a combination never registered
    assert response_size_target(means, control_code=0, code=1, ctx=0) == pytest.approx(np.sqrt(3))  # seen here
    control = shared_model.predict_population("ctrl", guidance_scale="auto", contexts="c0", n_cells=8, seed=0)
    assert np.isfinite(control.X).all()
    assert set(control.uns["perturbdiff"]["auto_guidance"]["guidance_scale"]) <= {0.0, 0.125, 0.25, 0.375,
                                                                                   DEFAULT_GUIDANCE_SCALE, 0.625,
                                                                                   0.75, 1.0, 1.25, 1.5}  # fmt: skip
