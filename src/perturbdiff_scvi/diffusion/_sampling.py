"""Reverse-diffusion loops over whole cell sets, with classifier-free guidance and self-conditioning."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from ._gaussian import GaussianDiffusion
from ._schedules import space_timesteps

SamplerName = Literal["ddim", "ddpm", "ddim_truncated"]
#: Every sampler name ``sample_loop_progressive`` accepts.
SAMPLER_NAMES: tuple[str, ...] = ("ddim", "ddpm", "ddim_truncated")
#: The released ``start_time`` of ``sampler="ddim_truncated"`` (``configs/rawdata_diffusion_sampling.yaml``).
RELEASED_START_TIME = 100
# denoise(x_t, t, self_cond, drop_cond) -> x0 estimate; drop_cond=True uses the null covariate embedding.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
# step_callback(t, x_t, x0): the state entering step t and the (guided, clipped) clean estimate made from it.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def guided_x0(
    x0_cond: torch.Tensor,
    x0_uncond: torch.Tensor | None,
    guidance_scale: float,
    cutoff: float = 1e-4,
    x0_max: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Classifier-free guidance ``(1 + w) x0_c - w x0_u``, then values below ``cutoff`` set to 0.

    At fixed ``(x_t, t)`` the noise estimate is affine in ``x0``, so this equals guidance in
    eps-space ``(1 + w) eps_c - w eps_u`` followed by recomputing ``x0`` (the released formula).
    ``x0_max`` (not in the released method; a float or a per-gene tensor broadcasting over the last axis)
    additionally caps the estimate from above, so that it lies in ``[0, x0_max]``.
    """
    x0 = x0_cond
    if x0_uncond is not None and guidance_scale != 0:
        x0 = (1 + guidance_scale) * x0_cond - guidance_scale * x0_uncond
    x0 = torch.where(x0 < cutoff, torch.zeros_like(x0), x0)
    if x0_max is not None:
        x0 = torch.minimum(x0, torch.as_tensor(x0_max, dtype=x0.dtype, device=x0.device))
    return x0


def sampler_choices() -> str:
    """``"'ddim', 'ddpm' or 'ddim_truncated'"``: the sampler names for error messages."""
    names = [repr(n) for n in SAMPLER_NAMES]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _check_start_time(start_time, n_timesteps: int) -> int:
    ok = isinstance(start_time, int | np.integer) and not isinstance(start_time, bool)
    if not ok or not 1 <= start_time <= n_timesteps:
        raise ValueError(
            f"start_time must be an integer between 1 and the number of diffusion timesteps ({n_timesteps}); "
            f"got {start_time!r}."
        )
    return int(start_time)


def reverse_timesteps(
    sampler: SamplerName,
    n_timesteps: int,
    n_steps: int = 50,
    start_time: int | None = None,
) -> np.ndarray:
    """The timesteps a sampler visits, in descending order.

    ``"ddim"`` / ``"ddpm"``: ``n_steps`` steps strided over the full schedule (``start_time`` must be
    ``None``). ``"ddim_truncated"``: every timestep ``start_time - 1, ..., 0``
    one at a time (``n_steps`` is not used); ``start_time=None`` is the released 100 (at most ``n_timesteps``).
    """
    if not isinstance(sampler, str) or sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be {sampler_choices()}; got {sampler!r}.")
    if sampler != "ddim_truncated":
        if start_time is not None:
            raise ValueError(
                f"start_time only applies to sampler='ddim_truncated'; sampler={sampler!r} "
                "strides n_steps steps over the whole schedule. Leave start_time=None."
            )
        return space_timesteps(n_timesteps, n_steps)
    if start_time is None:
        start_time = min(RELEASED_START_TIME, n_timesteps)
    start_time = _check_start_time(start_time, n_timesteps)
    return np.arange(start_time - 1, -1, -1, dtype=np.int64)


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
    start_time: int | None = None,
    x0_max: torch.Tensor | float | None = None,
    step_callback: StepCallback | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(t, x0_estimate)`` at each step from pure noise to ``t = 0``.

    Samplers (see :func:`reverse_timesteps` for the visited timesteps):

    - ``"ddim"``: deterministic DDIM (eta = 0), ``n_steps`` steps strided over the full schedule;
    - ``"ddpm"``: ancestral steps of the respaced chain, same timesteps;
    - ``"ddim_truncated"``: the released sampler (method.md section 5; ``ddim_sample_loop_progressive`` in the
      official ``src/models/diffusion/diffusion_sampling.py``): DDIM eta = 0 over ``t = start_time - 1, ..., 0``
      one step at a time on the full schedule, starting from ``x ~ N(0, I)`` *at* ``t = start_time - 1``
      (not from noised data; with the released ``start_time=100`` of T = 1000, ``abar`` is about 0.90 there).

    Guidance and self-conditioning are the same for all three: two passes (conditional, null covariates) per
    step when ``guidance_scale != 0``, and the previous step's clean estimate fed back (zeros at the first).
    ``x0_max`` caps each step's estimate (see :func:`guided_x0`). ``step_callback(t, x_t, x0)``, if given, sees
    each step's input state and estimate (e.g. a :class:`~perturbdiff_scvi.diffusion.RangeMonitor`).
    Noise is drawn on the CPU from ``generator`` so that a seed gives the same sample on any device.
    """
    timesteps = reverse_timesteps(sampler, diffusion.n_timesteps, n_steps, start_time)
    x_t = torch.randn(shape, generator=generator).to(device)
    self_cond = torch.zeros_like(x_t)
    for i, t in enumerate(timesteps.tolist()):
        t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        x0_c = denoise(x_t, t_batch, self_cond, False)
        x0_u = denoise(x_t, t_batch, self_cond, True) if guidance_scale != 0 else None
        x0 = guided_x0(x0_c, x0_u, guidance_scale, x0_max=x0_max)
        if step_callback is not None:
            step_callback(t, x_t, x0)
        if sampler == "ddpm":
            x_t = diffusion.ddpm_step(x_t, x0, t, t_prev, torch.randn(shape, generator=generator).to(device))
        else:  # "ddim" and "ddim_truncated"
            x_t = diffusion.ddim_step(x_t, x0, t, t_prev)
        self_cond = x0  # self-conditioning carries the last clean estimate to the next step
        yield t, x0


def sample_loop(denoise: DenoiseFn, diffusion: GaussianDiffusion, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
    """Run :func:`sample_loop_progressive` to the end and return the final clean sets ``(B, S, G)``."""
    final = None
    for _, x0 in sample_loop_progressive(denoise, diffusion, shape, **kwargs):
        final = x0
    return final
