"""OutputOptions(shift_pcs=k): the population's mean shift kept on the top k principal axes of the training cells."""

from __future__ import annotations

import numpy as np
import pytest

from perturbdiff_scvi.model import OutputOptions
from perturbdiff_scvi.model._shift_pcs import principal_axes, project_shifts


def test_principal_axes_are_the_widest_directions_and_subsample_large_matrices():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 6)) * np.array([8.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    axes = principal_axes(x, 2)
    assert axes.shape == (6, 2)
    np.testing.assert_allclose(axes.T @ axes, np.eye(2), atol=1e-6)  # orthonormal
    assert set(np.abs(axes).argmax(0)) == {0, 1}  # the two widest genes
    sub = principal_axes(x, 2, max_cells=500)  # a random half-thousand rows: the same two directions
    assert set(np.abs(sub).argmax(0)) == {0, 1}


class _Source:
    """The two methods of ``ControlSource`` that ``project_shifts`` reads: one pool of control cells."""

    def __init__(self, controls):
        self.controls = controls

    def pool(self, c, b):
        return np.arange(len(self.controls))

    def rows(self, c, b, idx):
        return self.controls[idx]


class _Cond:
    ctx, batch, n = 0, 0, 6


def test_project_shifts_keeps_the_shift_on_the_axes_and_each_cells_deviation():
    rng = np.random.default_rng(1)
    controls = rng.uniform(5, 6, size=(10, 4))
    cells = [rng.uniform(5, 6, size=(4, 4)) + [3.0, 1.0, 0.5, -0.5], rng.uniform(5, 6, size=(4, 4))]
    axes = np.eye(4)[:, :2]  # genes 0 and 1
    out = project_shifts({(0, 0): [0, 1]}, [_Cond()], cells, _Source(controls), axes)
    kept_in, kept_out = np.concatenate(cells)[:6], np.concatenate(out)[:6]  # the n = 6 cells that are output
    delta_in = kept_in.mean(0) - controls.mean(0)
    delta_out = kept_out.mean(0) - controls.mean(0)
    np.testing.assert_allclose(delta_out[:2], delta_in[:2])  # on the axes: unchanged
    np.testing.assert_allclose(delta_out[2:], 0.0, atol=1e-12)  # off the axes: removed
    np.testing.assert_allclose(kept_out - kept_out.mean(0), kept_in - kept_in.mean(0))  # same spread
    assert out[0] is not cells[0]  # new arrays


def test_predict_shift_pcs_moves_only_the_mean_off_the_axes(shared_model):
    kwargs = {
        "contexts": "c0",
        "batches": "b1",
        "n_cells": 40,
        "seed": 5,
        "output_options": OutputOptions(x0_bound=None),
    }
    plain = shared_model.predict_population("A", **kwargs)
    k = 2
    moved = shared_model.predict_population(
        "A", **{**kwargs, "output_options": OutputOptions(x0_bound=None, shift_pcs=k)}
    )
    assert moved.uns["perturbdiff"]["shift_pcs"] == k and plain.uns["perturbdiff"]["shift_pcs"] == "None"
    x, y = np.asarray(plain.X, dtype=np.float64), np.asarray(moved.X, dtype=np.float64)
    correction = (y - x)[y > 0]  # where not clipped at 0, every cell moved by the same vector
    assert not np.allclose(x, y)
    train = shared_model.adata
    obs = train.obs
    ctrl = train.X[((obs["pert"] == "ctrl") & (obs["ctx"] == "c0") & (obs["batch"] == "b1")).to_numpy()].toarray()
    axes = shared_model.registry_view.principal_axes(k)
    delta = x.mean(0) - ctrl.mean(0)
    off_axes = delta - axes @ (axes.T @ delta)
    np.testing.assert_allclose(np.broadcast_to(-off_axes, x.shape)[y > 0], correction, atol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "50", 10_000])
def test_predict_shift_pcs_rejects_bad_values(shared_model, bad):
    with pytest.raises(ValueError, match="shift_pcs must be None or a whole number"):
        shared_model.predict_population("A", contexts="c0", n_cells=8, seed=0, output_options={"shift_pcs": bad})


def test_project_shifts_training_anchor_puts_the_mean_on_the_affine_span():
    rng = np.random.default_rng(1)
    axes = np.linalg.qr(rng.normal(size=(6, 2)))[0]
    center = rng.uniform(2.0, 3.0, size=6)
    cells = [rng.normal(5.0, 0.3, size=(4, 6)), rng.normal(5.0, 0.3, size=(2, 6))]  # n = 6 cells in all
    controls = rng.normal(1.0, 0.1, size=(10, 6))
    out = project_shifts({(0, 0): [0, 1]}, [_Cond()], cells, _Source(controls), axes, center)
    before, after = np.concatenate(cells), np.concatenate(out)
    moved = after.mean(0) - center  # the new mean, from the training centre: on the axes
    np.testing.assert_allclose(moved, axes @ (axes.T @ moved), atol=1e-10)
    np.testing.assert_allclose(axes.T @ (after.mean(0) - before.mean(0)), 0.0, atol=1e-10)  # unchanged on the axes
    np.testing.assert_allclose(after - after.mean(0), before - before.mean(0), atol=1e-10)  # each cell's deviation
    # the control anchor gives another answer where the control mean has a part outside the axes
    assert not np.allclose(
        np.concatenate(project_shifts({(0, 0): [0, 1]}, [_Cond()], cells, _Source(controls), axes)), after
    )


def test_predict_pcs_anchor_training_is_recorded_and_centres_on_the_training_mean(shared_model):
    k, kwargs = 2, {"contexts": "c0", "batches": "b1", "n_cells": 24, "seed": 5}
    plain = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(x0_bound=None))
    options = OutputOptions(x0_bound=None, shift_pcs=k, pcs_anchor="training")
    moved = shared_model.predict_population("A", **kwargs, output_options=options)
    assert moved.uns["perturbdiff"]["pcs_anchor"] == "training"
    assert plain.uns["perturbdiff"]["pcs_anchor"] == "controls"
    axes, center = shared_model.registry_view.principal_axes(k, return_mean=True)
    train = np.asarray(shared_model.adata.X.toarray(), dtype=np.float64)
    np.testing.assert_allclose(center, train.mean(0), atol=1e-5)  # a small matrix: all its cells fit the PCA
    x, y = np.asarray(plain.X, dtype=np.float64), np.asarray(moved.X, dtype=np.float64)
    d = x.mean(0) - center
    off_axes = d - axes @ (axes.T @ d)  # the part of the mean, from the training centre, outside the axes
    assert np.abs(off_axes).max() > 1e-3
    np.testing.assert_allclose(np.broadcast_to(-off_axes, x.shape)[y > 0], (y - x)[y > 0], atol=1e-4)


@pytest.mark.parametrize(("options", "match"), [
    ({"shift_pcs": 2, "pcs_anchor": "train"}, "pcs_anchor must be one of"),
    ({"shift_pcs": 2, "pcs_anchor": None}, "pcs_anchor must be one of"),
    ({"pcs_anchor": "training"}, "shift_pcs is None"),
])  # fmt: skip
def test_predict_pcs_anchor_rejects_bad_values(shared_model, options, match):
    with pytest.raises(ValueError, match=match):
        shared_model.predict_population("A", contexts="c0", n_cells=8, seed=0, output_options=options)
