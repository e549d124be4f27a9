"""Tools on predictions: evaluation against real cells."""

from ._evaluate import METRIC_BEST, evaluate

__all__ = ["METRIC_BEST", "evaluate"]
