"""Perturbation features derived from the data itself: each target gene's co-expression profile in control cells.

A table for ``PerturbDiff.setup_anndata(perturbation_features=...)`` built offline, with no download: a gene
knocked down or activated is described by how it co-varies with every measured gene in unperturbed cells.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import MissingKeyError, as_list, dense_rows, expression_matrix


def coexpression_features(
    adata: AnnData,
    targets: str | Sequence[str],
    *,
    perturbation_key: str | None = None,
    control_value: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    on_missing: Literal["raise", "drop"] = "raise",
) -> pd.DataFrame:
    """Pearson correlation of each target gene with every gene, over the control cells.

    Row ``g`` is the co-expression profile of target ``g``: ``corr(x_g, x_j)`` over the control cells for
    every gene ``j`` of ``genes`` (the target's own column is 1). Genes constant in the controls get 0.

    Parameters
    ----------
    adata
        Log-normalised expression (``X`` or ``layer``).
    targets
        Target gene names (e.g. the genes of a CRISPR screen's guides), matched to ``adata.var_names``.
    perturbation_key, control_value
        Obs column and value of the control cells; both ``None`` = use every cell.
    layer
        Layer with log-normalised expression; ``None`` = ``adata.X``.
    genes
        Columns of the profile; ``None`` = every gene of ``adata``.
    on_missing
        A target that is not a measured gene, or that is constant (never expressed) in the control cells, has no
        profile: ``"raise"`` (default) raises a ``ValueError`` listing them; ``"drop"`` leaves them out with a
        warning.

    Returns
    -------
    DataFrame indexed by target (in the given order), one float32 column per gene.

    Notes
    -----
    Limits: only targets **measured** in ``adata`` get features, so this cannot describe a perturbation of a gene
    outside the panel. On the bundled Norman subset (500 genes) only 1 of the 18 single-gene targets (TMSB4X) is
    measured, so there it describes almost nothing; it suits whole-transcriptome screens (and sets of targets
    chosen among measured genes). Co-expression in control cells is a proxy for shared regulation, not for the
    effect of perturbing the gene; small control populations give noisy profiles.

    Examples
    --------
    >>> feats = coexpression_features(screen, ["GATA1", "KLF1"], perturbation_key="gene", control_value="control")
    >>> PerturbDiff.setup_anndata(screen, perturbation_key="gene", control_value="control",
    ...                           perturbation_features=feats)
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"adata must be an AnnData; got {type(adata).__name__}.")
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing must be 'raise' or 'drop'; got {on_missing!r}.")
    targets = [str(t) for t in as_list(targets, "targets")]
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has duplicates: {sorted({t for t in targets if targets.count(t) > 1})}.")
    rows = _control_rows(adata, perturbation_key, control_value)
    var_names = pd.Index([str(v) for v in adata.var_names])
    columns = var_names if genes is None else pd.Index([str(g) for g in as_list(genes, "genes")])
    absent = columns.difference(var_names)
    if len(absent):
        raise ValueError(f"genes has {len(absent)} names that are not in adata.var_names (e.g. {list(absent[:5])}).")
    x = dense_rows(expression_matrix(adata, layer), rows, np.float64)
    centred = x - x.mean(0)
    norm = np.sqrt((centred**2).sum(0))
    measured = [t for t in targets if t in var_names]
    constant = [t for t in measured if norm[var_names.get_loc(t)] == 0]
    unusable = [t for t in targets if t not in var_names] + constant
    if unusable:
        unmeasured = [t for t in targets if t not in var_names]
        message = (
            f"{len(unusable)} of {len(targets)} targets have no co-expression profile: not measured in adata "
            f"{unmeasured[:20]}, constant in the {len(rows)} control cells {constant[:20]}."
        )
        if on_missing == "raise" or len(unusable) == len(targets):
            raise ValueError(message + " Only measured, expressed targets can be described (on_missing='drop' skips).")
        warnings.warn(message + " They are left out.", UserWarning, stacklevel=2)
    keep = [t for t in targets if t not in set(unusable)]
    t_idx = var_names.get_indexer(keep)
    g_idx = var_names.get_indexer(columns)
    safe = np.where(norm > 0, norm, 1.0)
    corr = (centred[:, t_idx].T @ centred[:, g_idx]) / np.outer(safe[t_idx], safe[g_idx])
    corr[:, norm[g_idx] == 0] = 0.0
    return pd.DataFrame(np.clip(corr, -1, 1).astype(np.float32), index=pd.Index(keep), columns=columns)


def _control_rows(adata: AnnData, perturbation_key: str | None, control_value) -> np.ndarray:
    if (perturbation_key is None) != (control_value is None):
        raise ValueError("Give both perturbation_key and control_value (or neither, to use every cell).")
    if perturbation_key is None:
        return np.arange(adata.n_obs)
    if perturbation_key not in adata.obs.columns:
        raise MissingKeyError(f"perturbation_key={perturbation_key!r} is not a column of adata.obs.")
    rows = np.flatnonzero((adata.obs[perturbation_key].astype(str) == str(control_value)).to_numpy())
    if len(rows) < 3:
        raise ValueError(
            f"Only {len(rows)} cells have {perturbation_key}={control_value!r}; co-expression needs control cells."
        )
    return rows
