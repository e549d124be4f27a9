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
