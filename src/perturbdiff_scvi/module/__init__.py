"""The PerturbDiff module (scvi-tools ``BaseModuleClass``) and its losses."""

from ._losses import energy_distance, pairwise_distances, per_set_mse
from ._module import PerturbDiffModule

__all__ = ["PerturbDiffModule", "energy_distance", "pairwise_distances", "per_set_mse"]
