"""PerturbDiffModule training mechanics: the EMA update (public torch API, one call, bitwise as before),
self-conditioning (the second pass gets the detached first estimate) and classifier-free-guidance dropout."""

from __future__ import annotations

import math

import pytest
import torch

from perturbdiff_scvi.module import PerturbDiffModule
from perturbdiff_scvi.module import _module as module_impl

G = 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _module(set_size: int = 4, **kwargs) -> PerturbDiffModule:
    torch.manual_seed(0)
    cfg = {"set_size": set_size, "n_hidden": 16, "depth": 1, "n_heads": 2, "n_cov": 8, "n_timesteps": 20, **kwargs}
    return PerturbDiffModule(G, 3, 2, 2, **cfg)


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Move every weight (adaLN-Zero makes a fresh block the identity, and the null embedding is 0 at init)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _batch(n_sets: int, set_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[P1, C1, P2, C2, ...]`` with random codes per set (controls carry code 0)."""
    g = _gen(seed)
    x = torch.rand(2 * n_sets * set_size, G, generator=g) * 3
    per_set = [torch.randint(0, n, (n_sets,), generator=g) for n in (3, 2, 2)]
    rows = [code.repeat_interleave(2 * set_size)[:, None].float() for code in per_set]
    rows[0].view(n_sets, 2, set_size)[:, 1] = 0  # the control half of each set
    return {"X": x, "perturbation": rows[0], "context": rows[1], "batch": rows[2]}


# --------------------------------------------------------------------------------------------------- EMA update
def _reference_lerp(ema: list[torch.Tensor], live: list[torch.Tensor], weight: float) -> None:
    for e, p in zip(ema, live, strict=True):
        e.lerp_(p, weight)


@pytest.mark.parametrize("ema_every", [1, 3])
def test_ema_update_is_bitwise_the_previous_foreach_lerp(ema_every):
    """update_ema (public ``get_ema_multi_avg_fn``) gives the very bits of the former ``torch._foreach_lerp_``
    code and of a per-tensor ``lerp_``, over several warm-up steps with weights moving between updates."""
    module = _module(ema_every=ema_every, ema_decay=0.95)
    ema_foreach = [p.detach().clone() for p in module.ema.parameters()]
    ema_loop = [p.detach().clone() for p in module.ema.parameters()]
    n_real = 0
    for step in range(1, 13):
        _randomise(module.denoiser, seed=step)
        live = [p.detach() for p in module.denoiser.parameters()]
        module.update_ema()
        assert int(module.ema_updates) == step
        if step % ema_every:
            continue
        n_real += 1
        decay = min(0.95, (1 + step / ema_every) / (10 + step / ema_every))
        if hasattr(torch, "_foreach_lerp_"):  # the code this replaced
            torch._foreach_lerp_(ema_foreach, live, 1 - decay)
        else:  # pragma: no cover
            _reference_lerp(ema_foreach, live, 1 - decay)
        _reference_lerp(ema_loop, live, 1 - decay)
        for got, a, b in zip(module.ema.parameters(), ema_foreach, ema_loop, strict=True):
            assert torch.equal(got, a) and torch.equal(got, b)
    assert n_real == 12 // ema_every
    start = [p.detach() for p in _module().ema.parameters()]  # the EMA moved (the comparison is not vacuous)
    assert any(not torch.equal(e, s) for e, s in zip(module.ema.parameters(), start, strict=True))


def test_ema_update_formula_and_single_multi_tensor_call(monkeypatch):
    """ema <- decay * ema + (1 - decay) * live for all tensors, applied by ONE call of the public multi-tensor
    EMA function (so a Ctrl+C cannot leave half of the EMA tensors updated)."""
    module = _module()
    _randomise(module.denoiser, seed=1)
    ema0 = [p.detach().clone() for p in module.ema.parameters()]
    live = [p.detach().clone() for p in module.denoiser.parameters()]
    calls = []
    real = module_impl.get_ema_multi_avg_fn

    def counting(decay):
        fn = real(decay)

        def wrapped(ema_params, live_params, n):
            calls.append((decay, len(ema_params), len(live_params)))
            return fn(ema_params, live_params, n)

        return wrapped

    monkeypatch.setattr(module_impl, "get_ema_multi_avg_fn", counting)
    module.update_ema()
    n_tensors = len(ema0)
    assert calls == [(pytest.approx(2 / 11), n_tensors, n_tensors)]
    for e, e0, p in zip(module.ema.parameters(), ema0, live, strict=True):
        torch.testing.assert_close(e, 2 / 11 * e0 + 9 / 11 * p)
    assert all(not p.requires_grad for p in module.ema.parameters())


# --------------------------------------------------------------------------------------------------- self-conditioning
class _Calls:
    """Forward hook on the denoiser: records positional inputs and the output of every call."""

    def __init__(self, net: torch.nn.Module):
        self.inputs: list[tuple] = []
        self.outputs: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []
        self.handle = net.register_forward_hook(self)

    def __call__(self, net, args, output):
        self.inputs.append(args)
        self.outputs.append(output)
        self.grad_enabled.append(torch.is_grad_enabled())


def test_self_conditioning_feeds_the_detached_first_estimate():
    module = _module(p_self_cond=1.0, p_drop_cond=0.5).train()
    _randomise(module.denoiser, seed=2)
    calls = _Calls(module.denoiser)
    torch.manual_seed(0)
    _, generative, loss = module(_batch(3, 4))
    assert len(calls.inputs) == 2
    (first, second), (out1, out2) = calls.inputs, calls.outputs
    # Same noisy sets, timesteps, controls, codes and dropout mask in both passes.
    for i in (0, 1, 2, 3, 4, 5, 7):
        assert torch.equal(first[i], second[i]), i
    assert first[6] is None  # the first pass sees no estimate (SetDiT reads None as zeros)
    assert second[6] is out1  # the second pass gets the first pass's x0 estimate ...
    assert calls.grad_enabled == [False, True]  # ... computed without a graph (detached)
    assert not out1.requires_grad and out1.grad_fn is None
    assert out2.requires_grad and generative["x0_hat"] is out2
    assert out1.abs().sum() > 0  # a non-trivial estimate, so feeding it (vs zeros) matters:
    with torch.no_grad():
        zeros_cond = module.denoiser(*second[:6], torch.zeros_like(out1), second[7])
    assert (zeros_cond - out2).abs().max() > 1e-4
    loss.loss.backward()  # gradients come from the second pass only
    assert module.denoiser.x_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("p_self_cond", "training"), [(0.0, True), (1.0, False)])
def test_no_self_conditioning_pass_gets_zeros(p_self_cond, training):
    """p_self_cond=0 (and eval mode, e.g. validation) runs one pass whose self-conditioning input is zeros: it is
    passed as None, which SetDiT embeds as zeros without concatenating them (the same tokens to rounding)."""
    module = _module(p_self_cond=p_self_cond).train(training)
    _randomise(module.denoiser, seed=3)
    calls = _Calls(module.denoiser)
    torch.manual_seed(0)
    module(_batch(2, 4))
    assert len(calls.inputs) == 1
    args = calls.inputs[0]
    assert args[6] is None
    with torch.no_grad():
        none_out = module.denoiser(*args[:6], None, args[7])
        zeros_out = module.denoiser(*args[:6], torch.zeros_like(args[0]), args[7])
    assert none_out.abs().sum() > 0
    torch.testing.assert_close(none_out, zeros_out, rtol=1e-5, atol=1e-6)


class _CountingDenoiser(torch.nn.Module):
    """Stands in for SetDiT (cheap): returns zeros and counts its calls."""

    def __init__(self):
        super().__init__()
        self.n_calls = 0

    def forward(self, x_t, *args):
        self.n_calls += 1
        return torch.zeros_like(x_t)


def test_self_conditioning_coin_is_one_per_step_at_rate_p():
    p, n = 0.3, 2000
    module = _module(set_size=2, p_self_cond=p).train()
    module.denoiser = _CountingDenoiser()
    x = torch.rand(1, 2, G, generator=_gen(0))
    codes = torch.zeros(1, dtype=torch.long)
    torch.manual_seed(0)
    for _ in range(n):
        module.generative(x, x, codes, codes, codes, torch.zeros(1, dtype=torch.bool))
    n_two_pass = module.denoiser.n_calls - n  # each step runs 1 or 2 passes
    assert 0 <= n_two_pass <= n
    assert abs(n_two_pass / n - p) < 4 * math.sqrt(p * (1 - p) / n), n_two_pass


# --------------------------------------------------------------------------------------------------- guidance dropout
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_condition_dropout_rate_per_set_reaches_the_denoiser(p):
    """Over many sets, the share embedded with the null covariate embedding is p_drop_cond (binomial tolerance),
    drawn per set (not per batch), and exactly those sets get the null embedding inside the denoiser."""
    n_sets = 2000
    module = _module(set_size=2, p_drop_cond=p, p_self_cond=0.0).train()
    _randomise(module.denoiser, seed=4)  # a non-zero null embedding, distinct from any covariate embedding
    null = module.denoiser.cov_embed.null.detach()
    embeddings = []
    module.denoiser.cov_embed.register_forward_hook(lambda m, args, out: embeddings.append(out.detach()))
    torch.manual_seed(1)
    with torch.no_grad():
        inference, _, _ = module(_batch(n_sets, 2, seed=1))
    drop = inference["drop_cond"]
    assert drop.shape == (n_sets,)
    share = drop.float().mean().item()
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n_sets), share
    (emb,) = embeddings
    is_null = (emb == null).all(dim=1)
    assert torch.equal(is_null, drop)
    # per set: runs of equal decisions are as short as independent draws give (not one coin per batch)
    switches = (drop[1:] != drop[:-1]).float().mean().item()
    assert abs(switches - 2 * p * (1 - p)) < 0.05, switches
