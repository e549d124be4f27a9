"""Noise schedules and timestep respacing (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from perturbdiff_scvi.diffusion import (
    GaussianDiffusion,
    cosine_beta_schedule,
    get_named_beta_schedule,
    linear_beta_schedule,
    space_timesteps,
)


def test_linear_schedule_t1000_is_ho_et_al_exactly():
    expected = np.linspace(1e-4, 0.02, 1000)
    betas = linear_beta_schedule(1000)
    assert betas.dtype == np.float64
    np.testing.assert_array_equal(betas, expected)
    np.testing.assert_array_equal(get_named_beta_schedule("linear", 1000), expected)


def test_linear_schedule_short_t_is_rescaled_and_valid():
    betas = linear_beta_schedule(10)
    assert betas.shape == (10,)
    np.testing.assert_allclose(betas[0], 100 * 1e-4)
    assert betas[-1] == pytest.approx(0.999)  # 100 * 0.02 = 2 is capped
    assert np.all(np.diff(betas) > 0)
    assert np.all((betas > 0) & (betas < 1))


def test_alphas_cumprod_matches_closed_form():
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = np.cumprod(1.0 - betas)
    diffusion = GaussianDiffusion(1000, "linear")
    assert diffusion.alphas_cumprod.dtype.is_floating_point
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy().astype(np.float64), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(diffusion.betas.numpy().astype(np.float64), betas, rtol=1e-6)
    # The float64 copy used for step coefficients is the exact closed form.
    np.testing.assert_array_equal(diffusion._alphas_cumprod64, expected)
    assert diffusion.n_timesteps == 1000


@pytest.mark.parametrize("n_timesteps", [10, 1000])
def test_cosine_schedule_monotone_in_unit_interval(n_timesteps):
    betas = cosine_beta_schedule(n_timesteps)
    assert betas.shape == (n_timesteps,)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(betas) >= 0)
    abar = np.cumprod(1 - betas)
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0)
    np.testing.assert_array_equal(get_named_beta_schedule("cosine", n_timesteps), betas)


def test_space_timesteps_50_of_1000():
    steps = space_timesteps(1000, 50)
    assert steps.shape == (50,)
    assert len(np.unique(steps)) == 50
    assert np.all(np.diff(steps) < 0)
    assert steps[0] == 999
    assert steps[-1] == 0


def test_space_timesteps_full_is_arange_descending():
    np.testing.assert_array_equal(space_timesteps(1000, 1000), np.arange(999, -1, -1))


@pytest.mark.parametrize("n_timesteps,n_steps", [(10, 2), (10, 3), (20, 7), (100, 99)])
def test_space_timesteps_contains_both_ends(n_timesteps, n_steps):
    steps = space_timesteps(n_timesteps, n_steps)
    assert len(steps) == n_steps
    assert steps[0] == n_timesteps - 1 and steps[-1] == 0
    assert np.all(np.diff(steps) < 0)


@pytest.mark.parametrize("n_steps", [0, 1001, -3])
def test_space_timesteps_invalid(n_steps):
    with pytest.raises(ValueError, match=rf"n_steps must be between 1 and .* \(1000\); got {n_steps}\."):
        space_timesteps(1000, n_steps)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="Unknown beta schedule 'bogus'; choose 'linear' or 'cosine'"):
        get_named_beta_schedule("bogus", 1000)
    with pytest.raises(ValueError, match="Unknown beta schedule 'bogus'"):
        GaussianDiffusion(10, "bogus")
