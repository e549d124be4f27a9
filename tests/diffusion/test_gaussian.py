"""Forward noising and DDIM / DDPM reverse steps of GaussianDiffusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_scvi.diffusion import GaussianDiffusion, sample_loop, sample_loop_progressive


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x0(shape=(2, 4, 3), seed=0) -> torch.Tensor:
    # Clean sets well above the guidance cutoff (1e-4), like non-negative log1p expression.
    return 0.1 + torch.rand(shape, generator=_gen(seed))


def test_q_sample_moments():
    diffusion = GaussianDiffusion(100)
    n = 20000
    x0_vals = torch.tensor([0.0, 1.5, -2.0])
    ts = torch.tensor([5, 60])  # one timestep per set
    x0 = x0_vals.expand(2, n, 3).clone()
    noise = torch.randn(x0.shape, generator=_gen(1))
    x_t = diffusion.q_sample(x0, ts, noise)
    for b, t in enumerate(ts.tolist()):
        abar = float(diffusion._alphas_cumprod64[t])
        mean, var = x_t[b].double().mean(0), x_t[b].double().var(0)
        tol_mean = 5 * np.sqrt((1 - abar) / n)
        np.testing.assert_allclose(mean.numpy(), np.sqrt(abar) * x0_vals.double().numpy(), atol=tol_mean)
        # sd of the sample variance is ~ sqrt(2 / n) * var
        np.testing.assert_allclose(var.numpy(), np.full(3, 1 - abar), rtol=5 * np.sqrt(2 / n))


def test_q_sample_is_exact_affine_combination():
    diffusion = GaussianDiffusion(50)
    x0, noise = _x0(), torch.randn(2, 4, 3, generator=_gen(2))
    t = torch.tensor([0, 49])
    abar = diffusion.alphas_cumprod[t].view(-1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_eps_from_x0_inverts_q_sample():
    diffusion = GaussianDiffusion(100)
    x0, noise = _x0((3, 5, 4)), torch.randn(3, 5, 4, generator=_gen(3))
    t = torch.tensor([3, 50, 99])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)
    # float64 inputs: agreement to rounding error
    x0d, noised = x0.double(), noise.double()
    torch.testing.assert_close(
        diffusion.eps_from_x0(diffusion.q_sample(x0d, t, noised), t, x0d), noised, atol=1e-10, rtol=1e-10
    )


def test_ddim_oracle_ends_at_x0_and_preserves_noise():
    """With a denoiser that knows x0, every DDIM iterate is q_sample(x0, t, eps) for the initial eps."""
    diffusion = GaussianDiffusion(100)
    x0 = _x0()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def oracle(x_t, t, self_cond, drop):
        seen.append((x_t.clone(), t.clone()))
        return x0

    out = sample_loop(
        oracle, diffusion, tuple(x0.shape), n_steps=10, sampler="ddim", guidance_scale=0, generator=_gen(7)
    )
    torch.testing.assert_close(out, x0)
    x_T = torch.randn(x0.shape, generator=_gen(7))  # the initial pure noise drawn by the loop
    assert torch.equal(seen[0][0], x_T)
    assert [int(t[0]) for _, t in seen] == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    # x_T is not exactly q_sample(x0, T-1, .): the noise DDIM keeps is the one implied at the first step.
    eps0 = diffusion.eps_from_x0(x_T, seen[0][1], x0)
    for x_t, t in seen[1:]:
        torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x_t, diffusion.q_sample(x0, t, eps0), atol=1e-5, rtol=1e-5)


def test_ddim_deterministic_given_generator():
    diffusion = GaussianDiffusion(100)
    x0 = _x0()
    oracle = lambda x_t, t, sc, drop: x0
    a = sample_loop(oracle, diffusion, tuple(x0.shape), n_steps=5, guidance_scale=0, generator=_gen(11))
    b = sample_loop(oracle, diffusion, tuple(x0.shape), n_steps=5, guidance_scale=0, generator=_gen(11))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_seed_reproducibility_non_oracle(sampler):
    diffusion = GaussianDiffusion(100)

    def denoise(x_t, t, self_cond, drop):
        return (0.5 * x_t).clamp_min(0)

    shape = (2, 6, 5)
    runs = [
        sample_loop(denoise, diffusion, shape, n_steps=8, sampler=sampler, guidance_scale=0, generator=_gen(seed))
        for seed in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    assert runs[0].shape == shape
    assert (runs[0] >= 0).all()


def test_ddpm_oracle_ends_at_x0():
    diffusion = GaussianDiffusion(100)
    x0 = _x0()
    out = sample_loop(
        lambda x_t, t, sc, drop: x0,
        diffusion,
        tuple(x0.shape),
        n_steps=10,
        sampler="ddpm",
        guidance_scale=0,
        generator=_gen(5),
    )
    torch.testing.assert_close(out, x0)


def test_ddpm_oracle_iterates_follow_fixed_large_variance_chain():
    """With an oracle, DDPM iterates are Gaussian; track their exact mean/variance recursively (float64)
    from x_T ~ N(0, 1) through ``x_prev = c0 x0 + ct x_t + sqrt(beta) z`` and compare with many cells."""
    diffusion = GaussianDiffusion(100)
    n = 4000
    x0 = torch.full((1, n, 2), 0.7)
    seen = []

    def oracle(x_t, t, sc, drop):
        seen.append((x_t.clone(), int(t[0])))
        return x0

    sample_loop(oracle, diffusion, tuple(x0.shape), n_steps=5, sampler="ddpm", guidance_scale=0, generator=_gen(9))
    abar = diffusion._alphas_cumprod64
    mean, var = 0.0, 1.0
    for (_, t), (x_prev, t_prev) in zip(seen[:-1], seen[1:], strict=True):
        beta = 1 - abar[t] / abar[t_prev]
        c0 = np.sqrt(abar[t_prev]) * beta / (1 - abar[t])
        ct = np.sqrt(1 - beta) * (1 - abar[t_prev]) / (1 - abar[t])
        mean, var = c0 * 0.7 + ct * mean, ct**2 * var + beta
        x_prev = x_prev.double()
        m = 2 * n
        assert float(x_prev.mean()) == pytest.approx(mean, abs=5 * np.sqrt(var / m))
        assert float(x_prev.var()) == pytest.approx(var, rel=5 * np.sqrt(2 / m))
    # Fixed-large variance is over-dispersed w.r.t. the forward marginal 1 - abar at the last step.
    assert var > 1 - abar[seen[-1][1]]


@pytest.mark.parametrize("t,t_prev", [(50, 40), (99, 0), (10, 9)])
def test_ddpm_step_posterior_mean_closed_form(t, t_prev):
    diffusion = GaussianDiffusion(100)
    x_t = torch.randn(2, 3, 4, generator=_gen(0), dtype=torch.float64)
    x0 = torch.rand(2, 3, 4, generator=_gen(1), dtype=torch.float64)
    abar = np.cumprod(1 - np.linspace(10 * 1e-4, 10 * 0.02, 100))  # T=100: end points scaled by 1000/T
    a_t, a_p = abar[t], abar[t_prev]
    # Independent derivation: Gaussian conditioning of x_prev ~ N(sqrt(a_p) x0, 1 - a_p) on
    # x_t | x_prev ~ N(sqrt(a_t / a_p) x_prev, 1 - a_t / a_p).
    alpha = a_t / a_p
    beta = 1 - alpha
    post_var = 1 / (1 / (1 - a_p) + alpha / beta)
    expected = post_var * (np.sqrt(a_p) * x0 / (1 - a_p) + np.sqrt(alpha) * x_t / beta)
    mean = diffusion.ddpm_step(x_t, x0, t, t_prev, torch.zeros_like(x_t))
    torch.testing.assert_close(mean, expected, rtol=1e-9, atol=1e-9)
    # Textbook coefficients, too.
    coef_x0 = np.sqrt(a_p) * beta / (1 - a_t)
    coef_xt = np.sqrt(alpha) * (1 - a_p) / (1 - a_t)
    torch.testing.assert_close(mean, coef_x0 * x0 + coef_xt * x_t, rtol=1e-9, atol=1e-9)
    # Fixed-large variance: noise enters with sqrt(beta) of the respaced chain.
    noise = torch.randn(2, 3, 4, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(diffusion.ddpm_step(x_t, x0, t, t_prev, noise) - mean, np.sqrt(beta) * noise)
    if t_prev == t - 1:  # unrespaced step: the chain's beta is the schedule's beta
        assert beta == pytest.approx(float(diffusion.betas[t]), rel=1e-5)


def test_ddim_step_closed_form():
    diffusion = GaussianDiffusion(100)
    x_t = torch.randn(2, 3, 4, generator=_gen(0), dtype=torch.float64)
    x0 = torch.rand(2, 3, 4, generator=_gen(1), dtype=torch.float64)
    t, t_prev = 70, 30
    a_t = float(diffusion.alphas_cumprod[t])
    a_p = float(diffusion._alphas_cumprod64[t_prev])
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    torch.testing.assert_close(diffusion.ddim_step(x_t, x0, t, t_prev), np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps)


def test_last_step_returns_x0():
    diffusion = GaussianDiffusion(10)
    x_t, x0 = torch.randn(1, 2, 3), torch.rand(1, 2, 3)
    assert torch.equal(diffusion.ddim_step(x_t, x0, 0, -1), x0)
    assert torch.equal(diffusion.ddpm_step(x_t, x0, 0, -1, torch.randn(1, 2, 3)), x0)


def test_invalid_sampler():
    diffusion = GaussianDiffusion(10)
    with pytest.raises(ValueError, match="sampler must be 'ddim', 'ddpm' or 'ddim_truncated'; got 'euler'"):
        sample_loop(lambda x_t, t, sc, d: x_t, diffusion, (1, 2, 3), n_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="got 'bogus'"):
        next(sample_loop_progressive(lambda x_t, t, sc, d: x_t, diffusion, (1, 2, 3), sampler="bogus"))
