"""What ``setup_anndata`` registered, as one small frozen object: the view prediction, controls, counts and
embeddings read instead of the whole model.

A :class:`Registry` is built from scvi-tools' :class:`~scvi.data.AnnDataManager` once per model
(:attr:`PerturbDiff.registry_view <perturbdiff_scvi.PerturbDiff.registry_view>`). It holds the setup keys, the category
maps, the control code, the perturbation vocabulary, the gene names and the registered codes, and computes the
statistics of the training matrix (per-gene maximum, realistic zero threshold) on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._combinations import PerturbationVocabulary
from .._constants import PDIFF_KEYS
from .._perturbation_features import FeatureVocabulary
from .._validation import find_category
from ..data import registered_codes
from . import _ranges

_REGISTRY_KEYS = {
    "perturbation": PDIFF_KEYS.PERT_KEY,
    "context": PDIFF_KEYS.CONTEXT_KEY,
    "batch": PDIFF_KEYS.BATCH_KEY,
}


@dataclass(frozen=True, eq=False)
class Registry:
    """The registered data of a model: keys, category maps, control code, vocabulary, genes, training statistics.

    Build it with :meth:`from_manager`; the fields are read-only.

    Parameters
    ----------
    setup_args
        The arguments ``setup_anndata`` / ``setup_mudata`` was called with (``perturbation_key``,
        ``control_value``, ``context_key``, ``batch_key``, ``layer`` or ``rna_layer``, ``combination_delimiter``,
        ``perturbation_features``, ``modalities``).
    mappings
        ``{"perturbation" | "context" | "batch": categories in code order}``.
    var_names
        The training genes, in order.
    codes
        ``(perturbation, context, batch)`` integer codes of every registered cell.
    matrix
        The registered expression matrix (as scvi-tools serves it: dense, sparse or backed).
    adata
        The registered AnnData or MuData (read for a raw counts layer).

    Examples
    --------
    >>> registry = model.registry_view
    >>> registry.perturbation_key, registry.control_code
    ('condition', 0)
    >>> registry.categories("context")[:3]
    """

    setup_args: dict[str, Any]
    mappings: dict[str, np.ndarray]
    var_names: pd.Index
    codes: tuple[np.ndarray, np.ndarray, np.ndarray]
    matrix: Any = field(repr=False)
    adata: Any = field(repr=False)

    @classmethod
    def from_manager(cls, adata_manager) -> Registry:
        """The registry of an :class:`~scvi.data.AnnDataManager` with PerturbDiff's fields registered."""
        return cls(
            setup_args=dict(adata_manager.registry["setup_args"]),
            mappings={
                name: adata_manager.get_state_registry(key).categorical_mapping for name, key in _REGISTRY_KEYS.items()
            },
            var_names=pd.Index(adata_manager.get_state_registry(PDIFF_KEYS.X_KEY).column_names),
            codes=registered_codes(adata_manager),
            matrix=adata_manager.get_from_registry(PDIFF_KEYS.X_KEY),
            adata=adata_manager.adata,
        )

    # ------------------------------------------------------------------ setup arguments
    def setup_arg(self, name: str):
        """A setup argument, ``None`` when that setup method has no such argument (e.g. ``rna_layer`` for AnnData)."""
        return self.setup_args.get(name)

    @property
    def perturbation_key(self) -> str:
        return self.setup_args["perturbation_key"]

    @property
    def context_key(self) -> str | None:
        return self.setup_args.get("context_key")

    @property
    def batch_key(self) -> str | None:
        return self.setup_args.get("batch_key")

    @property
    def control_value(self):
        return self.setup_args["control_value"]

    @property
    def layer(self) -> str | None:
        """The registered expression layer (``rna_layer`` for MuData); ``None`` = ``X``."""
        return self.setup_args.get("layer") or self.setup_args.get("rna_layer")

    def categories(self, what: Literal["perturbation", "context", "batch"]) -> np.ndarray:
        """Registered categories of the perturbation, context or batch field, in code order."""
        return self.mappings[what]

    # ------------------------------------------------------------------ derived, computed once
    @cached_property
    def control_code(self) -> int:
        """Registered code of the control value."""
        return find_category(self.mappings["perturbation"], self.control_value, "control value", self.perturbation_key)

    @cached_property
    def vocabulary(self) -> PerturbationVocabulary | None:
        """Components of the perturbation labels: with ``perturbation_features``, the rows of that table; else, when
        set up with ``combination_delimiter``, the split labels; else ``None`` (one embedding per label)."""
        delimiter = self.setup_args.get("combination_delimiter")
        features = self.setup_args.get("perturbation_features")
        labels = self.mappings["perturbation"]
        if features is not None:
            return FeatureVocabulary(labels, features, delimiter, self.control_value)
        if delimiter is None:
            return None
        return PerturbationVocabulary(labels, delimiter, self.control_value)

    @cached_property
    def gene_max(self) -> np.ndarray:
        """Per-gene maximum ``(G,)`` of the registered training matrix (``x0_bound="auto"``, the count sampler's cap).

        One pass over the matrix (a full read for backed AnnData), paid once per registry; not saved.
        """
        return _ranges.gene_max(self.matrix)

    @cached_property
    def zero_threshold(self) -> float:
        """:func:`~perturbdiff_scvi.metrics.realistic_zero_threshold` of the training matrix, for
        ``zero_threshold="auto"``."""
        from ..metrics import realistic_zero_threshold  # lazy: keeps metrics off import

        return realistic_zero_threshold(self.matrix)

    @cached_property
    def _axes(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {}

    def principal_axes(self, k: int, *, return_mean: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The top ``k`` principal axes ``(G, k)`` of the training matrix (``OutputOptions(shift_pcs=k)``), and with
        ``return_mean`` the mean of the cells they were fitted on, fitted on first use for each ``k``
        (:func:`~perturbdiff_scvi.model._shift_pcs.principal_axes`); not saved."""
        if k not in self._axes:
            from ._shift_pcs import principal_axes

            self._axes[k] = principal_axes(self.matrix, k, return_mean=True)
        return self._axes[k] if return_mean else self._axes[k][0]
