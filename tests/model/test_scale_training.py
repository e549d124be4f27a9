"""Training at scale, on CPU: bf16 mixed precision, torch.compile of the denoiser, multi-process DDP."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from _helpers import TINY, TINY_TRAIN


def test_train_bf16_mixed_on_cpu(setup_adata):
    """Lightning's ``precision="bf16-mixed"`` (CPU autocast to bf16) trains with finite losses; weights stay
    float32 and the model predicts."""
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Mismatch dtype between input and weight")  # q/k-norm in fp32
        model.train(**{**TINY_TRAIN, "max_steps": 4}, precision="bf16-mixed")
    for key in ("train_loss", "mse_train", "energy_train"):
        assert np.isfinite(model.history[key].to_numpy(dtype=float)).all(), key
    assert model.module.ema_updates.item() == 4
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    pred = model.predict_population("A", contexts="c0", n_cells=5, seed=0, n_steps=3)
    assert np.isfinite(pred.X).all()
