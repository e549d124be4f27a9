"""Set-level losses: per-cell MSE and the energy distance between two cell sets (torch).

The torch counterpart of :func:`perturbdiff_scvi.metrics.energy_distance` (numpy, for evaluation): same
formula, differentiable and batched. :func:`pairwise_distances` is the one pairwise-distance helper of the
torch code.
"""

from __future__ import annotations

import contextlib

import torch


def _full_precision(*tensors: torch.Tensor) -> tuple[contextlib.AbstractContextManager, tuple[torch.Tensor, ...]]:
    """A context without autocast on the tensors' device, and the tensors in one dtype of at least float32.

    Mixed precision (``precision="bf16-mixed"`` / ``"16-mixed"``) runs matrix products in bf16/fp16: the squared
    distances ``||x||^2 + ||y||^2 - 2 x.y`` then lose most of their digits (the energy distance of two close
    sets of 64 cells x 500 genes is off by about 40 % in bf16), and an ``eps`` clamp of 1e-12 underflows to 0 in
    fp16, so a zero distance gets a NaN gradient. The losses therefore compute in float32 (float64 stays).
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    device_type = tensors[0].device.type
    ctx = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    return ctx, tuple(t.to(dtype) for t in tensors)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the cells of two batched sets: ``(B, N, G), (B, M, G) -> (B, N, M)``.

    ``D_bij = sqrt(max(||x_bi||^2 + ||y_bj||^2 - 2 x_bi . y_bj, eps))``: one batched matrix product. The
    squared distance is clamped at ``eps`` before the square root so that the gradient of a zero distance
    (a cell with itself) is 0, not NaN; a zero distance therefore reads ``sqrt(eps)`` (1e-6 by default).
    Computed with autocast off and in float32 at least (float64 inputs stay float64), whatever the input dtype
    or autocast state: mixed precision would lose most digits of the squared distances.

    Parameters
    ----------
    x
        Batched cell sets, shape ``(B, N, G)``.
    y
        Batched cell sets, shape ``(B, M, G)``.
    eps
        Lower clamp of the squared distances.

    Returns
    -------
    torch.Tensor
        Distances, shape ``(B, N, M)``.

    Examples
    --------
    >>> import torch
    >>> from perturbdiff_scvi.module import pairwise_distances
    >>> x = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    >>> pairwise_distances(x, x)
    tensor([[[1.0000e-06, 5.0000e+00],
             [5.0000e+00, 1.0000e-06]]])
    """
    ctx, (x, y) = _full_precision(x, y)
    with ctx:
        sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)
        return sq.clamp_min(eps).sqrt()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance (biased V-statistic) between batched sets ``(B, N, G)`` and ``(B, M, G)`` -> ``(B,)``.

    ``E(X, Y) = 2 mean ||x - y|| - mean ||x - x'|| - mean ||y - y'||`` over all pairs, including
    ``i = j`` (the V-statistic, as geomloss), from :func:`pairwise_distances`. PerturbDiff's loss term is
    ``E / 2``: geomloss's ``SamplesLoss("energy")``, i.e. the squared RKHS distance for the kernel
    ``k(x, y) = -||x - y||``. Same definition as :func:`perturbdiff_scvi.metrics.energy_distance` (numpy);
    the ``sqrt(eps)`` floor of the zero self-distances biases this one by at most ``1e-6 (1/N + 1/M)``.
    Computed with autocast off, in float32 at least (the result is float32 for bf16/fp16 inputs), so
    mixed-precision training does not bias it.

    Parameters
    ----------
    x
        Sets of shape ``(B, N, G)``, or one set ``(N, G)``.
    y
        Sets of shape ``(B, M, G)``, or one set ``(M, G)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``; a 0-d tensor for unbatched ``(N, G), (M, G)`` inputs.

    Examples
    --------
    >>> import torch
    >>> from perturbdiff_scvi.module import energy_distance
    >>> x = torch.randn(2, 64, 5, generator=torch.Generator().manual_seed(0))
    >>> energy_distance(x, x + 1.0).shape
    torch.Size([2])
    >>> bool(energy_distance(x[0], x[0] + 1.0) > energy_distance(x[0], x[0] + 0.1))
    True
    """
    if x.ndim == 2:
        return energy_distance(x[None], y[None])[0]
    ctx, (x, y) = _full_precision(x, y)
    with ctx:
        xy = pairwise_distances(x, y).mean(dim=(1, 2))
        xx = pairwise_distances(x, x).mean(dim=(1, 2))
        yy = pairwise_distances(y, y).mean(dim=(1, 2))
        return 2 * xy - xx - yy


def per_set_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the ``S x G`` entries of each set: ``(B, S, G) -> (B,)``, in float32 at least.

    Parameters
    ----------
    x, y
        Batched sets of the same shape ``(B, S, G)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``.

    Examples
    --------
    >>> import torch
    >>> from perturbdiff_scvi.module import per_set_mse
    >>> per_set_mse(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    tensor([1., 1.])
    """
    ctx, (x, y) = _full_precision(x, y)
    with ctx:
        return (x - y).pow(2).mean(dim=(1, 2))
