"""Classifier-free guidance in x0-space and how the sampling loop calls the denoiser."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_scvi.diffusion import GaussianDiffusion, guided_x0, sample_loop, sample_loop_progressive


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_guided_x0_formula_and_cutoff(w):
    c = torch.randn(3, 4, 5, generator=_gen(0))
    u = torch.randn(3, 4, 5, generator=_gen(1))
    raw = (1 + w) * c - w * u
    expected = torch.where(raw < 1e-4, torch.zeros_like(raw), raw)
    out = guided_x0(c, u, w)
    torch.testing.assert_close(out, expected)
    assert (out == 0).any() and (out > 0).any()
    assert ((out == 0) | (out >= 1e-4)).all()


def test_guided_x0_cutoff_boundary():
    c = torch.tensor([5e-5, 1e-4, 2e-4, -1.0, 0.3])
    torch.testing.assert_close(guided_x0(c, None, 1.0), torch.tensor([0.0, 1e-4, 2e-4, 0.0, 0.3]))
    torch.testing.assert_close(guided_x0(c, None, 1.0, cutoff=0.25), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3]))


def test_guided_x0_w0_is_clipped_conditional():
    c = torch.randn(2, 3, 4, generator=_gen(2))
    u = torch.randn(2, 3, 4, generator=_gen(3))
    clipped = torch.where(c < 1e-4, torch.zeros_like(c), c)
    torch.testing.assert_close(guided_x0(c, u, 0.0), clipped)
    torch.testing.assert_close(guided_x0(c, None, 2.0), clipped)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_x0_equals_eps_space_guidance(w):
    diffusion = GaussianDiffusion(1000)
    b = 4
    t = torch.tensor([0, 10, 500, 999])
    x_t = torch.randn(b, 6, 5, generator=_gen(4), dtype=torch.float64)
    x0_c = torch.randn(b, 6, 5, generator=_gen(5), dtype=torch.float64)
    x0_u = torch.randn(b, 6, 5, generator=_gen(6), dtype=torch.float64)
    eps_c = diffusion.eps_from_x0(x_t, t, x0_c)
    eps_u = diffusion.eps_from_x0(x_t, t, x0_u)
    eps = (1 + w) * eps_c - w * eps_u
    # Same (float32 buffer) coefficients as eps_from_x0, so the round trip is exact up to float64 rounding.
    abar = diffusion.alphas_cumprod[t].view(-1, 1, 1)
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert x0.dtype == torch.float64
    x0 = torch.where(x0 < 1e-4, torch.zeros_like(x0), x0)
    torch.testing.assert_close(guided_x0(x0_c, x0_u, w), x0, atol=1e-8, rtol=1e-8)


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[int, bool, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x_t, t, self_cond, drop):
        self.calls.append((int(t[0]), drop, self_cond.clone()))
        out = (x_t * (0.3 if drop else 0.6)).abs() + 0.01
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("w,expected_calls", [(0.0, 5), (1.0, 10), (-0.5, 10)])
def test_loop_calls_unconditional_only_when_guided(w, expected_calls):
    rec = _Recorder()
    diffusion = GaussianDiffusion(50)
    steps = list(sample_loop_progressive(rec, diffusion, (2, 3, 4), n_steps=5, guidance_scale=w, generator=_gen(0)))
    assert len(steps) == 5
    assert len(rec.calls) == expected_calls
    drops = [d for _, d, _ in rec.calls]
    if w == 0:
        assert drops == [False] * 5
    else:
        assert drops == [False, True] * 5  # conditional then unconditional at each step
        ts = [t for t, _, _ in rec.calls]
        assert ts[0::2] == ts[1::2]
    assert [t for t, _ in steps] == [49, 37, 24, 12, 0]


def test_loop_yields_guided_estimate_and_self_conditions_on_it():
    rec = _Recorder()
    diffusion = GaussianDiffusion(50)
    w = 1.5
    steps = list(sample_loop_progressive(rec, diffusion, (2, 3, 4), n_steps=4, guidance_scale=w, generator=_gen(1)))
    for i, (_, x0) in enumerate(steps):
        c, u = rec.outputs[2 * i], rec.outputs[2 * i + 1]
        torch.testing.assert_close(x0, guided_x0(c, u, w))
    # first step: zero self-conditioning; later steps: the previous guided estimate (same for both passes)
    assert torch.equal(rec.calls[0][2], torch.zeros(2, 3, 4))
    for i in range(1, 4):
        assert torch.equal(rec.calls[2 * i][2], steps[i - 1][1])
        assert torch.equal(rec.calls[2 * i + 1][2], steps[i - 1][1])
    final = sample_loop(_Recorder(), diffusion, (2, 3, 4), n_steps=4, guidance_scale=w, generator=_gen(1))
    torch.testing.assert_close(final, steps[-1][1])
