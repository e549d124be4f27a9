"""Registration of AnnData / MuData: input checks, the scvi-tools fields and the MuData obs merge."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from anndata import AnnData
from scvi.data.fields import CategoricalObsField, LayerField, MuDataCategoricalObsField, MuDataLayerField

from .._combinations import check_delimiter, check_labels
from .._constants import PDIFF_KEYS
from .._validation import (
    MissingKeyError,
    check_control_value,
    check_distinct_keys,
    check_log_normalised,
    check_obs_column,
    check_unique_var_names,
    expression_matrix,
)

if TYPE_CHECKING:
    from mudata import MuData


def check_setup_inputs(
    adata: AnnData,
    *,
    obs: pd.DataFrame,
    layer: str | None,
    perturbation_key: str,
    control_value,
    context_key: str | None,
    batch_key: str | None,
    combination_delimiter: str | None = None,
    name: str = "adata",
) -> None:
    """Every check of ``setup_anndata`` / ``setup_mudata``, before scvi-tools touches the object.

    ``adata`` is the AnnData whose expression is registered (the RNA modality of a MuData, then called
    ``name``), ``obs`` the frame holding the keys (for MuData, the merged obs).
    """
    matrix = expression_matrix(adata, layer, name=name)
    where = f"{name}.X" if layer is None else f"{name}.layers[{layer!r}]"
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if getattr(adata, "is_view", False):
        raise ValueError(
            "The AnnData is a view (e.g. adata[mask]); setup would have to modify its parent. Make it "
            "an object of its own first: adata = adata[mask].copy()."
        )
    if getattr(adata, "isbacked", False) and layer is not None:
        raise ValueError(
            f"A backed AnnData keeps only X on disk; layer={layer!r} would be read into memory. Register X "
            "(layer=None) of the backed file, or load it with anndata.read_h5ad(path) without backed=."
        )
    if perturbation_key is None:
        raise ValueError("perturbation_key is required: the obs column with the perturbation of each cell.")
    check_distinct_keys(perturbation_key=perturbation_key, context_key=context_key, batch_key=batch_key)
    for key, arg in ((perturbation_key, "perturbation_key"), (context_key, "context_key"), (batch_key, "batch_key")):
        check_obs_column(obs, key, arg)
    check_control_value(obs[perturbation_key], control_value, perturbation_key)
    n_perturbed = int((obs[perturbation_key].astype(str) != str(control_value)).sum())
    if n_perturbed == 0:
        raise ValueError(
            f"Every cell of {perturbation_key!r} is the control {control_value!r}; PerturbDiff needs "
            "perturbed cells to learn from."
        )
    check_delimiter(combination_delimiter)
    check_labels(pd.unique(obs[perturbation_key].astype(str)), combination_delimiter, control_value, perturbation_key)
    check_unique_var_names(adata, name)
    check_log_normalised(matrix, where)


def anndata_fields(layer: str | None, perturbation_key: str, context_key: str | None, batch_key: str | None) -> list:
    """The scvi-tools fields of an AnnData registration."""
    return [
        LayerField(PDIFF_KEYS.X_KEY, layer, is_count_data=False),
        CategoricalObsField(PDIFF_KEYS.PERT_KEY, perturbation_key),
        CategoricalObsField(PDIFF_KEYS.CONTEXT_KEY, context_key),
        CategoricalObsField(PDIFF_KEYS.BATCH_KEY, batch_key),
    ]


def rna_modality(mdata: MuData, modalities: dict[str, str] | None) -> str:
    """Name of the RNA modality from scvi-tools' ``modalities`` convention, checked against ``mdata``."""
    modalities = {"rna_layer": "rna"} if modalities is None else dict(modalities)
    if len(modalities) != 1 or set(modalities) - {"rna_layer", "rna"}:
        raise ValueError(
            f"modalities must name the RNA modality, e.g. {{'rna_layer': 'rna'}} (or {{'rna': ...}}); got {modalities}."
        )
    rna_mod = next(iter(modalities.values()))
    if rna_mod not in mdata.mod:
        raise MissingKeyError(
            f"Modality {rna_mod!r} not found in mdata.mod (available: {list(mdata.mod)}); set "
            "modalities={'rna_layer': <RNA modality>}."
        )
    rna = mdata.mod[rna_mod]
    if rna.n_obs != mdata.n_obs or not rna.obs_names.equals(mdata.obs_names):
        raise ValueError(
            f"Modality {rna_mod!r} has {rna.n_obs} cells but mdata has {mdata.n_obs} (or another "
            "order); PerturbDiff needs RNA for every cell. Subset mdata to the RNA cells first."
        )
    return rna_mod


def merged_mudata_obs(mdata: MuData, rna_mod: str, keys: tuple[str | None, ...]) -> tuple[pd.DataFrame, dict]:
    """The obs columns ``keys`` read from ``mdata.obs`` when there, else from the RNA modality.

    Returns the merged frame (indexed by ``mdata.obs_names``) and ``{key: modality or None}`` (``None`` =
    ``mdata.obs``), the ``mod_key`` of each scvi-tools field.
    """
    rna = mdata.mod[rna_mod]
    where = {k: (None if k is None or k in mdata.obs.columns else rna_mod) for k in keys}
    columns = {}
    for key in keys:
        if key is None:
            continue
        source = mdata.obs if where[key] is None else rna.obs
        if key not in source.columns:
            raise MissingKeyError(f"{key!r} is neither a column of mdata.obs nor of mdata[{rna_mod!r}].obs.")
        columns[key] = source[key]
    return pd.DataFrame(columns, index=mdata.obs_names), where


def mudata_fields(
    rna_layer: str | None, rna_mod: str, where: dict, perturbation_key: str, context_key, batch_key
) -> list:
    """The scvi-tools fields of a MuData registration (obs fields read where :func:`merged_mudata_obs` found them)."""
    return [
        MuDataLayerField(PDIFF_KEYS.X_KEY, rna_layer, mod_key=rna_mod, is_count_data=False, mod_required=True),
        MuDataCategoricalObsField(PDIFF_KEYS.PERT_KEY, perturbation_key, mod_key=where[perturbation_key]),
        MuDataCategoricalObsField(PDIFF_KEYS.CONTEXT_KEY, context_key, mod_key=where.get(context_key)),
        MuDataCategoricalObsField(PDIFF_KEYS.BATCH_KEY, batch_key, mod_key=where.get(batch_key)),
    ]
