"""Set losses: energy distance (V-statistic) and per-set MSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from perturbdiff_scvi.module import energy_distance, pairwise_distances, per_set_mse


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _energy_ref(x: np.ndarray, y: np.ndarray) -> float:
    return 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()


def test_energy_distance_unbatched_matches_scipy():
    x = torch.randn(6, 4, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(9, 4, generator=_gen(1), dtype=torch.float64) + 0.5
    e = energy_distance(x, y)
    assert e.ndim == 0
    # The 1e-12 clamp puts 1e-6 on the zero self-distances: bias <= 1e-6 (1/N + 1/M).
    assert float(e) == pytest.approx(_energy_ref(x.numpy(), y.numpy()), abs=1e-6)


def test_energy_distance_batched_matches_scipy():
    x = torch.randn(3, 5, 7, generator=_gen(2), dtype=torch.float64)
    y = torch.randn(3, 8, 7, generator=_gen(3), dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1)
    e = energy_distance(x, y)
    assert e.shape == (3,)
    expected = np.array([_energy_ref(x[b].numpy(), y[b].numpy()) for b in range(3)])
    np.testing.assert_allclose(e.numpy(), expected, atol=1e-6)


def test_energy_distance_float32_close_to_reference():
    x = torch.rand(2, 16, 10, generator=_gen(4)) * 3
    y = torch.rand(2, 12, 10, generator=_gen(5)) * 3 + 0.2
    e = energy_distance(x, y)
    assert e.dtype == torch.float32
    expected = np.array([_energy_ref(x[b].double().numpy(), y[b].double().numpy()) for b in range(2)])
    np.testing.assert_allclose(e.numpy(), expected, atol=2e-3)


def test_pairwise_distances_matches_cdist():
    x = torch.randn(2, 4, 3, generator=_gen(6), dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=_gen(7), dtype=torch.float64)
    d = pairwise_distances(x, y)
    assert d.shape == (2, 4, 5)
    for b in range(2):
        np.testing.assert_allclose(d[b].numpy(), cdist(x[b].numpy(), y[b].numpy()), rtol=1e-9, atol=1e-9)


def test_pairwise_distances_zero_distance_has_zero_gradient():
    x = torch.randn(1, 3, 4, generator=_gen(18), dtype=torch.float64, requires_grad=True)
    d = pairwise_distances(x, x)
    torch.testing.assert_close(torch.diagonal(d, dim1=1, dim2=2), torch.full((1, 3), 1e-6, dtype=torch.float64))
    torch.diagonal(d, dim1=1, dim2=2).sum().backward()  # only the (clamped) self-distances
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


def test_energy_distance_matches_numpy_metric():
    from perturbdiff_scvi.metrics import energy_distance as energy_distance_np

    x = torch.randn(20, 6, generator=_gen(19), dtype=torch.float64)
    y = torch.randn(25, 6, generator=_gen(20), dtype=torch.float64) + 0.3
    # same definition; the torch loss carries the sqrt(eps) floor on the zero self-distances
    assert float(energy_distance(x, y)) == pytest.approx(energy_distance_np(x.numpy(), y.numpy()), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_distance_self_is_zero(dtype):
    x = torch.randn(2, 7, 5, generator=_gen(8), dtype=dtype) + 4
    torch.testing.assert_close(energy_distance(x, x), torch.zeros(2, dtype=dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(energy_distance(x[0], x[0]), torch.zeros((), dtype=dtype), atol=1e-6, rtol=0)


def test_energy_distance_symmetric():
    x = torch.randn(2, 6, 3, generator=_gen(9), dtype=torch.float64)
    y = torch.randn(2, 4, 3, generator=_gen(10), dtype=torch.float64) * 2
    torch.testing.assert_close(energy_distance(x, y), energy_distance(y, x))


def test_energy_distance_positive_for_different_distributions():
    x = torch.randn(2, 30, 4, generator=_gen(11))
    y = torch.randn(2, 30, 4, generator=_gen(12)) + 3.0
    e = energy_distance(x, y)
    assert (e > 1.0).all()
    # Permuting cells inside a set does not change it (sets, not sequences).
    perm = torch.randperm(30, generator=_gen(13))
    torch.testing.assert_close(energy_distance(x[:, perm], y), e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_distance_gradient_finite_with_duplicates(dtype):
    base = torch.randn(1, 3, 5, generator=_gen(14), dtype=dtype)
    x = torch.cat([base, base, base[:, :1]], dim=1).requires_grad_(True)  # duplicate rows
    y = torch.cat([base[:, :2], torch.randn(1, 2, 5, generator=_gen(15), dtype=dtype)], dim=1)  # shares rows with x
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    z = torch.zeros(1, 4, 5, dtype=dtype, requires_grad=True)  # all cells identical
    energy_distance(z, y).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_per_set_mse_matches_manual():
    x = torch.randn(3, 4, 5, generator=_gen(16))
    y = torch.randn(3, 4, 5, generator=_gen(17))
    out = per_set_mse(x, y)
    assert out.shape == (3,)
    expected = ((x.numpy().astype(np.float64) - y.numpy()) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(per_set_mse(x, x), torch.zeros(3))


# ------------------------------------------------------------------------------- mixed precision (bf16 / fp16)
def _expression_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """log1p-like values: 60 % zeros, the rest in [0, 3)."""
    g = _gen(seed)
    return torch.rand(shape, generator=g) * 3 * (torch.rand(shape, generator=g) < 0.4)


def _naive_energy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The formula without the float32 guard (what autocast made of it before)."""

    def dist(a, b):
        sq = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
        return sq.clamp_min(1e-12).sqrt().mean(dim=(1, 2))

    return 2 * dist(x, y) - dist(x, x) - dist(y, y)


