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
