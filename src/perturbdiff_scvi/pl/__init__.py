"""Plots for a scanpy notebook: training loss, predicted vs real mean shift, a joint UMAP of real and predicted
cells, and the spread of many sampled populations beside the real ones. Each function returns matplotlib objects
and shows nothing by itself (``plt.show()`` or Jupyter does)."""

from ._plots import delta_scatter, loss_curve, umap_overlay
from ._populations import lfc_intervals, population_spread

__all__ = ["delta_scatter", "lfc_intervals", "loss_curve", "population_spread", "umap_overlay"]
