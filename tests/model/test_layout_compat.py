"""Models saved with the earlier layout (a control update in the last SetDiT block) still load and predict the same.

That update never reached the output; the current layout does not create it (its parameters got no gradient,
which multi-device DDP rejects). ``PerturbDiff.load`` drops those tensors."""

from __future__ import annotations

import numpy as np
import torch
from _helpers import TINY, make_perturbation_adata


def _to_full_layout(state: dict, depth: int, n_hidden: int, mlp_ratio: float = 4.0) -> dict:
    """Add what the earlier layout held in the last block: the control MLP, 4 more control modulation chunks and
    the control half of the attention projection (random values: they never influenced the output)."""
    g = torch.Generator().manual_seed(0)
    h, hidden = n_hidden, int(n_hidden * mlp_ratio)
    state = dict(state)
    for net in ("denoiser", "ema"):
        pre = f"{net}.blocks.{depth - 1}."
        state[pre + "mlp_c.0.weight"] = torch.randn(hidden, h, generator=g)
        state[pre + "mlp_c.0.bias"] = torch.randn(hidden, generator=g)
        state[pre + "mlp_c.2.weight"] = torch.randn(h, hidden, generator=g)
        state[pre + "mlp_c.2.bias"] = torch.randn(h, generator=g)
        for name, rows in (("ada_c.linear", 4 * h), ("attn.proj", h)):
            w, b = state[pre + name + ".weight"], state[pre + name + ".bias"]
            state[pre + name + ".weight"] = torch.cat([w, torch.randn(rows, w.shape[1], generator=g)])
            state[pre + name + ".bias"] = torch.cat([b, torch.randn(rows, generator=g)])
    return state


def test_full_layout_saved_model_loads_and_predicts_the_same(trained_model, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    expected = trained_model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    trained_model.save(tmp_path / "model", overwrite=True)
    model_file = tmp_path / "model" / "model.pt"
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    saved["model_state_dict"] = _to_full_layout(saved["model_state_dict"], TINY["depth"], TINY["n_hidden"])
    assert "denoiser.blocks.0.mlp_c.0.weight" in saved["model_state_dict"]
    torch.save(saved, model_file)

    loaded = PerturbDiff.load(tmp_path / "model", adata=make_perturbation_adata())
    assert set(loaded.module.state_dict()) == set(trained_model.module.state_dict())
    got = loaded.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    np.testing.assert_array_equal(got.X, expected.X)
