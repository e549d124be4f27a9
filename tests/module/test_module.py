"""PerturbDiffModule: batch layout, loss, EMA and sampling on a tiny configuration."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_scvi.module import PerturbDiffModule, energy_distance, per_set_mse

G, B, S = 10, 3, 4
PERTS, CTXS, BATCHES = [1, 2, 1], [0, 1, 1], [1, 0, 1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _module(**kwargs) -> PerturbDiffModule:
    torch.manual_seed(0)
    cfg = {"set_size": S, "n_hidden": 16, "depth": 1, "n_heads": 2, "n_cov": 8, "n_timesteps": 10, **kwargs}
    return PerturbDiffModule(G, 3, 2, 2, **cfg)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[P1, C1, P2, C2, P3, C3]``; control rows carry perturbation code 0 and their set's context/batch."""
    g = _gen(seed)
    x = torch.rand(2 * B * S, G, generator=g) * 5
    pert, ctx, batch = (torch.empty(2 * B * S, 1) for _ in range(3))
    for b in range(B):
        p_rows = slice(2 * b * S, (2 * b + 1) * S)
        c_rows = slice((2 * b + 1) * S, (2 * b + 2) * S)
        pert[p_rows], pert[c_rows] = PERTS[b], 0
        ctx[p_rows] = ctx[c_rows] = CTXS[b]
        batch[p_rows] = batch[c_rows] = BATCHES[b]
    return {"X": x, "perturbation": pert, "context": ctx, "batch": batch}


def _randomise(net: torch.nn.Module, seed: int = 1) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(seed)))


def test_forward_unpacks_layout():
    module = _module().eval()
    batch = _batch()
    torch.manual_seed(0)
    inference, generative, loss = module(batch)
    x = batch["X"].view(B, 2, S, G)
    torch.testing.assert_close(inference["x_ctrl"], x[:, 1] / module.input_scale)
    assert inference["pert"].tolist() == PERTS  # read from the perturbed rows, not the control rows
    assert inference["ctx"].tolist() == CTXS
    assert inference["batch"].tolist() == BATCHES
    assert inference["pert"].dtype == torch.long
    assert inference["drop_cond"].shape == (B,) and inference["drop_cond"].dtype == torch.bool
    assert generative["x0_hat"].shape == (B, S, G)
    assert (generative["x0_hat"] >= 0).all()
    # the loss compares the prediction with the perturbed rows (not the control rows) of each set
    torch.testing.assert_close(
        loss.reconstruction_loss["reconstruction_loss"],
        per_set_mse(generative["x0_hat"], x[:, 0] / module.input_scale)
        + 0.5 * energy_distance(generative["x0_hat"], x[:, 0] / module.input_scale),
    )


@pytest.mark.parametrize("p,expected", [(0.0, False), (1.0, True)])
def test_drop_probability(p, expected):
    module = _module(p_drop_cond=p)
    inference, _, _ = module(_batch())
    assert (inference["drop_cond"] == expected).all()


def test_loss_structure():
    module = _module().eval()
    torch.manual_seed(0)
    _, _, out = module(_batch())
    loss = out.loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    recon = out.reconstruction_loss["reconstruction_loss"]
    assert recon.shape == (B,)
    torch.testing.assert_close(loss, recon.mean())
    assert set(out.extra_metrics) >= {"mse", "energy"}
    for key in ("mse", "energy"):
        assert out.extra_metrics[key].ndim == 0
        assert not out.extra_metrics[key].requires_grad
    torch.testing.assert_close(loss, out.extra_metrics["mse"] + out.extra_metrics["energy"])


def test_loss_weights_per_set():
    module = _module(mse_weight=0.3, energy_weight=2.5).eval()
    batch = _batch(1)
    torch.manual_seed(1)
    _, generative, out = module(batch)
    x0 = batch["X"].view(B, 2, S, G)[:, 0] / module.input_scale
    x0_hat = generative["x0_hat"]
    mse = per_set_mse(x0_hat, x0)
    energy = 0.5 * energy_distance(x0_hat, x0)
    torch.testing.assert_close(out.reconstruction_loss["reconstruction_loss"], 0.3 * mse + 2.5 * energy)
    torch.testing.assert_close(out.extra_metrics["mse"], mse.mean())
    torch.testing.assert_close(out.extra_metrics["energy"], energy.mean())
    torch.testing.assert_close(out.loss, 0.3 * out.extra_metrics["mse"] + 2.5 * out.extra_metrics["energy"])
    assert out.extra_metrics["energy"] > 0


def test_energy_weight_zero_is_mse():
    module = _module(energy_weight=0.0).eval()
    torch.manual_seed(2)
    _, _, out = module(_batch(2))
    torch.testing.assert_close(out.loss, out.extra_metrics["mse"])


