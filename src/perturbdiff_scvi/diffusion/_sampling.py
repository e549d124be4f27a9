"""Reverse-diffusion loops over whole cell sets, with classifier-free guidance and self-conditioning."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch

from ._gaussian import GaussianDiffusion
from ._schedules import space_timesteps

SamplerName = Literal["ddim", "ddpm"]
# denoise(x_t, t, self_cond, drop_cond) -> x0 estimate; drop_cond=True uses the null covariate embedding.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def guided_x0(
    x0_cond: torch.Tensor, x0_uncond: torch.Tensor | None, guidance_scale: float, cutoff: float = 1e-4
) -> torch.Tensor:
    """Classifier-free guidance ``(1 + w) x0_c - w x0_u``, then values below ``cutoff`` set to 0.

    At fixed ``(x_t, t)`` the noise estimate is affine in ``x0``, so this equals guidance in
    eps-space ``(1 + w) eps_c - w eps_u`` followed by recomputing ``x0`` (the released formula).
    """
    x0 = x0_cond
    if x0_uncond is not None and guidance_scale != 0:
        x0 = (1 + guidance_scale) * x0_cond - guidance_scale * x0_uncond
    return torch.where(x0 < cutoff, torch.zeros_like(x0), x0)


def sample_loop_progressive(
    denoise: DenoiseFn,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    *,
    n_steps: int = 50,
    sampler: SamplerName = "ddim",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(t, x0_estimate)`` at each of ``n_steps`` strided steps from pure noise to ``t = 0``.

    Noise is drawn on the CPU from ``generator`` so that a seed gives the same sample on any device.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm'; got {sampler!r}.")
    timesteps = space_timesteps(diffusion.n_timesteps, n_steps)
    x_t = torch.randn(shape, generator=generator).to(device)
    self_cond = torch.zeros_like(x_t)
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        x0_c = denoise(x_t, t_batch, self_cond, False)
        x0_u = denoise(x_t, t_batch, self_cond, True) if guidance_scale != 0 else None
        x0 = guided_x0(x0_c, x0_u, guidance_scale)
        if sampler == "ddim":
            x_t = diffusion.ddim_step(x_t, x0, t, t_prev)
        else:
            x_t = diffusion.ddpm_step(x_t, x0, t, t_prev, torch.randn(shape, generator=generator).to(device))
        self_cond = x0  # self-conditioning carries the last clean estimate to the next step
        yield t, x0


def sample_loop(denoise: DenoiseFn, diffusion: GaussianDiffusion, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
    """Run :func:`sample_loop_progressive` to the end and return the final clean sets ``(B, S, G)``."""
    final = None
    for _, x0 in sample_loop_progressive(denoise, diffusion, shape, **kwargs):
        final = x0
    return final
