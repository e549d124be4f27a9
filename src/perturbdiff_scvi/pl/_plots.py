"""``loss_curve``, ``delta_scatter`` and ``umap_overlay``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from .._validation import dense_rows, expression_matrix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax, figsize=(4.5, 4.0)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _mean(adata: AnnData, layer: str | None, name: str) -> np.ndarray:
    if adata.n_obs == 0:
        raise ValueError(f"{name} has no cells.")
    return dense_rows(expression_matrix(adata, layer, name=name)).mean(0)


def loss_curve(model, *, keys: Sequence[str] | None = None, log: bool = False, ax: Axes | None = None) -> Axes:
    """Training (and validation) loss of a trained model per epoch, from ``model.history``.

    Parameters
    ----------
    model
        A trained :class:`~perturbdiff_scvi.PerturbDiff`.
    keys
        History entries to draw; ``None`` = ``train_loss`` and, when recorded, ``validation_loss``, ``mse_train``
        and ``energy_train``.
    log
        Logarithmic y axis.
    ax
        Axes to draw into; ``None`` = a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = pdiff.pl.loss_curve(model)
    >>> ax.figure.savefig("loss.png")
    """
    history = getattr(model, "history", None)
    if not history:
        raise ValueError("The model has no training history: train it first (model.train()).")
    if keys is None:
        keys = [k for k in ("train_loss", "validation_loss", "mse_train", "energy_train") if k in history]
    missing = [k for k in keys if k not in history]
    if missing:
        raise KeyError(f"model.history has no {missing}; available: {sorted(history)}.")
    fig, ax = _axes(ax)
    for key in keys:
        frame = history[key]
        ax.plot(frame.index.to_numpy(), frame.to_numpy(dtype=float).ravel(), label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False)
    ax.set_title("PerturbDiff training")
    return ax


def delta_scatter(
    pred: AnnData,
    real: AnnData,
    control: AnnData,
    *,
    genes: Sequence[str] | None = None,
    n_label: int = 10,
    layer: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Predicted against real mean shift from control, one dot per gene, the largest real shifts labelled.

    ``x_g = mean(real_g) - mean(control_g)``, ``y_g = mean(pred_g) - mean(control_g)``; the title gives their
    Pearson correlation (cell-eval's ``pearson_delta``) over the genes drawn. Points on the diagonal are right.

    Parameters
    ----------
    pred, real, control
        Predicted, real perturbed and control cells with the same genes (``var_names``, any order: aligned on
        ``pred``'s).
    genes
        Genes to draw (e.g. the top DE genes); ``None`` = all.
    n_label
        Genes labelled: those with the largest ``|x_g|``.
    layer
        Layer of the three objects to use; ``None`` = ``X``.
    ax
        Axes to draw into; ``None`` = a new figure.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = pdiff.pl.delta_scatter(pred, real, control, n_label=8)
    """
    for name, a in (("pred", pred), ("real", real), ("control", control)):
        if not isinstance(a, AnnData):
            raise TypeError(f"{name} must be an AnnData; got {type(a).__name__}.")
    names = pred.var_names
    for name, a in (("real", real), ("control", control)):
        missing = names.difference(a.var_names)
        if len(missing):
            raise ValueError(f"{name} lacks {len(missing)} of the predicted genes (e.g. {list(missing[:3])}).")
    ctrl = _mean(control[:, names], layer, "control")
    dx = _mean(real[:, names], layer, "real") - ctrl
    dy = _mean(pred, layer, "pred") - ctrl
    keep = np.arange(len(names))
    if genes is not None:
        keep = names.get_indexer(list(genes))
        if (keep < 0).any():
            raise ValueError(f"genes not in pred.var_names: {[g for g, i in zip(genes, keep, strict=True) if i < 0]}.")
    dx, dy, shown = dx[keep], dy[keep], names[keep]
    fig, ax = _axes(ax)
    ax.scatter(dx, dy, s=8, alpha=0.6, color="tab:blue", linewidths=0)
    lim = float(max(np.abs(dx).max(initial=0), np.abs(dy).max(initial=0))) * 1.05 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8, ls="--")
    for i in np.argsort(-np.abs(dx), kind="stable")[: max(0, int(n_label))]:
        ax.annotate(str(shown[i]), (dx[i], dy[i]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    r = float(np.corrcoef(dx, dy)[0, 1]) if len(dx) > 1 and dx.std() > 0 and dy.std() > 0 else float("nan")
    ax.set_xlabel("real shift from control")
    ax.set_ylabel("predicted shift from control")
    ax.set_title(f"mean shift per gene (pearson r = {r:.3f})")
    return ax


def umap_overlay(
    real: AnnData,
    pred: AnnData,
    *,
    control: AnnData | None = None,
    color: str | Sequence[str] | None = None,
    n_pcs: int = 30,
    seed: int = 0,
    return_adata: bool = False,
) -> Figure | tuple[Figure, AnnData]:
    """Embed real and predicted cells together (PCA, neighbours, UMAP) and colour them by source in one call.

    The inputs are not modified: they are concatenated into a new AnnData with ``obs["source"]`` = ``"real"``,
    ``"predicted"`` (and ``"control"``) on their shared genes. A prediction mixed into the real cells is what a
    believable one looks like; its own island means the cells are unlike real ones.

    Parameters
    ----------
    real, pred
        Real and predicted cells.
    control
        Optional control cells, drawn as a third source.
    color
        ``obs`` column(s) to colour panels by, one panel each; ``None`` = ``"source"``. Any column shared by
        the inputs works, e.g. ``["source", "cell_type"]``.
    n_pcs
        Principal components for the neighbour graph.
    seed
        Seed of PCA and UMAP.
    return_adata
        Also return the embedded AnnData.

    Returns
    -------
    matplotlib.figure.Figure (and the combined AnnData with ``obsm["X_umap"]`` when ``return_adata``).

    Examples
    --------
    >>> fig = pdiff.pl.umap_overlay(real, pred, control=control, color=["source", "condition"])
    >>> fig.savefig("umap.png")
    """
    import anndata as ad
    import scanpy as sc

    parts = {"real": real, "predicted": pred}
    if control is not None:
        parts = {"control": control, **parts}
    for name, a in parts.items():
        if not isinstance(a, AnnData):
            raise TypeError(f"{name} must be an AnnData; got {type(a).__name__}.")
    combined = ad.concat(parts, label="source", index_unique="-", join="inner")
    if combined.n_vars == 0:
        raise ValueError("real and pred share no gene (compare their var_names).")
    combined.obs["source"] = combined.obs["source"].astype("category")
    colors = ["source"] if color is None else ([color] if isinstance(color, str) else list(color))
    missing = [c for c in colors if c not in combined.obs.columns]
    if missing:
        raise KeyError(f"color {missing} not in the obs columns shared by the inputs: {list(combined.obs.columns)}.")
    n_comps = max(2, min(n_pcs, combined.n_obs - 1, combined.n_vars - 1))
    sc.pp.pca(combined, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(combined, n_pcs=n_comps, random_state=seed)
    sc.tl.umap(combined, random_state=seed)
    fig = sc.pl.umap(combined, color=colors, return_fig=True, show=False)
    return (fig, combined) if return_adata else fig
