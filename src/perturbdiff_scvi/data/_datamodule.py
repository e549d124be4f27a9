"""SetDataSplitter: a LightningDataModule that serves cell sets with a set-level train/validation split."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from scvi import settings
from torch.utils.data import DataLoader, Dataset

from .._constants import PDIFF_KEYS
from ._grouping import CellGroups, SplitName, group_cells, split_groups
from ._set_sampler import SetBatchSampler

logger = logging.getLogger(__name__)


def registered_codes(adata_manager) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (perturbation, context, batch) codes of every cell of a registered AnnData."""
    return tuple(
        np.asarray(adata_manager.get_from_registry(k)).ravel().astype(np.int64)
        for k in (PDIFF_KEYS.PERT_KEY, PDIFF_KEYS.CONTEXT_KEY, PDIFF_KEYS.BATCH_KEY)
    )


class OrderedRows(Dataset):
    """A scvi-tools ``AnnTorchDataset`` over a backed AnnData, serving rows in the order asked for.

    For a backed AnnData scvi-tools sorts the requested rows (h5py reads increasing positions only), which would
    scramble the ``[P1, C1, P2, C2, ...]`` layout of a batch, and repeated rows (controls drawn with replacement)
    would fail. This reads each batch's distinct rows once, sorted, and re-expands them in batch order, so only
    the rows of one batch are ever in memory.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        data = self.dataset[unique]
        return {k: v[torch.as_tensor(inverse)] if isinstance(v, torch.Tensor) else v[inverse] for k, v in data.items()}


class SetDataSplitter(pl.LightningDataModule):
    """Builds cell groups from the registry, splits them by set and serves ``[P1, C1, P2, C2, ...]`` batches.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    control_code
        Registry code of the control perturbation.
    set_size
        Cells per set.
    sets_per_batch
        Sets per optimisation step.
    validation_size
        Share of sets (``split="set"``), cells (``"cell"``) or groups (``"group"``) held out for validation.
    split
        Unit of the train/validation split, see :func:`~perturbdiff_scvi.data.split_groups`.
    train_on_controls
        Also use the control cells of each (context, batch) as target sets.
    seed
        Seed of the split and of the set sampler; ``None`` uses ``scvi.settings.seed``.
    """

    def __init__(
        self,
        adata_manager,
        control_code: int,
        *,
        set_size: int,
        sets_per_batch: int = 8,
        validation_size: float = 0.1,
        split: SplitName = "set",
        train_on_controls: bool = True,
        seed: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.adata_manager = adata_manager
        self.control_code = control_code
        self.set_size = set_size
        self.sets_per_batch = sets_per_batch
        self.validation_size = validation_size
        self.split = split
        self.train_on_controls = train_on_controls
        self.seed = settings.seed if seed is None else seed
        self.seed = 0 if self.seed is None else int(self.seed)
        self.pin_memory = pin_memory
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Group, split and record ``train_idx``/``val_idx``/``test_idx`` (all cells, adata row order)."""
        if getattr(self, "train_groups", None) is not None:
            return
        pert, ctx, batch = registered_codes(self.adata_manager)
        groups = group_cells(pert, ctx, batch, self.control_code, include_controls=self.train_on_controls)
        if not groups.members:
            raise ValueError("No perturbed cells to train on: every cell is a control cell.")
        self._warn_fallbacks(groups)
        self._warn_tiny(groups)
        rng = np.random.default_rng(self.seed)
        self.train_groups, self.val_groups = split_groups(
            groups, self.validation_size, split=self.split, set_size=self.set_size, rng=rng
        )
        self.train_idx = np.sort(np.concatenate(list(self.train_groups.members.values())))
        self.val_idx = (
            np.sort(np.concatenate(list(self.val_groups.members.values())))
            if self.val_groups.members
            else np.array([], dtype=np.int64)
        )
        self.test_idx = np.setdiff1d(np.arange(len(pert)), np.union1d(self.train_idx, self.val_idx))
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)

    def _warn_fallbacks(self, groups: CellGroups) -> None:
        widened = {k: lvl for k, lvl in groups.fallback.items() if lvl != "matched"}
        if widened:
            ctx_map = self.adata_manager.get_state_registry(PDIFF_KEYS.CONTEXT_KEY).categorical_mapping
            batch_map = self.adata_manager.get_state_registry(PDIFF_KEYS.BATCH_KEY).categorical_mapping
            pairs = sorted({(str(ctx_map[k[1]]), str(batch_map[k[2]]), lvl) for k, lvl in widened.items()})
            shown = ", ".join(f"(context={c!r}, batch={b!r}) -> {lvl}" for c, b, lvl in pairs[:5])
            warnings.warn(
                f"{len(pairs)} (context, batch) pair(s) have perturbed cells but no control cells; their control "
                f"sets are drawn from a wider pool ({shown}{', ...' if len(pairs) > 5 else ''}). Fallback order: "
                "same context in other batches, then same batch in other contexts, then all controls.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )

    def _warn_tiny(self, groups: CellGroups) -> None:
        """Groups far smaller than a set are padded by resampling a handful of cells: say so."""
        limit = max(2, self.set_size // 2)
        tiny = {k: len(m) for k, m in groups.members.items() if len(m) < limit}
        if tiny:
            maps = [
                self.adata_manager.get_state_registry(key).categorical_mapping
                for key in (PDIFF_KEYS.PERT_KEY, PDIFF_KEYS.CONTEXT_KEY, PDIFF_KEYS.BATCH_KEY)
            ]
            shown = ", ".join(
                f"({maps[0][k[0]]}, {maps[1][k[1]]}, {maps[2][k[2]]}): {n} cells" for k, n in list(tiny.items())[:5]
            )
            warnings.warn(
                f"{len(tiny)} (perturbation, context, batch) group(s) have fewer than {limit} cells ({shown}"
                f"{', ...' if len(tiny) > 5 else ''}); their sets of {self.set_size} cells are filled by resampling "
                "those few cells, so the model sees little of their variability.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )

    def _loader(self, groups: CellGroups, fixed: bool) -> DataLoader:
        dataset = self.adata_manager.create_torch_dataset(
            data_and_attributes={
                PDIFF_KEYS.X_KEY: np.float32,
                PDIFF_KEYS.PERT_KEY: np.int64,
                PDIFF_KEYS.CONTEXT_KEY: np.int64,
                PDIFF_KEYS.BATCH_KEY: np.int64,
            }
        )
        if getattr(self.adata_manager.adata, "isbacked", False):
            dataset = OrderedRows(dataset)
        sampler = SetBatchSampler(
            groups, self.set_size, self.sets_per_batch, seed=self.seed + (10_000 if fixed else 1), fixed=fixed
        )
        return DataLoader(
            dataset, sampler=sampler, batch_size=None, num_workers=settings.dl_num_workers, pin_memory=self.pin_memory
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_groups, fixed=False)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_groups.members:
            return []
        return self._loader(self.val_groups, fixed=True)
