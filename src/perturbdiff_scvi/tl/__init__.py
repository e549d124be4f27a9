"""Tools on predictions: evaluation against real cells."""

from ._evaluate import METRIC_BEST, REALISM_METRICS, evaluate

__all__ = ["METRIC_BEST", "REALISM_METRICS", "evaluate"]
