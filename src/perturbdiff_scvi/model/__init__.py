"""The user-facing model, its option objects, its registry view and its training plan."""

from ._model import PerturbDiff
from ._options import DiffusionOptions, OutputOptions, SamplerOptions
from ._presets import DEFAULT_GUIDANCE_SCALE, DEFAULT_MAX_STEPS, PAPER_CONFIG
from ._registry import Registry
from ._training_plan import DiffusionTrainingPlan

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_MAX_STEPS",
    "PAPER_CONFIG",
    "DiffusionOptions",
    "DiffusionTrainingPlan",
    "OutputOptions",
    "PerturbDiff",
    "Registry",
    "SamplerOptions",
]
