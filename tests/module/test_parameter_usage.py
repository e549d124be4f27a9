"""Every trainable parameter of PerturbDiffModule gets a gradient from one loss (multi-device DDP requires it).

The control stream's output of the last SetDiT block is never used; that block therefore builds no control
update (no control MLP, no control gates, no control half of the attention projection)."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_scvi.module import PerturbDiffModule

G, S = 6, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n_sets: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[P1, C1, P2, C2, ...]`` covering every perturbation, context and batch code."""
    g = _gen(seed)
    x = torch.rand(2 * n_sets * S, G, generator=g) * 3
    per_set = [torch.arange(n_sets) % n for n in (3, 2, 2)]
    per_set[1] = (torch.arange(n_sets) // 3) % 2
    rows = [code.repeat_interleave(2 * S)[:, None].float() for code in per_set]
    rows[0].view(n_sets, 2, S)[:, 1] = 0  # the control half of each set
    return {"X": x, "perturbation": rows[0], "context": rows[1], "batch": rows[2]}


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Move every weight: adaLN-Zero makes a fresh block the identity (its gates are 0, so most grads are 0)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("p_self_cond", [0.0, 1.0])
@pytest.mark.parametrize("components", [False, True])
def test_every_trainable_parameter_gets_a_gradient(depth, p_self_cond, components):
    torch.manual_seed(0)
    comps = torch.tensor([[-1, -1], [0, -1], [0, 1]]) if components else None
    module = PerturbDiffModule(
        G, 2 if components else 3, 2, 2, perturbation_components=comps, set_size=S, n_hidden=16, depth=depth,
        n_heads=2, n_cov=8, n_timesteps=20, p_self_cond=p_self_cond, p_drop_cond=0.5,
    )  # fmt: skip
    _randomise(module.denoiser, seed=1)
    module.train()
    _, _, loss = module(_batch(12))
    loss.loss.backward()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("denoiser.") for n in trainable)  # the EMA copy is frozen
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert no_grad == [], f"parameters without a gradient: {no_grad}"
    # Not only present: every weight matrix row of the blocks and the output layer is used (no dead rows).
    for name, p in trainable.items():
        if p.ndim == 2 and ".blocks." in name:
            dead = (p.grad.abs().sum(dim=1) == 0).sum().item()
            assert dead == 0, f"{name}: {dead} of {p.shape[0]} rows get no gradient"


def test_last_block_has_no_control_update():
    module = PerturbDiffModule(G, 3, 2, 2, set_size=S, n_hidden=16, depth=2, n_heads=2, n_cov=8, n_timesteps=20)
    for net in (module.denoiser, module.ema):
        first, last = net.blocks
        assert first.update_control and hasattr(first, "mlp_c")
        assert not last.update_control and not hasattr(last, "mlp_c")
        assert last.ada_c.linear.out_features == 2 * 16 and last.attn.proj.out_features == 16
    names = set(module.state_dict())
    assert not any(n.startswith(("denoiser.blocks.1.mlp_c", "ema.blocks.1.mlp_c")) for n in names)
