"""SetDiT: shapes, permutation equivariance over index-paired cells, adaLN-Zero init, null conditioning."""

from __future__ import annotations

import pytest
import torch

from perturbdiff_scvi.nn import JointDiTBlock, SetDiT

G, P, C, NB = 12, 3, 2, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(randomise: bool = True, seed: int = 0, **kwargs) -> SetDiT:
    torch.manual_seed(seed)
    model = SetDiT(G, P, C, NB, n_hidden=16, depth=2, n_heads=2, n_cov=8, **kwargs).eval()
    if randomise:  # adaLN-Zero makes every block the identity at init; break that to test the mixing
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=_gen(seed + 100)))
    return model


def _inputs(b: int = 3, s: int = 7, seed: int = 0):
    g = _gen(seed)
    x_t = torch.randn(b, s, G, generator=g)
    self_cond = torch.rand(b, s, G, generator=g)
    x_ctrl = torch.rand(b, s, G, generator=g) * 3
    t = torch.randint(0, 1000, (b,), generator=g)
    pert = torch.randint(0, P, (b,), generator=g)
    ctx = torch.randint(0, C, (b,), generator=g)
    batch = torch.randint(0, NB, (b,), generator=g)
    return x_t, t, x_ctrl, pert, ctx, batch, self_cond


@pytest.mark.parametrize("s", [1, 5, 17])
def test_output_shape_and_non_negative(s):
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=2, s=s)
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, pert, ctx, batch, sc)
        out_no_sc = model(x_t, t, x_ctrl, pert, ctx, batch)
    assert out.shape == (2, s, G)
    assert out_no_sc.shape == (2, s, G)
    assert (out >= 0).all() and (out_no_sc >= 0).all()
    assert (out > 0).any()
    assert torch.isfinite(out).all()


def test_non_negative_even_for_extreme_inputs():
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs()
    with torch.no_grad():
        out = model(-50 * x_t.abs(), t, -x_ctrl, pert, ctx, batch, -10 * sc)
    assert (out >= 0).all()


def test_self_cond_none_equals_zeros():
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, _ = _inputs()
    with torch.no_grad():
        a = model(x_t, t, x_ctrl, pert, ctx, batch, None)
        b = model(x_t, t, x_ctrl, pert, ctx, batch, torch.zeros_like(x_t))
    torch.testing.assert_close(a, b)


def test_joint_permutation_equivariance():
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=3, s=9)
    perm = torch.randperm(9, generator=_gen(42))
    assert not torch.equal(perm, torch.arange(9))
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, pert, ctx, batch, sc)
        out_p = model(x_t[:, perm], t, x_ctrl[:, perm], pert, ctx, batch, sc[:, perm])
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_p, out, atol=1e-3)  # the permutation does move cells


def test_permuting_controls_alone_breaks_pairing():
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=3, s=9)
    perm = torch.randperm(9, generator=_gen(43))
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, pert, ctx, batch, sc)
        out_c = model(x_t, t, x_ctrl[:, perm], pert, ctx, batch, sc)
    assert (out_c - out).abs().max() > 1e-3


def test_cells_interact_through_attention():
    """Changing one cell changes the prediction for the other cells of its set (but not other sets)."""
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=2, s=6)
    x_t2 = x_t.clone()
    x_t2[0, 0] += 2.0
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, pert, ctx, batch, sc)
        out2 = model(x_t2, t, x_ctrl, pert, ctx, batch, sc)
    assert (out2[0, 1:] - out[0, 1:]).abs().max() > 1e-4
    torch.testing.assert_close(out2[1], out[1], atol=1e-6, rtol=1e-6)


def test_blocks_are_identity_at_init():
    model = _model(randomise=False)
    g = _gen(5)
    h, hc, c = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    assert len(model.blocks) == 2
    for block in model.blocks:
        assert isinstance(block, JointDiTBlock)
        with torch.no_grad():
            h2, hc2 = block(h, hc, c)
        assert torch.equal(h2, h)
        assert hc2 is None if block is model.blocks[-1] else torch.equal(hc2, hc)


def test_blocks_are_not_identity_after_perturbation():
    model = _model(randomise=True)
    g = _gen(5)
    h, hc, c = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        h2, hc2 = model.blocks[0](h, hc, c)
    assert not torch.allclose(h2, h) and not torch.allclose(hc2, hc)


