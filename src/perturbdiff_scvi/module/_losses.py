"""Set-level losses: per-cell MSE and the energy distance between two cell sets."""

from __future__ import annotations

import torch


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the cells of two batched sets: ``(B, N, G), (B, M, G) -> (B, N, M)``.

    Clamped away from 0 so that the gradient of a zero distance (a cell with itself) is 0, not NaN.
    """
    sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)
    return sq.clamp_min(eps).sqrt()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance (biased V-statistic) between batched sets ``(B, N, G)`` and ``(B, M, G)`` -> ``(B,)``.

    ``E(X, Y) = 2 mean ||x - y|| - mean ||x - x'|| - mean ||y - y'||`` over all pairs, including
    ``i = j`` (the V-statistic, as geomloss). PerturbDiff's loss term is ``E / 2``: geomloss's
    ``SamplesLoss("energy")``, i.e. the squared RKHS distance for the kernel ``k(x, y) = -||x - y||``.
    Unbatched ``(N, G), (M, G)`` inputs return a 0-d tensor.
    """
    if x.ndim == 2:
        return energy_distance(x[None], y[None])[0]
    xy = pairwise_distances(x, y).mean(dim=(1, 2))
    xx = pairwise_distances(x, x).mean(dim=(1, 2))
    yy = pairwise_distances(y, y).mean(dim=(1, 2))
    return 2 * xy - xx - yy


def per_set_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the ``S x G`` entries of each set: ``(B, S, G) -> (B,)``."""
    return (x - y).pow(2).mean(dim=(1, 2))
