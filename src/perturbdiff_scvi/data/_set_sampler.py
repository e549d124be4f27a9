"""SetBatchSampler: yields one flat list of rows per step, laid out ``[P1, C1, P2, C2, ...]``."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from ._grouping import CellGroups


class SetBatchSampler(Sampler[list[int]]):
    """Sets of ``set_size`` cells of one group, each followed by ``set_size`` matched control cells.

    One epoch follows the released pipeline: shuffle each group, pad it to a multiple of ``set_size``
    by re-sampling its own cells, cut it into sets, shuffle all sets and serve ``sets_per_batch`` per
    step. Controls are drawn uniformly with replacement from the group's pool, afresh every time.

    With several processes (DDP), every rank draws the same epoch from the shared seed and serves every
    ``num_replicas``-th set from position ``rank``: the ranks see disjoint sets, as many on each (the last
    ``n_sets % num_replicas`` sets of the shuffled epoch are left out, other ones each epoch), so every rank
    runs the same number of steps. Lightning's own distributed sampler must then be off
    (``use_distributed_sampler=False``, which ``PerturbDiff.train`` sets).

    Parameters
    ----------
    groups
        Target groups and control pools (row positions of the dataset).
    set_size
        Cells per set ``S``.
    sets_per_batch
        Sets per optimisation step ``B``.
    seed
        Base seed; epoch ``e`` uses ``seed + e`` (``None``: fresh entropy each epoch).
    fixed
        Replay the same epoch every time (for a comparable validation loss).
    num_replicas, rank
        Shard the sets over ``num_replicas`` processes and serve the shard of ``rank``. ``None`` (default): the
        world size and rank of the initialised ``torch.distributed`` process group at iteration time, or one
        process when there is none.
    """

    def __init__(
        self,
        groups: CellGroups,
        set_size: int,
        sets_per_batch: int,
        seed: int | None = None,
        fixed: bool = False,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if set_size < 1 or sets_per_batch < 1:
            raise ValueError(f"set_size and sets_per_batch must be >= 1; got {set_size} and {sets_per_batch}.")
        if (num_replicas is None) != (rank is None):
            raise ValueError("Give both num_replicas and rank, or neither (then torch.distributed is read).")
        if num_replicas is not None and not (num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"Need num_replicas >= 1 and 0 <= rank < num_replicas; got {num_replicas} and {rank}.")
        self.num_replicas, self.rank = num_replicas, rank
        self.groups = groups
        self.set_size = set_size
        self.sets_per_batch = sets_per_batch
        # A fixed (replayed) epoch needs a seed even when none is given.
        self.seed = int(np.random.default_rng().integers(2**31)) if seed is None and fixed else seed
        self.fixed = fixed
        self._epoch = 0
        self.n_sets = int(sum(-(-len(m) // set_size) for m in groups.members.values()))

    def shard(self) -> tuple[int, int]:
        """``(rank, num_replicas)`` served now: as given, else from ``torch.distributed``, else ``(0, 1)``."""
        if self.num_replicas is not None:
            return self.rank, self.num_replicas
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def n_batches(self, num_replicas: int = 1) -> int:
        """Steps per epoch on each of ``num_replicas`` processes."""
        return -(-(self.n_sets // num_replicas) // self.sets_per_batch)

    def __len__(self) -> int:
        return self.n_batches(self.shard()[1])

    def _rng(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng(self.seed + (0 if self.fixed else self._epoch))

    def epoch_sets(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """All (perturbed set, control set) row pairs of one epoch, in serving order."""
        s = self.set_size
        sets = []
        for key, members in self.groups.members.items():
            rows = rng.permutation(members)
            pad = (-len(rows)) % s
            if pad:
                rows = np.concatenate([rows, rng.choice(members, pad, replace=True)])
            pool = self.groups.controls[key]
            for block in rows.reshape(-1, s):
                sets.append((block, rng.choice(pool, s, replace=True)))
        return [sets[i] for i in rng.permutation(len(sets))]

    def __iter__(self):
        rank, world = self.shard()
        if world > 1 and self.seed is None:
            raise ValueError("Sharding sets over processes needs a seed shared by all of them; got seed=None.")
        rng = self._rng()
        self._epoch += 1
        sets = self.epoch_sets(rng)
        if world > 1:  # the same epoch on every rank: take every world-th set, as many on each rank
            sets = sets[rank : len(sets) - len(sets) % world : world]
        for start in range(0, len(sets), self.sets_per_batch):
            yield np.concatenate([np.concatenate(pair) for pair in sets[start : start + self.sets_per_batch]]).tolist()