def test_drop_cond_ignores_covariate_codes():
    model = _model()
    x_t, t, x_ctrl, _, _, _, sc = _inputs(b=2, s=5)
    drop = torch.tensor([True, False])
    codes_a = (torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    codes_b = (torch.tensor([2, 2]), torch.tensor([1, 1]), torch.tensor([1, 1]))
    with torch.no_grad():
        out_a = model(x_t, t, x_ctrl, *codes_a, sc, drop)
        out_b = model(x_t, t, x_ctrl, *codes_b, sc, drop)
    torch.testing.assert_close(out_a[0], out_b[0], atol=1e-6, rtol=1e-6)
    assert (out_a[1] - out_b[1]).abs().max() > 1e-4


@pytest.mark.parametrize("which", [0, 1, 2])
def test_each_covariate_changes_the_output(which):
    model = _model()
    x_t, t, x_ctrl, _, _, _, sc = _inputs(b=1, s=5)
    codes = [torch.tensor([0]), torch.tensor([0]), torch.tensor([0])]
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, *codes, sc)
        codes[which] = torch.tensor([1])
        out2 = model(x_t, t, x_ctrl, *codes, sc)
    assert (out2 - out).abs().max() > 1e-4


def test_without_context_embedding_the_context_reaches_it_only_through_the_controls():
    model = _model(context_embedding=False)
    assert model.cov_embed.context is None
    x_t, t, x_ctrl, _, _, _, sc = _inputs(b=1, s=5)
    pert, batch = torch.tensor([1]), torch.tensor([0])
    with torch.no_grad():
        out = model(x_t, t, x_ctrl, pert, torch.tensor([0]), batch, sc)
        other_code = model(x_t, t, x_ctrl, pert, torch.tensor([1]), batch, sc)
        other_controls = model(x_t, t, x_ctrl + 1.0, pert, torch.tensor([0]), batch, sc)
    torch.testing.assert_close(out, other_code)
    assert (other_controls - out).abs().max() > 1e-4


def test_drop_none_equals_all_false():
    model = _model()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs()
    with torch.no_grad():
        a = model(x_t, t, x_ctrl, pert, ctx, batch, sc, None)
        b = model(x_t, t, x_ctrl, pert, ctx, batch, sc, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(a, b)


def test_timestep_changes_the_output():
    model = _model()
    x_t, _, x_ctrl, pert, ctx, batch, sc = _inputs(b=2)
    with torch.no_grad():
        a = model(x_t, torch.tensor([0, 0]), x_ctrl, pert, ctx, batch, sc)
        b = model(x_t, torch.tensor([900, 900]), x_ctrl, pert, ctx, batch, sc)
    assert (a - b).abs().max() > 1e-4


def test_heads_must_divide_joint_width():
    with pytest.raises(ValueError, match=r"2 \* n_hidden \(6\) must be divisible by n_heads \(4\)"):
        SetDiT(G, P, C, NB, n_hidden=3, depth=1, n_heads=4, n_cov=4)  # 2 * 3 = 6 not divisible by 4


def test_gradients_reach_all_trainable_inputs_after_perturbation():
    model = _model().train()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=2, s=4)
    model(x_t, t, x_ctrl, pert, ctx, batch, sc).sum().backward()
    assert model.x_embed.weight.grad.abs().sum() > 0
    assert model.ctrl_embed.weight.grad.abs().sum() > 0
    assert model.cov_embed.perturbation.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- layout without dead parameters
def _full_layout() -> SetDiT:
    """The layout of earlier versions: the last block also updates the (unused) control stream."""
    old = _model(randomise=False)
    last = old.blocks[-1]
    old.blocks[-1] = JointDiTBlock(last.n_hidden, last.attn.n_heads, update_control=True)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(7)))
    return old.eval()


def test_last_block_skips_the_control_update():
    model = _model()
    assert [b.update_control for b in model.blocks] == [True, False]
    g = _gen(5)
    h, hc, c = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        h2, hc2 = model.blocks[-1](h, hc, c)
    assert hc2 is None and h2.shape == h.shape


def test_deleting_the_dead_control_update_does_not_change_the_output():
    """In the earlier layout, the last block's control MLP, control gates and control half of the attention
    projection are dead: zeroing or scrambling them leaves the output bitwise unchanged."""
    old = _full_layout()
    x_t, t, x_ctrl, pert, ctx, batch, sc = _inputs(b=3, s=6)
    with torch.no_grad():
        before = old(x_t, t, x_ctrl, pert, ctx, batch, sc)
        last = old.blocks[-1]
        h = last.n_hidden
        for p in last.mlp_c.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(8)))
        last.ada_c.linear.weight[2 * h :] = 5.0
        last.ada_c.linear.bias[2 * h :] = -5.0
        last.attn.proj.weight[h:] = 3.0
        last.attn.proj.bias[h:] = 3.0
        after = old(x_t, t, x_ctrl, pert, ctx, batch, sc)
    assert torch.equal(before, after)
