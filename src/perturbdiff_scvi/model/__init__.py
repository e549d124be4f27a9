"""The user-facing model and its training plan."""

from ._model import PerturbDiff
from ._presets import DEFAULT_GUIDANCE_SCALE, DEFAULT_MAX_STEPS, PAPER_CONFIG
from ._training_plan import DiffusionTrainingPlan

__all__ = ["DEFAULT_GUIDANCE_SCALE", "DEFAULT_MAX_STEPS", "PAPER_CONFIG", "DiffusionTrainingPlan", "PerturbDiff"]