@pytest.mark.parametrize("close", [False, True])
def test_losses_under_bf16_autocast_within_one_percent_of_float32(close):
    """S=64 cells x G=500 genes: under CPU bf16 autocast the energy distance and the MSE stay within 1 % of
    float32, for distinct sets and for close ones (late in training), where the bf16 matmul was ~40 % off."""
    x = _expression_like((2, 64, 500), seed=20)
    y = x + 0.1 * torch.randn(x.shape, generator=_gen(21)) if close else _expression_like((2, 64, 500), seed=22)
    ref_e, ref_m = energy_distance(x, y), per_set_mse(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_e, got_m = energy_distance(x, y), per_set_mse(x, y)
        naive = _naive_energy(x, y)
        # A bf16 model output (as the denoiser gives under autocast) against float32 targets.
        got_e_bf16_in = energy_distance(x.bfloat16(), y)
    assert got_e.dtype == got_m.dtype == torch.float32
    torch.testing.assert_close(got_e, ref_e, rtol=0.01, atol=0)
    torch.testing.assert_close(got_m, ref_m, rtol=0.01, atol=0)
    torch.testing.assert_close(got_e_bf16_in, ref_e, rtol=0.01, atol=0)
    if close:  # the test has teeth: without the guard the error is far above 1 %
        assert ((naive - ref_e).abs() / ref_e).max() > 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_zero_distance_gradient_finite_in_half_precision(dtype, autocast):
    """Identical cells (zero distances) in fp16/bf16 inputs, or under bf16 autocast: finite gradients (an eps of
    1e-12 would underflow to 0 in fp16, and sqrt(0) has an infinite gradient)."""
    base = torch.randn(1, 3, 5, generator=_gen(23))
    x = torch.cat([base, base, base[:, :1]], dim=1).to(dtype).requires_grad_(True)  # duplicated cells
    z = torch.zeros(1, 4, 5, dtype=dtype, requires_grad=True)  # all cells identical
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = energy_distance(x, x.detach()).sum() + energy_distance(z, x.detach()).sum()
        loss = loss + per_set_mse(x, x.detach()).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(z.grad.float()).all()
    assert z.grad.float().abs().sum() > 0


def test_module_loss_under_bf16_autocast_is_float32():
    """PerturbDiffModule's loss under CPU bf16 autocast: float32, finite, and equal to the float32 loss of the
    same (bf16) prediction."""
    from perturbdiff_scvi.module import PerturbDiffModule

    torch.manual_seed(0)
    module = PerturbDiffModule(20, 3, 2, 2, set_size=8, n_hidden=16, depth=1, n_heads=2, n_cov=8, n_timesteps=20)
    x = torch.rand(2 * 2 * 8, 20, generator=_gen(24)) * 3
    codes = torch.zeros(32, 1)
    tensors = {"X": x, "perturbation": codes, "context": codes, "batch": codes}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inference, generative, loss = module(tensors)
    x0_hat = generative["x0_hat"]
    assert x0_hat.dtype == torch.bfloat16  # the denoiser did run in bf16
    assert loss.loss.dtype == torch.float32 and torch.isfinite(loss.loss)
    x0 = x.view(2, 2, 8, 20)[:, 0]
    expected = per_set_mse(x0_hat.float(), x0) + 0.5 * energy_distance(x0_hat.float(), x0)
    torch.testing.assert_close(loss.loss, expected.mean())
