"""Diffusion maths: schedules, Gaussian forward/reverse steps, samplers and a trajectory diagnostic."""

from ._defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_N_STEPS
from ._diagnostics import RangeMonitor
from ._gaussian import GaussianDiffusion
from ._sampling import (
    RELEASED_START_TIME,
    SAMPLER_NAMES,
    StepCallback,
    guided_x0,
    reverse_timesteps,
    sample_loop,
    sample_loop_progressive,
)
from ._schedules import cosine_beta_schedule, get_named_beta_schedule, linear_beta_schedule, space_timesteps

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_N_STEPS",
    "RELEASED_START_TIME",
    "SAMPLER_NAMES",
    "GaussianDiffusion",
    "RangeMonitor",
    "StepCallback",
    "cosine_beta_schedule",
    "get_named_beta_schedule",
    "guided_x0",
    "linear_beta_schedule",
    "reverse_timesteps",
    "sample_loop",
    "sample_loop_progressive",
    "space_timesteps",
]
