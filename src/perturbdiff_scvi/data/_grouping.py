"""Pure grouping logic: cells -> (perturbation, context, batch) groups, matched control pools, splits.

Everything works on integer code arrays and returns row positions, so it is testable without AnnData.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SplitName = Literal["set", "cell", "group"]
FallbackLevel = Literal["matched", "same_context", "same_batch", "all_controls"]

# Order in which an empty (context, batch) control pool is widened. The released code widens to other
# cell types of the same batch first; we widen to other batches of the same context first because the
# cell type drives expression far more than the batch does. Documented in PerturbDiff.setup_anndata.
FALLBACK_ORDER: tuple[FallbackLevel, ...] = ("matched", "same_context", "same_batch", "all_controls")

GroupKey = tuple[int, int, int]  # (perturbation code, context code, batch code)


@dataclass
class CellGroups:
    """Target groups and their matched control pools (all values are row positions)."""

    members: dict[GroupKey, np.ndarray] = field(default_factory=dict)
    controls: dict[GroupKey, np.ndarray] = field(default_factory=dict)
    fallback: dict[GroupKey, FallbackLevel] = field(default_factory=dict)

    @property
    def keys(self) -> list[GroupKey]:
        return list(self.members)

    def subset(self, members: dict[GroupKey, np.ndarray]) -> CellGroups:
        """Same control pools, other members (used by the train/validation split)."""
        members = {k: v for k, v in members.items() if len(v)}
        return CellGroups(members, {k: self.controls[k] for k in members}, {k: self.fallback[k] for k in members})

    @property
    def n_cells(self) -> int:
        return int(sum(len(v) for v in self.members.values()))


def control_pool(
    pert: np.ndarray, ctx: np.ndarray, batch: np.ndarray, control_code: int, context: int, batch_code: int
) -> tuple[np.ndarray, FallbackLevel]:
    """Control rows for one (context, batch), widening along :data:`FALLBACK_ORDER` when empty."""
    is_ctrl = pert == control_code
    masks = {
        "matched": is_ctrl & (ctx == context) & (batch == batch_code),
        "same_context": is_ctrl & (ctx == context),
        "same_batch": is_ctrl & (batch == batch_code),
        "all_controls": is_ctrl,
    }
    for level in FALLBACK_ORDER:
        rows = np.flatnonzero(masks[level])
        if len(rows):
            return rows, level
    raise ValueError("There are no control cells at all; PerturbDiff conditions every set on control cells.")


def group_cells(
    pert: np.ndarray,
    ctx: np.ndarray,
    batch: np.ndarray,
    control_code: int,
    *,
    include_controls: bool = True,
    rows: np.ndarray | None = None,
) -> CellGroups:
    """Group ``rows`` (default: all) by (perturbation, context, batch) and attach control pools.

    ``include_controls`` also makes the control cells of each (context, batch) a target group
    (the released ``keep_control_cell`` option); it teaches the covariate embedding of every context.
    Control pools are always drawn from all control cells, whatever ``rows`` is (as released).
    """
    pert, ctx, batch = (np.asarray(a, dtype=np.int64).ravel() for a in (pert, ctx, batch))
    rows = np.arange(len(pert)) if rows is None else np.asarray(rows, dtype=np.int64)
    if not include_controls:
        rows = rows[pert[rows] != control_code]
    keys = np.stack([pert[rows], ctx[rows], batch[rows]], axis=1)
    groups = CellGroups()
    if len(rows) == 0:
        return groups
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=len(uniq)))[:-1]
    pools: dict[tuple[int, int], tuple[np.ndarray, FallbackLevel]] = {}
    for key_arr, members in zip(uniq, np.split(rows[order], bounds), strict=True):
        key = (int(key_arr[0]), int(key_arr[1]), int(key_arr[2]))
        if key[1:] not in pools:
            pools[key[1:]] = control_pool(pert, ctx, batch, control_code, key[1], key[2])
        groups.members[key] = members
        groups.controls[key], groups.fallback[key] = pools[key[1:]]
    return groups


def split_groups(
    groups: CellGroups,
    validation_size: float,
    *,
    split: SplitName = "set",
    set_size: int = 64,
    rng: np.random.Generator,
) -> tuple[CellGroups, CellGroups]:
    """Split target cells into training and validation groups without sharing any cell.

    - ``"set"``: each group is shuffled and cut into blocks of ``set_size`` cells;
      ``round(validation_size * n_blocks)`` full blocks, drawn across all groups, go to validation
      (never a group's only block, so every group keeps training cells).
    - ``"cell"``: a share ``validation_size`` of each group's cells (rounded, at least one cell left for
      training) goes to validation; sets are then drawn inside each part.
    - ``"group"``: whole (perturbation, context, batch) groups go to validation (out-of-distribution).
    """
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1); got {validation_size}.")
    if split not in ("set", "cell", "group"):
        raise ValueError(f"split must be 'set', 'cell' or 'group'; got {split!r}.")
    train: dict[GroupKey, np.ndarray] = {}
    val: dict[GroupKey, np.ndarray] = {}
    if split == "group":
        keys = groups.keys
        n_val = int(round(validation_size * len(keys)))
        n_val = min(n_val, len(keys) - 1)
        val_keys = {keys[i] for i in rng.permutation(len(keys))[:n_val]}
        for k in keys:
            (val if k in val_keys else train)[k] = groups.members[k]
        return groups.subset(train), groups.subset(val)
    perms = {k: rng.permutation(m) for k, m in groups.members.items()}
    if split == "set":
        # Every full block but the first of each group may go to validation (each group keeps training data);
        # round(validation_size * all blocks) of them are drawn at random across groups.
        candidates = [k for k, m in perms.items() for _ in range(1, len(m) // set_size)]
        n_total = sum(len(m) // set_size for m in perms.values())
        n_pick = min(int(round(validation_size * n_total)), len(candidates))
        picked = [candidates[i] for i in rng.choice(len(candidates), n_pick, replace=False)] if n_pick else []
        n_val_cells = {k: picked.count(k) * set_size for k in perms}
    else:
        n_val_cells = {k: min(int(round(validation_size * len(m))), len(m) - 1) for k, m in perms.items()}
    for k, perm in perms.items():
        n_val = n_val_cells[k]
        val[k], train[k] = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return groups.subset(train), groups.subset(val)
