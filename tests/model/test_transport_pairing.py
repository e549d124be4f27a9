"""transport="quantile" (control cells onto the generated marginals); the removed training options pairing,
energy_pcs and p_high_noise."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import TINY

from perturbdiff_scvi.model import OutputOptions, SamplerOptions
from perturbdiff_scvi.model._transport import quantile_transport


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


def test_predict_transport_keeps_the_generated_marginals(shared_model):
    kwargs = {"contexts": "c0", "n_cells": 37, "seed": 3}  # not a multiple of set_size
    plain = shared_model.predict_population("A", **kwargs)
    moved = shared_model.predict_population("A", **kwargs, output_options=OutputOptions(transport="quantile"))
    assert moved.uns["perturbdiff"]["transport"] == "quantile"
    assert plain.uns["perturbdiff"]["transport"] == "none"
    x, y = np.asarray(plain.X), np.asarray(moved.X)
    np.testing.assert_allclose(np.sort(x, axis=0), np.sort(y, axis=0))
    assert not np.allclose(x, y)
    np.testing.assert_array_equal(moved.obs_names, plain.obs_names)


def test_predict_transport_rejects_unknown_values(shared_model):
    with pytest.raises(ValueError, match="transport must be one of"):
        shared_model.predict_population(
            "A",
            contexts="c0",
            n_cells=4,
            sampler_options=SamplerOptions(progress_bar=False),
            output_options=OutputOptions(transport="ot"),
        )


# ----------------------------------------------------------------- removed training options
@pytest.mark.parametrize("kwargs", [{"pairing": "ot"}, {"p_high_noise": 0.5}, {"energy_pcs": 3}])
def test_removed_training_options_are_a_clear_error(setup_adata, kwargs):
    from perturbdiff_scvi import PerturbDiff

    (key,) = kwargs
    with pytest.raises(TypeError, match=f"no longer takes {key}=: removed in 0.2.0"):
        PerturbDiff(setup_adata, **{**TINY, **kwargs})


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
