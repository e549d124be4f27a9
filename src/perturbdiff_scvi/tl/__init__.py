"""Tools on predictions: evaluation against real cells, the spread of sampled populations and its calibration."""

from ._calibration import CalibrationResult, calibration
from ._conformal import ConformalIntervals, conformal_intervals
from ._evaluate import METRIC_BEST, REALISM_METRICS, evaluate
from ._features import coexpression_features
from ._populations import population_summary

__all__ = [
    "METRIC_BEST",
    "REALISM_METRICS",
    "CalibrationResult",
    "ConformalIntervals",
    "calibration",
    "coexpression_features",
    "conformal_intervals",
    "evaluate",
    "population_summary",
]
