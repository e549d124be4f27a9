"""Test helpers for multi-process (DDP) training; imported only by the tests that need Lightning."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.callbacks import Callback


class SetRecorder(Callback):
    """Lightning callback: per rank, the adata rows of the perturbed sets of every training batch and a fingerprint
    of the torch RNG at the first batch, written to ``out_dir/rank{r}.json`` when training ends.

    Lives here (not in a test module) so that ``strategy="ddp_spawn"`` processes can unpickle it; not in
    ``_helpers`` so that collecting the tests does not import Lightning.
    """

    def __init__(self, out_dir, x: np.ndarray, set_size: int):
        self.out_dir = str(out_dir)
        self.set_size = set_size
        self.row_of = {row.tobytes(): i for i, row in enumerate(np.asarray(x, dtype=np.float32))}
        self.sets: list[list[list[int]]] = []
        self.rng = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import hashlib

        import torch

        x = batch["X"].cpu().numpy()
        perturbed = x.reshape(-1, 2, self.set_size, x.shape[-1])[:, 0]
        self.sets.append([[self.row_of[row.tobytes()] for row in cells] for cells in perturbed])
        if self.rng is None:
            self.rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer, pl_module):
        import json
        from pathlib import Path

        out = {"rank": trainer.global_rank, "world_size": trainer.world_size, "sets": self.sets, "rng": self.rng}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))
