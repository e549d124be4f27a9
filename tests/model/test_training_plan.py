"""DiffusionTrainingPlan in real (tiny) training runs: the LR schedule, weight-decay groups, gradient clipping and
EMA updates once per optimiser step (also with gradient accumulation and ``ema_every``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from _helpers import tiny

from perturbdiff_scvi.model._training_plan import warmup_plateau_cosine

QUIET = {"enable_progress_bar": False, "accelerator": "cpu", "validation_size": 0.0}


def _grads(optimizer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


class _Recorder(pl.Callback):
    """Per optimiser step: the LR the optimiser uses, the gradients before clipping (``on_before_optimizer_step``
    runs before Lightning clips) and the gradients the optimiser applied (its step post-hook), the live weights
    after the step; plus the denoiser weights at the start and the optimiser itself."""

    def __init__(self):
        self.steps, self.lrs, self.pre, self.post, self.live = [], [], [], [], []
        self.optimizer = self.total = self.start = None

    def on_train_start(self, trainer, pl_module):
        self.optimizer = trainer.optimizers[0]
        self.total = trainer.estimated_stepping_batches
        self.start = [p.detach().clone() for p in pl_module.module.denoiser.parameters()]
        denoiser = pl_module.module.denoiser

        def after_step(optimizer, args, kwargs):
            self.post.append(_grads(optimizer))
            self.live.append([p.detach().clone() for p in denoiser.parameters()])

        self.optimizer.register_step_post_hook(after_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(trainer.global_step)
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.pre.append(_grads(optimizer))


def _train(adata, model_kwargs=None, callbacks_extra=(), sets_per_batch=2, **train_kwargs):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(adata, **tiny(**(model_kwargs or {})))
    rec = _Recorder()
    model.train(sets_per_batch=sets_per_batch, callbacks=[rec, *callbacks_extra], **{**QUIET, **train_kwargs})
    return model, rec


@pytest.fixture(scope="module")
def run(scvi_module):
    """One 20-step run with a visible warm-up (2 steps), plateau (5 steps) and cosine decay (13 steps)."""
    from _helpers import make_perturbation_adata

    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=120)
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", context_key="ctx")
    plan = {"warmup_steps": 50, "plateau": 0.25, "lr_floor": 0.2, "weight_decay": 0.05}
    model, rec = _train(adata, max_steps=20, sets_per_batch=1, lr=2e-3, plan_kwargs=plan)
    return model, rec


@pytest.fixture
def small_adata(scvi_module):
    from _helpers import make_perturbation_adata

    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=120)
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")
    return adata


# --------------------------------------------------------------------------------------------------- LR schedule
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # linear warm-up over 10 steps: (step + 1) / 10
        (4, 0.5),
        (9, 1.0),
        (10, 1.0),  # plateau: 10 <= step < 10 + 0.2 * 100
        (29, 1.0),
        (30, 1.0),  # cosine starts at the peak ...
        (65, 0.2 + 0.8 * 0.5),  # ... is half-way at (30 + 100) / 2 ...
        (44, 0.2 + 0.8 * 0.5 * (1 + math.cos(0.2 * math.pi))),  # progress (44 - 30) / 70 = 0.2
        (100, 0.2),  # ... and ends on the floor
        (250, 0.2),  # and stays there
    ],
)
def test_warmup_plateau_cosine_values(step, expected):
    assert warmup_plateau_cosine(step, total=100, warmup=10, plateau=0.2, floor=0.2) == pytest.approx(expected)


def test_warmup_plateau_cosine_shape():
    values = [warmup_plateau_cosine(s, total=100, warmup=10, plateau=0.2, floor=0.1) for s in range(100)]
    assert all(b > a for a, b in zip(values[:9], values[1:10], strict=True))  # rising warm-up
    assert all(b < a for a, b in zip(values[30:-1], values[31:], strict=True))  # strictly decaying cosine
    assert min(values) >= 0.1 and max(values) == 1.0
    # A plateau reaching past the run keeps the peak after the warm-up.
    assert warmup_plateau_cosine(50, total=20, warmup=5, plateau=1.0, floor=0.1) == 1.0


def test_optimizer_lr_follows_the_schedule_in_a_real_run(run):
    _, rec = run
    assert rec.steps == list(range(20))
    assert rec.total == 20
    warmup = 2  # warmup_steps=50 is capped at a tenth of the 20-step run
    expected = [2e-3 * warmup_plateau_cosine(s, 20, warmup, 0.25, 0.2) for s in rec.steps]
    for lrs, lr in zip(rec.lrs, expected, strict=True):
        assert lrs == [pytest.approx(lr, rel=1e-9)] * 2  # both parameter groups
    seen = [lrs[0] / 2e-3 for lrs in rec.lrs]
    assert seen[:2] == [pytest.approx(0.5), pytest.approx(1.0)]  # warm-up
    assert seen[2:7] == [pytest.approx(1.0)] * 5  # plateau of int(0.25 * 20) steps
    assert all(b < a for a, b in zip(seen[7:-1], seen[8:], strict=True)) and seen[-1] > 0.2  # cosine to the floor


# --------------------------------------------------------------------------------------------------- weight decay
def test_weight_decay_groups(run):
    model, rec = run
    decay_group, no_decay_group = rec.optimizer.param_groups
    assert isinstance(rec.optimizer, torch.optim.AdamW)
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.module.named_parameters()}
    decay = {names[id(p)] for p in decay_group["params"]}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay  # each trainable parameter exactly once
    assert not any(n.startswith("ema.") for n in decay | no_decay)  # the EMA copy is not optimised
    params = dict(model.module.named_parameters())
    assert decay == {n for n in trainable if params[n].ndim >= 2}
    # biases, the RMSNorm q/k-norm weights and the null embeddings get no decay ...
    for name in ("denoiser.x_embed.bias", "denoiser.null_gene_embedding", "denoiser.cov_embed.null"):
        assert name in no_decay, name
    assert any(n.endswith("attn.q_norm.weight") for n in no_decay)
    # ... weight matrices do; so do the covariate nn.Embedding tables (2-D), whatever the docstring says
    for name in ("denoiser.x_embed.weight", "denoiser.final.linear.weight", "denoiser.cov_embed.perturbation.weight"):
        assert name in decay, name


def test_cpu_training_uses_the_fused_adamw(run):
    _, rec = run
    assert rec.optimizer.defaults["fused"] is True


def test_fused_adamw_update_matches_the_per_tensor_loop():
    from perturbdiff_scvi.model._training_plan import adamw_implementation

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    results = []
    for kwargs in ({"foreach": False}, adamw_implementation(start)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01, **kwargs)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    assert adamw_implementation(start) == {"fused": True}
    for loop, fused, before in zip(*results, start, strict=True):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
        assert (loop - before).abs().min() > 1e-4  # four steps of lr 1e-2 moved every entry
    assert adamw_implementation([torch.zeros(2, dtype=torch.int64)]) == {}  # not a float: torch's own choice
    assert adamw_implementation(start, "bf16-mixed") == {}  # Lightning's AMP clipping refuses a fused optimiser
    assert adamw_implementation(start, "32-true") == {"fused": True}


# --------------------------------------------------------------------------------------------------- clipping
def test_default_gradient_clipping_to_norm_one(run):
    _, rec = run
    pre_norms = [_norm(g) for g in rec.pre]
    assert sum(n > 1.0 for n in pre_norms) >= 5, pre_norms  # the check is not vacuous on this data
    for pre, post, norm in zip(rec.pre, rec.post, pre_norms, strict=True):
        scale = min(1.0, 1.0 / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_(max_norm=1.0)
        for a, b in zip(pre, post, strict=True):
            torch.testing.assert_close(b, a * scale)
        assert _norm(post) <= 1.0 + 1e-5


def test_gradient_clipping_can_be_changed(small_adata):
    _, rec = _train(small_adata, max_steps=2, gradient_clip_val=0.05)
    for pre, post in zip(rec.pre, rec.post, strict=True):
        assert _norm(pre) > 0.05
        assert _norm(post) == pytest.approx(0.05, rel=1e-4)


# --------------------------------------------------------------------------------------------------- EMA
def _replay_ema(rec: _Recorder, decay_cap: float, ema_every: int) -> list[torch.Tensor]:
    """The EMA after the recorded optimiser steps: one update per step (every ``ema_every``-th), warm-up decay."""
    ema = [p.clone() for p in rec.start]
    for n, live in enumerate(rec.live, start=1):
        if n % ema_every:
            continue
        decay = min(decay_cap, (1 + n / ema_every) / (10 + n / ema_every))
        for e, p in zip(ema, live, strict=True):
            e.lerp_(p, 1 - decay)
    return ema


@pytest.mark.parametrize("ema_every", [1, 2])
def test_ema_follows_each_optimizer_step(small_adata, ema_every):
    model, rec = _train(small_adata, max_steps=4, model_kwargs={"ema_every": ema_every, "ema_decay": 0.5})
    assert len(rec.live) == 4 == int(model.module.ema_updates)
    for got, want in zip(model.module.ema.parameters(), _replay_ema(rec, 0.5, ema_every), strict=True):
        torch.testing.assert_close(got, want)
    moved = [not torch.equal(a, b) for a, b in zip(rec.start, model.module.ema.parameters(), strict=True)]
    assert any(moved)


@pytest.mark.parametrize("ema_every", [1, 2])
def test_ema_updates_once_per_optimizer_step_with_gradient_accumulation(small_adata, ema_every):
    batches = []
    counter = pl.Callback()
    counter.on_train_batch_end = lambda trainer, *args: batches.append(trainer.global_step)
    model, rec = _train(
        small_adata,
        max_steps=3,
        accumulate_grad_batches=2,
        model_kwargs={"ema_every": ema_every, "ema_decay": 0.5},
        callbacks_extra=[counter],
    )
    assert len(batches) == 6 and len(rec.live) == 3  # 2 batches per optimiser step
    assert int(model.module.ema_updates) == 3
    for got, want in zip(model.module.ema.parameters(), _replay_ema(rec, 0.5, ema_every), strict=True):
        torch.testing.assert_close(got, want)


def test_max_steps_are_optimizer_steps_with_gradient_accumulation(small_adata):
    # 17 sets of 8 cells, 6 per batch: 3 batches per epoch, i.e. 1 optimiser step per epoch with accumulation 3.
    # Counting batches as steps, train() would ask for ceil(2 / 3) = 1 epoch and stop after 1 step.
    _, rec = _train(small_adata, max_steps=2, sets_per_batch=6, accumulate_grad_batches=3)
    assert len(rec.live) == 2
