"""Plots for a scanpy notebook: training loss, predicted vs real mean shift, and a joint UMAP of real and predicted
cells. Each function returns matplotlib objects and shows nothing by itself (``plt.show()`` or Jupyter does)."""

from ._plots import delta_scatter, loss_curve, umap_overlay

__all__ = ["delta_scatter", "loss_curve", "umap_overlay"]
