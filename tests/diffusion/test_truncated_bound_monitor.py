"""The released truncated DDIM, the x0 cap and the per-step range monitor, at the level of the diffusion loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_scvi.diffusion import (
    RELEASED_START_TIME,
    GaussianDiffusion,
    RangeMonitor,
    guided_x0,
    reverse_timesteps,
    sample_loop,
    sample_loop_progressive,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x0(shape=(2, 4, 3)) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(123)) + 0.1


# ------------------------------------------------------------------------------------------ truncated DDIM
def test_truncated_visits_every_timestep_below_start_time():
    np.testing.assert_array_equal(reverse_timesteps("ddim_truncated", 1000, start_time=5), [4, 3, 2, 1, 0])
    released = reverse_timesteps("ddim_truncated", 1000)
    assert RELEASED_START_TIME == 100 and len(released) == 100 and released[0] == 99 and released[-1] == 0
    assert len(reverse_timesteps("ddim_truncated", 30)) == 30  # default capped at n_timesteps
    np.testing.assert_array_equal(reverse_timesteps("ddim_truncated", 10, n_steps=3, start_time=1), [0])
    np.testing.assert_array_equal(reverse_timesteps("ddim", 50, n_steps=5), [49, 37, 24, 12, 0])  # unchanged


@pytest.mark.parametrize("bad", [0, -1, 101, 2.5, "10", True, None])
def test_truncated_start_time_validation(bad):
    if bad is None:  # None is the released default, valid
        assert len(reverse_timesteps("ddim_truncated", 100, start_time=bad)) == 100
        return
    with pytest.raises(ValueError, match=r"start_time must be an integer between 1 and .* \(100\)"):
        reverse_timesteps("ddim_truncated", 100, start_time=bad)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_start_time_is_rejected_by_the_strided_samplers(sampler):
    with pytest.raises(ValueError, match="start_time only applies to sampler='ddim_truncated'"):
        sample_loop(lambda x, t, sc, d: x, GaussianDiffusion(10), (1, 2, 3), sampler=sampler, start_time=5)


def test_truncated_starts_from_pure_noise_and_steps_one_at_a_time():
    """As released (method.md section 5): x ~ N(0, I) at t = start_time - 1, then DDIM to t - 1 at every step."""
    diffusion = GaussianDiffusion(1000)
    x0 = _x0()
    seen: list[tuple[torch.Tensor, int]] = []

    def oracle(x_t, t, self_cond, drop):
        seen.append((x_t.clone(), int(t[0])))
        return x0

    out = sample_loop(
        oracle, diffusion, tuple(x0.shape), sampler="ddim_truncated", start_time=7, guidance_scale=0, generator=_gen(3)
    )
    torch.testing.assert_close(out, x0)
    assert [t for _, t in seen] == [6, 5, 4, 3, 2, 1, 0]
    assert torch.equal(seen[0][0], torch.randn(x0.shape, generator=_gen(3)))  # pure noise, not noised data
    for (x_t, t), (x_next, _) in zip(seen[:-1], seen[1:], strict=True):
        torch.testing.assert_close(x_next, diffusion.ddim_step(x_t, x0, t, t - 1))


def test_truncated_guidance_and_self_conditioning_as_the_other_samplers():
    calls = []

    def denoise(x_t, t, self_cond, drop):
        calls.append((int(t[0]), drop, self_cond.clone()))
        return (x_t * (0.3 if drop else 0.6)).abs() + 0.01

    diffusion = GaussianDiffusion(50)
    steps = list(
        sample_loop_progressive(
            denoise, diffusion, (2, 3, 4), sampler="ddim_truncated", start_time=4, guidance_scale=1.5, generator=_gen(1)
        )
    )
    assert [t for t, _ in steps] == [3, 2, 1, 0]
    assert [(t, d) for t, d, _ in calls] == [(t, d) for t in (3, 2, 1, 0) for d in (False, True)]
    assert torch.equal(calls[0][2], torch.zeros(2, 3, 4))
    for i in range(1, 4):  # both passes see the previous guided estimate
        assert torch.equal(calls[2 * i][2], steps[i - 1][1]) and torch.equal(calls[2 * i + 1][2], steps[i - 1][1])
    calls.clear()
    list(
        sample_loop_progressive(
            denoise, diffusion, (2, 3, 4), sampler="ddim_truncated", start_time=4, guidance_scale=0, generator=_gen(1)
        )
    )
    assert [d for _, d, _ in calls] == [False] * 4  # no unconditional pass without guidance


def test_truncated_is_seeded():
    diffusion = GaussianDiffusion(100)
    denoise = lambda x_t, t, sc, d: (0.5 * x_t + 0.1 * sc).clamp_min(0)
    kw = {"sampler": "ddim_truncated", "start_time": 20, "guidance_scale": 0}
    a, b, c = (sample_loop(denoise, diffusion, (2, 5, 3), generator=_gen(s), **kw) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------ x0 cap
def test_guided_x0_cap_per_gene_and_scalar():
    c = torch.tensor([[[5.0, 0.5, -1.0, 3.0]]])
    cap = torch.tensor([1.0, 1.0, 1.0, 10.0])
    torch.testing.assert_close(guided_x0(c, None, 0.0, x0_max=cap), torch.tensor([[[1.0, 0.5, 0.0, 3.0]]]))
    torch.testing.assert_close(guided_x0(c, None, 0.0, x0_max=2.0), torch.tensor([[[2.0, 0.5, 0.0, 2.0]]]))
    torch.testing.assert_close(guided_x0(c, None, 0.0), torch.tensor([[[5.0, 0.5, 0.0, 3.0]]]))  # default: no cap


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "ddim_truncated"])
def test_cap_holds_at_every_step_and_feeds_self_conditioning(sampler):
    cap = torch.tensor([0.5, 1.0, 2.0])
    seen_self_cond = []

    def wild(x_t, t, self_cond, drop):
        seen_self_cond.append(self_cond.clone())
        return 5 * x_t.abs() + 3.0  # always far above the cap

    kw = {"start_time": 6} if sampler == "ddim_truncated" else {"n_steps": 6}
    steps = list(
        sample_loop_progressive(
            wild,
            GaussianDiffusion(50),
            (2, 4, 3),
            sampler=sampler,
            guidance_scale=1.0,
            generator=_gen(0),
            x0_max=cap,
            **kw,
        )
    )
    for _, x0 in steps:
        assert (x0 >= 0).all() and (x0 <= cap).all()
        torch.testing.assert_close(x0, cap.expand_as(x0))  # the cap binds here
    assert all((s <= cap).all() for s in seen_self_cond)


# ------------------------------------------------------------------------------------------ RangeMonitor
def test_step_callback_sees_each_state_and_estimate():
    seen = []
    steps = list(
        sample_loop_progressive(
            lambda x, t, sc, d: x.abs(),
            GaussianDiffusion(20),
            (1, 2, 3),
            n_steps=4,
            guidance_scale=0,
            generator=_gen(2),
            step_callback=lambda t, x_t, x0: seen.append((t, x_t.clone(), x0)),
        )
    )
    assert [t for t, _, _ in seen] == [t for t, _ in steps] == [19, 13, 6, 0]
    assert torch.equal(seen[0][1], torch.randn(1, 2, 3, generator=_gen(2)))
    for (_, x_t, x0), (_, y0) in zip(seen, steps, strict=True):
        assert torch.equal(x0, y0) and torch.equal(x0, x_t.abs().where(x_t.abs() >= 1e-4, 0))


def test_range_monitor_counts_and_aggregates_over_calls():
    upper = torch.tensor([1.0, 2.0])
    monitor = RangeMonitor(upper)
    with pytest.raises(ValueError, match="recorded nothing"):
        monitor.table()
    monitor(5, torch.tensor([[[3.0, 1.0], [0.0, 2.5]]]), torch.tensor([[[0.5, 1.0], [1.5, 0.0]]]))
    monitor(0, torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[0.2, 9.0], [0.0, 0.0]]]))
    monitor(5, torch.tensor([[[-1.0, 7.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]))  # 2nd call
    table = monitor.table()
    assert list(table.columns) == ["t", "x_t_max", "x_t_share_above", "x0_max", "x0_share_above"]
    assert table["t"].tolist() == [5, 0]  # order visited, one row per timestep
    row5, row0 = table.iloc[0], table.iloc[1]
    assert row5.x_t_max == 7.0 and row5.x_t_share_above == pytest.approx(3 / 8)  # 3.0, 2.5 and 7.0
    assert row5.x0_max == 1.5 and row5.x0_share_above == pytest.approx(1 / 8)  # 1.5 > 1.0 (gene 0)
    assert row0.x0_max == 9.0 and row0.x0_share_above == pytest.approx(1 / 4) and row0.x_t_share_above == 0
