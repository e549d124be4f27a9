"""Set sampling: grouping cells, matching controls, splitting and serving sets."""

from ._datamodule import SetDataSplitter, registered_codes
from ._grouping import FALLBACK_ORDER, CellGroups, control_pool, group_cells, split_groups
from ._set_sampler import SetBatchSampler

__all__ = [
    "FALLBACK_ORDER",
    "CellGroups",
    "SetBatchSampler",
    "SetDataSplitter",
    "control_pool",
    "group_cells",
    "registered_codes",
    "split_groups",
]
