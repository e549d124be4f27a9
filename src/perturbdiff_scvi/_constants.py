"""Registry keys and package-wide constants."""

from __future__ import annotations

from typing import NamedTuple


class _PDiffKeys(NamedTuple):
    X_KEY: str = "X"  # same string as scvi's REGISTRY_KEYS.X_KEY
    PERT_KEY: str = "perturbation"
    CONTEXT_KEY: str = "context"
    BATCH_KEY: str = "batch"  # same string as scvi's REGISTRY_KEYS.BATCH_KEY


PDIFF_KEYS = _PDiffKeys()

# Category used when setup_anndata is called without a context or batch column.
DEFAULT_CATEGORY = "all"
