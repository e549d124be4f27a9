"""DiffusionTrainingPlan: AdamW, warm-up + plateau + cosine LR, EMA updates (inside the module)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scvi.train import TrainingPlan


def warmup_plateau_cosine(step: int, total: int, warmup: int, plateau: float, floor: float) -> float:
    """LR multiplier of the released schedule: linear warm-up, flat for ``plateau * total``, cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    flat_end = warmup + int(plateau * total)
    if step < flat_end or total <= flat_end:
        return 1.0
    progress = min(1.0, (step - flat_end) / max(1, total - flat_end))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_implementation(params: list[torch.Tensor], precision: str | int | None = None) -> dict:
    """``{"fused": True}`` where torch has a fused AdamW for every parameter (floating point, on CPU or CUDA), else
    ``{}`` (torch's own choice: ``foreach`` on accelerators, a loop on other devices).

    Under mixed precision (``precision="16-mixed"`` / ``"bf16-mixed"``) Lightning's AMP plugin refuses gradient
    clipping with a fused optimiser (it unscales gradients inside its step), so the per-tensor AdamW is kept there.

    The fused kernel does the same update as the per-tensor loop (to float rounding) in one pass over each
    tensor; for the 95.5 M parameters of ``PAPER_CONFIG`` with 2,000 genes, on one CPU thread, the AdamW step
    falls from 0.26 s to 0.06 s (the whole training step: ``benchmarks/speed.py --compare-rev``).
    """
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                  for p in params)  # fmt: skip
    mixed = "mixed" in str(precision)
    return {"fused": True} if params and fusable and not mixed else {}


class DiffusionTrainingPlan(TrainingPlan):
    """scvi-tools ``TrainingPlan`` with the released PerturbDiff optimisation.

    Parameters
    ----------
    module
        A :class:`~perturbdiff_scvi.module.PerturbDiffModule`.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay, applied to the parameters with >= 2 dims (weight matrices and the covariate
        embedding tables), not to biases, norm weights and null embeddings (< 2 dims).
    warmup_steps
        Linear warm-up steps (capped at a tenth of the run).
    plateau
        Share of the run spent at the peak after warm-up.
    lr_floor
        Final LR as a share of the peak.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        plateau: float = 0.1,
        lr_floor: float = 0.1,
        **kwargs,
    ):
        super().__init__(module, lr=lr, weight_decay=weight_decay, optimizer="AdamW", **kwargs)
        self.warmup_steps = warmup_steps
        self.plateau = plateau
        self.lr_floor = lr_floor

    def configure_optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
            **adamw_implementation(params, self.trainer.precision),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, min(self.warmup_steps, total // 10))

        def schedule(step: int) -> float:
            return warmup_plateau_cosine(step, total, warmup, self.plateau, self.lr_floor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """With several processes, give each rank its own torch RNG stream (timesteps, noise, guidance dropout,
        self-conditioning coin), derived from the state all ranks share (the user's seed) and the rank.

        ``ddp_spawn`` starts every rank with the parent's RNG state: without this, all ranks would draw the same
        timesteps and noise for their (different) sets. One process: nothing changes.
        """
        super().on_train_start()
        if self.trainer.world_size > 1:
            shared = int(torch.randint(0, 2**62, ()))  # the same on every rank
            rank_seed = np.random.SeedSequence([shared, self.trainer.global_rank]).generate_state(2, np.uint64)[0]
            torch.manual_seed(int(rank_seed) % 2**63)

    def compute_and_log_metrics(self, loss_output, metrics, mode: str):
        """scvi-tools' metric logging, run under ``torch.no_grad`` instead of ``torch.inference_mode``.

        scvi-tools 1.4 decorates it with ``torch.inference_mode()``: the logged values and Lightning's batch-size
        accumulators become inference tensors, and with several processes (``sync_dist=True``) Lightning's
        end-of-epoch reduction updates them in place, which fails ("Inplace update to inference tensor outside
        InferenceMode"). The logged values are the same.
        """
        parent = TrainingPlan.compute_and_log_metrics
        inner = getattr(parent, "__wrapped__", None)  # the undecorated function (functools.wraps)
        if inner is None:  # not decorated (another scvi-tools version): nothing to undo
            return parent(self, loss_output, metrics, mode)
        with torch.no_grad():
            return inner(self, loss_output, metrics, mode)

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA follows optimiser steps, not batches: under gradient accumulation Lightning calls this once
        # per ``accumulate_grad_batches`` batches.
        super().optimizer_step(*args, **kwargs)
        self.module.update_ema()
