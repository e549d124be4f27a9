"""Diffusion maths: schedules, Gaussian forward/reverse steps and sampling loops."""

from ._gaussian import GaussianDiffusion
from ._sampling import guided_x0, sample_loop, sample_loop_progressive
from ._schedules import cosine_beta_schedule, get_named_beta_schedule, linear_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "cosine_beta_schedule",
    "get_named_beta_schedule",
    "guided_x0",
    "linear_beta_schedule",
    "sample_loop",
    "sample_loop_progressive",
    "space_timesteps",
]
