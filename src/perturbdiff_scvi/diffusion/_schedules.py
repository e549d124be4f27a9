"""Noise schedules and timestep respacing: pure functions (improved-diffusion style).

Schedules may be added but never changed once released: saved models depend on them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

ScheduleName = Literal["linear", "cosine"]


def linear_beta_schedule(n_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. linear schedule: ``linspace(beta_start, beta_end, T)`` in float64.

    For ``T != 1000`` the end points are rescaled by ``1000 / T`` (improved-diffusion) so that short
    test schedules still reach pure noise.
    """
    scale = 1000.0 / n_timesteps
    return np.linspace(scale * beta_start, min(scale * beta_end, 0.999), n_timesteps, dtype=np.float64)


def cosine_beta_schedule(n_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal cosine schedule in float64."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / n_timesteps) / alpha_bar(i / n_timesteps), max_beta) for i in range(n_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(name: ScheduleName, n_timesteps: int) -> np.ndarray:
    """Return the betas of a named schedule (``"linear"``, the released default, or ``"cosine"``)."""
    if name == "linear":
        return linear_beta_schedule(n_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(n_timesteps)
    raise ValueError(f"Unknown beta schedule {name!r}; choose 'linear' or 'cosine'.")


def space_timesteps(n_timesteps: int, n_steps: int) -> np.ndarray:
    """``n_steps`` timesteps evenly strided over the full schedule, in descending order.

    Always contains ``T - 1`` (start from pure noise) and ``0`` (finish on clean data) when
    ``n_steps >= 2``.
    """
    if not 1 <= n_steps <= n_timesteps:
        raise ValueError(
            f"n_steps must be between 1 and the number of diffusion timesteps ({n_timesteps}); got {n_steps}."
        )
    if n_steps == 1:  # one jump from pure noise (t = T - 1) to the clean estimate
        return np.array([n_timesteps - 1], dtype=np.int64)
    steps = np.unique(np.round(np.linspace(0, n_timesteps - 1, n_steps)).astype(np.int64))
    return steps[::-1].copy()
