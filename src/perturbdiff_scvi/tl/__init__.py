"""Tools on predictions: evaluation against real cells, the spread of sampled populations and its calibration."""

from ._calibration import CalibrationResult, calibration
from ._evaluate import METRIC_BEST, REALISM_METRICS, evaluate
from ._features import coexpression_features
from ._populations import population_summary

__all__ = [
    "METRIC_BEST",
    "REALISM_METRICS",
    "CalibrationResult",
    "calibration",
    "coexpression_features",
    "evaluate",
    "population_summary",
]