def test_backward_trains_denoiser_not_ema():
    module = _module(p_self_cond=1.0).train()
    torch.manual_seed(3)
    _, _, out = module(_batch(3))
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in module.ema.parameters())
    grads = [p.grad for p in module.denoiser.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert module.denoiser.final.linear.weight.grad.abs().sum() > 0


def _flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_ema_starts_as_copy_and_warm_up_decay():
    module = _module()
    torch.testing.assert_close(_flat(module.ema), _flat(module.denoiser))
    _randomise(module.denoiser)
    ema0, live = _flat(module.ema), _flat(module.denoiser)
    module.update_ema()
    decay = min(0.99, 2 / 11)
    ema1 = _flat(module.ema)
    torch.testing.assert_close(ema1, decay * ema0 + (1 - decay) * live)
    assert (ema1 - live).norm() < (ema0 - live).norm()
    assert int(module.ema_updates) == 1
    torch.testing.assert_close(_flat(module.denoiser), live)  # live weights untouched


def test_ema_decay_caps_at_ema_decay():
    module = _module(ema_decay=0.9)
    _randomise(module.denoiser)
    module.ema_updates.fill_(1000)
    ema0, live = _flat(module.ema), _flat(module.denoiser)
    module.update_ema()  # warm-up 1001 / 1010 > 0.9
    torch.testing.assert_close(_flat(module.ema), 0.9 * ema0 + 0.1 * live)


def test_ema_every():
    module = _module(ema_every=2)
    _randomise(module.denoiser)
    ema0, live = _flat(module.ema), _flat(module.denoiser)
    module.update_ema()
    torch.testing.assert_close(_flat(module.ema), ema0)  # skipped
    module.update_ema()
    decay = 2 / 11  # first real update: n / ema_every = 1
    torch.testing.assert_close(_flat(module.ema), decay * ema0 + (1 - decay) * live)


def _sample_inputs():
    x_ctrl = torch.rand(2, S, G, generator=_gen(5)) * 4
    return x_ctrl, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1, 0])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_shape_non_negative_and_seeded(sampler):
    module = _module()
    _randomise(module.ema)
    args = _sample_inputs()
    kw = {"n_steps": 2, "sampler": sampler, "guidance_scale": 1.0}
    a = module.sample(*args, generator=_gen(0), **kw)
    b = module.sample(*args, generator=_gen(0), **kw)
    c = module.sample(*args, generator=_gen(1), **kw)
    assert a.shape == (2, S, G)
    assert (a >= 0).all() and (a > 0).any()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sample_uses_ema_and_input_scale():
    module = _module(input_scale=10.0)
    _randomise(module.denoiser)
    with torch.no_grad():  # EMA net predicts the constant 0.5 (in diffusion scale) for every gene
        module.ema.final.linear.weight.zero_()
        module.ema.final.linear.bias.fill_(0.5)
    args = _sample_inputs()
    ema_out = module.sample(*args, n_steps=2, generator=_gen(0), use_ema=True)
    torch.testing.assert_close(ema_out, torch.full((2, S, G), 5.0))  # (1 + w) 0.5 - w 0.5, times input_scale
    live_out = module.sample(*args, n_steps=2, generator=_gen(0), use_ema=False)
    assert not torch.allclose(live_out, ema_out)


def test_sample_defaults_are_the_shared_prediction_defaults():
    """``module.sample`` and ``PerturbDiff.predict_population`` share one default set (diffusion/_defaults.py)."""
    import inspect

    from perturbdiff_scvi.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_N_STEPS

    params = inspect.signature(PerturbDiffModule.sample).parameters
    assert params["n_steps"].default == DEFAULT_N_STEPS == 1
    assert params["guidance_scale"].default == DEFAULT_GUIDANCE_SCALE == 0.5
    module = _module()
    _randomise(module.ema)
    args = _sample_inputs()
    explicit = module.sample(*args, n_steps=1, guidance_scale=0.5, generator=_gen(0))
    assert torch.equal(module.sample(*args, generator=_gen(0)), explicit)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"preconditioning": "edm_shrink"}, "preconditioning must be 'none' or 'edm'; got 'edm_shrink'"),
        ({"pairing": "ot"}, "pairing"),
        ({"p_high_noise": 0.5}, "p_high_noise"),
        ({"energy_pcs": 3}, "energy_pcs"),
    ],
)
def test_removed_options_are_rejected(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        _module(**kwargs)


def test_sample_has_no_init_option():
    module = _module()
    with pytest.raises(TypeError, match="init"):
        module.sample(*_sample_inputs(), init="control")
