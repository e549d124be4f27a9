"""Gaussian diffusion maths on tensors: forward noising and one reverse step (DDIM / DDPM).

Holds only buffers computed once in float64; the network is passed in by the caller.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._schedules import ScheduleName, get_named_beta_schedule


def _extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather per-set coefficients ``values[t]`` and broadcast to ``ndim`` dimensions."""
    out = values[t]
    return out.view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Variance-preserving DDPM with T steps and x0-parameterisation.

    ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``. One timestep per set: ``t`` has shape
    ``(B,)`` and tensors ``(B, S, G)``.
    """

    def __init__(self, n_timesteps: int = 1000, schedule: ScheduleName = "linear"):
        super().__init__()
        betas = get_named_beta_schedule(schedule, n_timesteps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.n_timesteps = n_timesteps
        for name, value in {"betas": betas, "alphas_cumprod": alphas_cumprod}.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32), persistent=False)
        self._alphas_cumprod64 = alphas_cumprod  # float64 copy for step coefficients

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean sets ``x0`` to timestep ``t``."""
        abar = _extract(self.alphas_cumprod, t, x0.ndim)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise implied by a clean estimate: ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
        abar = _extract(self.alphas_cumprod, t, x_t.ndim)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def _abar(self, t: int) -> float:
        return float(self._alphas_cumprod64[t]) if t >= 0 else 1.0

    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``t`` to ``t_prev`` (``-1`` means the clean end point)."""
        if t_prev < 0:
            return x0
        eps = self.eps_from_x0(x_t, torch.full((x_t.shape[0],), t, device=x_t.device), x0)
        abar_prev = self._abar(t_prev)
        return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps

    def ddpm_step(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
        """Ancestral step of the (respaced) posterior ``q(x_{t_prev} | x_t, x0)``, fixed-large variance."""
        if t_prev < 0:
            return x0
        abar_t, abar_prev = self._abar(t), self._abar(t_prev)
        beta = 1 - abar_t / abar_prev  # beta of the respaced chain
        coef_x0 = abar_prev**0.5 * beta / (1 - abar_t)
        coef_xt = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
        return coef_x0 * x0 + coef_xt * x_t + beta**0.5 * noise
