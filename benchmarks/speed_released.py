"""One training step of the released PerturbDiff (``Cross_DiT``) against one of perturbdiff-scvi, same sizes.

What is compared
----------------
* **released**: the official code of Yuan et al. 2026 (github.com/DeepGraphLearning/PerturbDiff, arXiv
  2602.19685), run as its training entry point runs it: its Lightning module ``PlModel``
  (``src/models/lightning/lightning_module.py``) under a ``pytorch_lightning.Trainer`` with the settings of its
  ``configs/trainer/base.yaml`` (``gradient_clip_val=1.0``, ``precision=32-true``, ``deterministic=True``) and
  its EMA callback (``EMAWeightAveraging``, ``lightning.ema.decay=0.99``, ``update_steps=10`` as in the README's
  paper runs). One step is therefore the released code end to end: covariate encoder (``CovEncoder``),
  ``GaussianDiffusion.training_losses`` (float64 noise, the self-conditioning pass with probability 1/2, the
  condition dropout with ``p_drop_cond=0.5``, ``Cross_DiT`` forward on the noised set and its matched control
  set), the loss of ``_compute_loss`` (per-set MSE + ``MMD_loss_factor`` (1.0) x geomloss ``energy``, plus the
  second, detached energy evaluation it logs), backward, the per-parameter gradient-norm logging of
  ``on_before_optimizer_step``, clipping, AdamW (``configs/optimization/optimizer/adam.yaml``: torch's default
  implementation, betas (0.9, 0.98), eps 1e-8, weight decay 0.01 on the non-bias, non-LayerNorm parameters)
  and, every 10th step, the ``AveragedModel`` EMA update of the whole module.
* **ours**: a real ``PerturbDiff.train`` step with ``PAPER_CONFIG`` (``benchmarks/speed.py``'s
  ``time_training``, imported, not copied): forward, backward, clipping, fused AdamW and the EMA update
  (every 10 steps in ``PAPER_CONFIG``).

Both are timed the same way: a callback from ``on_train_batch_start`` to ``on_train_batch_end`` of each step
(data loading excluded; the LR-scheduler step, which Lightning runs after ``on_train_batch_end``, excluded on
both sides), the first ``--warmup`` steps dropped. The step time of both sides is a mixture (the
self-conditioning coin; on the released side also the whole-batch condition-dropout coin, which skips its per-cell
adaLN), so each step's coin state is recorded and a round reports the *expected* s/step, sum over states of
P(state) x the median of that state's steps (the plain mean where a state was not drawn; use ``--steps`` >= 16 so
that the released side's four states are all drawn). Each side runs in a fresh process with ``--threads`` torch
threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set too), the two interleaved over ``--rounds`` rounds (order
swapped every round), so both see the same machine load. The speed-up is released / ours of the expectations'
medians over rounds. In the first round each side also counts its FLOPs per step and state
(``torch.utils.flop_counter``; ``--no-flops`` skips it).

Inputs are synthetic: ``speed.synthetic_adata`` (sparse log1p expression, 4 perturbations + control, 2
contexts). Ours trains on it as an AnnData; the released side gets sets of ``--set-size`` cells drawn from the
same matrix, each with ``--set-size`` control cells of the same context, covariates per cell (perturbation,
context as the cell-type covariate, one batch), divided by 10 (``data.normalize_counts=10``) as its
collate function does.

Matched settings (the released configuration is read from the released ``configs/*.yaml`` and the README's
PBMC from-scratch overrides; the sizes are then set to those of our model, read from the model ours trained):
genes 2000 (``model.hidden_num[0]``), set size 256 (``data.use_cell_set``), sets per step
(``optimization.micro_batch_size = sets * set size``), hidden 512 (``hidden_num[1]``), depth 8
(``dit_depth``), heads 8 (``dit_num_heads``), MLP ratio 4 (``Cross_DiT`` default), covariate branch width 128
(``cov_encoding.hidden_dim``), covariate projection to the gene count (``cov_encoding.output_dim``), one-hot
perturbation and batch branches, 1000 linear-schedule steps predicting x0, input scale 10, condition dropout
0.5, self-conditioning 0.5, loss MSE + 1.0 x energy, AdamW betas/eps/weight decay, clipping at norm 1.0, EMA
decay 0.99 every 10 steps, float32.

Not matched (and why):

* the released cell-type covariate of the paper runs is ``celltype_encoding=llm``, a frozen table of language-model
  embeddings loaded from a pickle that is not released with the code; the timed run uses its ``onehot`` branch
  (a trainable lookup instead of a frozen lookup + one Linear to 128 per cell; small next to the denoiser);
* architecture, not configuration: the released model conditions every cell token (the covariates arrive per cell,
  ``(B, S)``, so the adaLN modulations run on ``B * S`` tokens), feeds the control stream ``[control ; zeros]``
  (``2G`` inputs), updates the control stream in the last block and computes a control output head, all
  unused by the loss; ours conditions per set and skips the unused parts. These are what the comparison measures;
* implementation, also measured: the released AdamW is torch's default (a per-tensor loop on CPU), ours the fused
  kernel; the released EMA is ``AveragedModel`` (per tensor, buffers included), ours one multi-tensor update;
  the released trainer runs with ``deterministic=True`` and logs per-parameter gradient norms every step;
* sets per step: the paper runs used ``micro_batch_size=2048`` cells, 8 sets of 256 per device; the default
  here, 2, is that of ``speed.py``'s one-thread grid (``--sets-per-step 8`` for the paper's);
* peak LR (released 2e-4, ours 1e-3) and the schedule's length: they change no cost;
* ``--config small`` (smoke tests) takes our small-data defaults (input scale 1, condition dropout 0.2, EMA
  every step) while the released side keeps its paper options: only ``paper`` is a like-for-like comparison;
* the released trainer's progress bar (TQDM, refresh 10), ``LearningRateMonitor``, checkpoint callback and W&B
  logger are left out (ours runs without progress bar and logger too).

Stubs
-----
The released modules import packages that this environment may lack; where an import fails, a minimal module
with just the names the code uses is put into ``sys.modules`` (the result records which were stubbed):

* ``timm`` (``timm.layers.create_norm.get_norm_layer``, ``timm.models.vision_transformer.Attention``, ``Mlp``;
  timm needs torchvision): transcriptions of the code paths the released block uses in timm (commit aa4b5850 of
  huggingface/pytorch-image-models): fused ``scaled_dot_product_attention``, RMSNorm q/k-norm (timm's own
  ``rms_norm``, ``eps=1e-6``, as timm uses without ``fast_norm``), ``fc1 -> GELU(tanh) -> fc2``;
* ``geomloss`` (``SamplesLoss``): the ``loss="energy"``, ``backend="tensorized"`` path of geomloss 0.2.6 (the one
  ``backend="auto"`` takes for sets up to 5000 x 5000 points), with its ``double_grad`` trick;
* ``hydra`` (``hydra.utils.call``, for the LR scheduler's ``_target_``) and ``transformers``
  (``trainer_pt_utils.get_parameter_names``, HF's function);
* the configuration objects (OmegaConf ``DictConfig``) are attribute-access dicts;
* ``src.common.utils`` is built from the released file's own function definitions without its module-level
  plotting imports (seaborn, matplotlib fonts, scanpy, sklearn), and the aggregating ``src/common/__init__.py``
  and ``src/models/__init__.py`` are skipped (they import every module of the release, sampling included).

Examples
--------
Make the released tree from a mirror (no download; any checkout of the repository works too)::

    MIRROR=/work/.mirror/DeepGraphLearning+PerturbDiff/repo
    mkdir -p /tmp/perturbdiff_released && git -C $MIRROR archive HEAD | tar -x -C /tmp/perturbdiff_released

then::

    .venv/bin/python benchmarks/speed_released.py --released /tmp/perturbdiff_released \\
        --released-commit $(git -C $MIRROR rev-parse --short HEAD)                                 # paper sizes
    .venv/bin/python benchmarks/speed_released.py --released /tmp/perturbdiff_released \\
        --config small --genes 100 --set-size 16 --steps 2 --warmup 1 --rounds 1 --out /tmp/smoke   # smoke test
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
import speed  # noqa: E402  (benchmarks/speed.py: time_training, synthetic_adata, machine, _sync)

ROOT = BENCHMARKS.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "speed" / "released_paper"
#: The released dataset name used for ``ds_name`` (``get_short_dsname`` maps it to "pbmc").
RELEASED_DATASET = "Parse_10M_PBMC_cytokines_processed_Xselected"
#: Released files whose code or configuration the timed step uses (fingerprinted in the result).
RELEASED_FILES = (
    "src/common/utils.py",
    "src/models/covariate_encoding.py",
    "src/models/cross_dit/cross_dit_blocks.py",
    "src/models/cross_dit/cross_dit_component.py",
    "src/models/cross_dit/cross_dit_init.py",
    "src/models/cross_dit/cross_dit_main.py",
    "src/models/diffusion/diffusion_core.py",
    "src/models/diffusion/diffusion_sampling.py",
    "src/models/diffusion/diffusion_schedules.py",
    "src/models/diffusion/diffusion_training.py",
    "src/models/lightning/lightning_factories.py",
    "src/models/lightning/lightning_module.py",
    "src/models/resampling.py",
    "src/models/weight_averaging_callback.py",
    "configs/model/base.yaml",
    "configs/optimization/base.yaml",
    "configs/optimization/optimizer/adam.yaml",
    "configs/optimization/scheduler/cosine.yaml",
    "configs/trainer/base.yaml",
    "configs/lightning/base.yaml",
    "configs/cov_encoding/trixie_onehot.yaml",
)
#: README overrides of the paper's from-scratch PBMC run (COMMON_TRAIN_RUNTIME, COMMON_MODEL_2000,
#: COMMON_SCRATCH_DATA, COMMON_PBMC_TRAIN) that bear on a training step.
PAPER_OVERRIDES = {
    "data.normalize_counts": 10,
    "data.use_cell_set": 256,
    "optimization.micro_batch_size": 2048,
    "optimization.optimizer.lr": 2e-4,
    "trainer.max_steps": 200000,
    "lightning.ema.decay": 0.99,
    "lightning.ema.update_steps": 10,
    "cov_encoding.batch_encoding": "onehot",
    "cov_encoding.celltype_encoding": "llm",
    "model.p_drop_control": 0,
    "model.hidden_num": [2000, 512],
    "model.input_dim": 2000,
}


# ----------------------------------------------------------------------------------------- configuration objects
class Cfg(dict):
    """Attribute-access dict standing in for the OmegaConf ``DictConfig`` objects the released code reads."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    @classmethod
    def of(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return cls({k: cls.of(v) for k, v in value.items()})
        return value


def _yaml(root: Path, rel: str) -> dict:
    import yaml

    data = yaml.safe_load((root / rel).read_text())
    data.pop("defaults", None)
    return data


def _set(cfgs: dict, dotted: str, value: Any) -> None:
    node = cfgs
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def released_configs(root: Path, sizes: dict, sets_per_step: int, accelerator: str) -> tuple[dict[str, Cfg], dict]:
    """The released configuration: its yaml files, the README's paper overrides, then this run's overrides.

    Returns the configuration groups and the overrides of this run (sizes of our model, synthetic categories).
    """
    cfgs = {
        "model": _yaml(root, "configs/model/base.yaml"),
        "optimization": _yaml(root, "configs/optimization/base.yaml"),
        "trainer": _yaml(root, "configs/trainer/base.yaml"),
        "lightning": _yaml(root, "configs/lightning/base.yaml"),
        "cov_encoding": _yaml(root, "configs/cov_encoding/trixie_onehot.yaml"),
        "data": {},
    }
    cfgs["optimization"]["optimizer"] = _yaml(root, "configs/optimization/optimizer/adam.yaml")
    cfgs["optimization"]["scheduler"] = _yaml(root, "configs/optimization/scheduler/cosine.yaml")
    for dotted, value in PAPER_OVERRIDES.items():
        _set(cfgs, dotted, value)
    g, s = sizes["n_genes"], sizes["set_size"]
    run = {
        "model.hidden_num": [g, sizes["n_hidden"]],
        "model.input_dim": g,
        "model.dit_depth": sizes["depth"],
        "model.dit_num_heads": sizes["n_heads"],
        "model.dataset_dict": {RELEASED_DATASET: 0},
        "data.use_cell_set": s,
        "optimization.micro_batch_size": sets_per_step * s,
        "cov_encoding.celltype_encoding": "onehot",  # the paper's "llm" table is not released (see the docstring)
        "cov_encoding.hidden_dim": sizes["n_cov"],
        "cov_encoding.output_dim": g,
        "cov_encoding.num_pert": 5,  # control + 4 perturbations, as speed.synthetic_adata
        "cov_encoding.num_celltype": 2,
        "cov_encoding.num_batch": 1,
        "optimization.scheduler.optimizer": None,  # filled by hydra.utils.call
        "optimization.scheduler.num_training_steps": PAPER_OVERRIDES["trainer.max_steps"],
        "trainer.accelerator": accelerator,
        "trainer.devices": 1,
    }
    for dotted, value in run.items():
        _set(cfgs, dotted, value)
    return {k: Cfg.of(v) for k, v in cfgs.items()}, run


def settings_table(ours: dict, released: dict) -> list[dict]:
    """Setting-by-setting comparison: ``ours`` from the model ours trained, ``released`` from the released run.

    ``same`` is "yes", "no", or a short reason where the settings cannot be the same.
    """
    yes_no = {True: "yes", False: "no"}
    rows = [
        (k, ours[a], released[b], None)
        for k, a, b in (
            ("genes", "n_genes", "n_genes"),
            ("cells per set", "set_size", "set_size"),
            ("sets per step", "sets_per_batch", "sets_per_step"),
            ("hidden size", "n_hidden", "n_hidden"),
            ("depth (blocks)", "depth", "depth"),
            ("attention heads (width 2 x hidden)", "n_heads", "n_heads"),
            ("MLP ratio", "mlp_ratio", "mlp_ratio"),
            ("covariate branch width", "n_cov", "n_cov"),
            ("covariate projection width", "n_cov_hidden", "n_cov_hidden"),
        )
    ]
    loss_same = ours["mse_weight"] == 1 and ours["energy_weight"] == released["mmd_factor"]
    adamw = "AdamW (0.9, 0.98), eps 1e-8, weight decay 0.01"
    rows += [
        (
            "covariate branches",
            "perturbation, context, batch (one-hot)",
            "perturbation, cell type, batch (one-hot)",
            "yes (paper: cell type 'llm', table not released)",
        ),
        ("conditioning of the adaLN", "per set", "per cell (covariates (B, S))", "no (architecture)"),
        ("control-stream input", "control (G)", "[control ; zeros] (2G)", "no (architecture)"),
        (
            "unused outputs computed",
            "none",
            "last block's control update, control output head",
            "no (architecture)",
        ),
        ("diffusion steps / schedule", f"{ours['n_timesteps']} linear", f"{released['n_timesteps']} linear", None),
        ("input scale", ours["input_scale"], released["input_scale"], None),
        ("condition dropout", ours["p_drop_cond"], released["p_drop_cond"], None),
        ("self-conditioning probability", ours["p_self_cond"], 0.5, None),
        (
            "loss per set",
            f"{ours['mse_weight']} x MSE + {ours['energy_weight']} x energy",
            f"1 x MSE + {released['mmd_factor']} x energy, + a detached energy for logging",
            yes_no[loss_same] + " (weights)",
        ),
        ("optimizer", f"{adamw}, fused", f"{adamw}, torch default (for-loop on CPU)", "hyperparameters yes, kernel no"),
        ("gradient clipping (norm)", 1.0, released["gradient_clip_val"], None),
        ("EMA decay", ours["ema_decay"], released["ema_decay"], None),
        ("EMA every (steps)", ours["ema_every"], released["ema_every"], None),
        ("EMA implementation", "one multi-tensor update", "AveragedModel, per tensor, with buffers", "no (kernel)"),
        ("precision", ours["precision"], released["precision"], None),
        (
            "parameters (trainable)",
            ours["n_parameters"],
            f"{released['n_parameters']} (incl. {released['n_parameters_gene_embedding']} of the unused "
            "gene-embedding layer)",
            "no (architecture)",
        ),
    ]
    return [
        {"setting": k, "ours": a, "released": b, "same": same if same is not None else yes_no[a == b]}
        for k, a, b, same in rows
    ]


# ----------------------------------------------------------------------------------------- stubs
def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def _importable(name: str) -> str | None:
    """The installed version of ``name`` if it imports, else ``None``."""
    try:
        importlib.import_module(name)
    except ImportError:
        return None
    top = name.split(".")[0]
    try:
        return version({"hydra": "hydra-core"}.get(top, top))
    except PackageNotFoundError:
        return "installed"


def _stub_timm() -> None:
    """timm's ``Attention`` (fused SDPA path), ``Mlp`` and ``get_norm_layer("rmsnorm")``, as the block uses them."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def rms_norm(x: torch.Tensor, normalized_shape: tuple, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        dims = tuple(range(-1, -len(normalized_shape) - 1, -1))
        x = x * torch.rsqrt(torch.mean(x.pow(2), dim=dims, keepdim=True) + eps)
        return x * weight if weight is not None else x

    class RmsNorm(nn.Module):
        def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True):
            super().__init__()
            self.normalized_shape = (channels,)
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if affine else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    class Attention(nn.Module):
        def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            norm_layer: type | None = None,
        ):
            super().__init__()
            self.num_heads = num_heads
            self.head_dim = dim // num_heads
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
            self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
            self.attn_drop = nn.Dropout(attn_drop)
            self.norm = nn.Identity()
            self.proj = nn.Linear(dim, dim, bias=proj_bias)
            self.proj_drop = nn.Dropout(proj_drop)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c))))

    class Mlp(nn.Module):
        def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: Any = nn.GELU,
            bias: bool = True,
            drop: float = 0.0,
        ):
            super().__init__()
            hidden_features = hidden_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    def get_norm_layer(norm_layer: str) -> type:
        if norm_layer.replace("_", "").lower() != "rmsnorm":
            raise NotImplementedError(f"timm stub: only 'rmsnorm' (asked {norm_layer!r})")
        return RmsNorm

    _module("timm")
    _module("timm.layers", RmsNorm=RmsNorm, Attention=Attention, Mlp=Mlp)
    _module("timm.layers.create_norm", get_norm_layer=get_norm_layer)
    _module("timm.models")
    _module("timm.models.vision_transformer", Attention=Attention, Mlp=Mlp)


def _stub_geomloss() -> None:
    """geomloss 0.2.6 ``SamplesLoss(loss="energy")``, tensorized backend (``kernel_loss`` with ``energy_kernel``)."""
    import torch
    from torch import nn

    class DoubleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x

        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
            return 2 * grad_output

    def distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d_xx = (x * x).sum(-1).unsqueeze(2)  # (B, N, 1)
        d_xy = torch.matmul(x, y.permute(0, 2, 1))  # (B, N, M)
        d_yy = (y * y).sum(-1).unsqueeze(1)  # (B, 1, M)
        return torch.sqrt(torch.clamp_min(d_xx - 2 * d_xy + d_yy, 1e-8))

    def scal(a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return (a.reshape(a.shape[0], -1) * f.reshape(a.shape[0], -1)).sum(1)

    class SamplesLoss(nn.Module):
        def __init__(self, loss: str = "sinkhorn", blur: float = 0.05, backend: str = "auto", **kwargs: Any):
            super().__init__()
            if loss != "energy" or backend not in ("auto", "tensorized"):
                raise NotImplementedError("geomloss stub: only loss='energy' with the tensorized backend")
            self.loss, self.blur = loss, blur

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            batched = x.dim() == 3
            if not batched:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            (b, n, _), m = x.shape, y.shape[1]
            if n * m > 5000**2:
                raise NotImplementedError("geomloss stub: the 'online' backend (KeOps) is not transcribed")
            alpha = torch.ones(b, n).type_as(x) / n
            beta = torch.ones(b, m).type_as(y) / m
            k_xx = -distances(DoubleGrad.apply(x), x.detach())
            k_yy = -distances(DoubleGrad.apply(y), y.detach())
            k_xy = -distances(x, y)
            a_x = (k_xx @ alpha.detach().unsqueeze(-1)).squeeze(-1)
            b_y = (k_yy @ beta.detach().unsqueeze(-1)).squeeze(-1)
            b_x = (k_xy @ beta.unsqueeze(-1)).squeeze(-1)
            values = (
                0.5 * scal(DoubleGrad.apply(alpha), a_x) + 0.5 * scal(DoubleGrad.apply(beta), b_y) - scal(alpha, b_x)
            )
            return values if batched else values[0]

    _module("geomloss", SamplesLoss=SamplesLoss)


def _stub_hydra() -> None:
    def call(config: dict, **kwargs: Any) -> Any:
        target = config["_target_"]
        module, _, attr = target.rpartition(".")
        fn = getattr(importlib.import_module(module), attr)
        return fn(**{**{k: v for k, v in config.items() if k != "_target_"}, **kwargs})

    _module("hydra")
    _module("hydra.utils", call=call)


def _stub_transformers() -> None:
    def get_parameter_names(model: Any, forbidden_layer_types: list) -> list[str]:
        result = []
        for name, child in model.named_children():
            result += [
                f"{name}.{n}"
                for n in get_parameter_names(child, forbidden_layer_types)
                if not isinstance(child, tuple(forbidden_layer_types))
            ]
        result += list(model._parameters.keys())
        return result

    _module("transformers")
    _module("transformers.trainer_pt_utils", get_parameter_names=get_parameter_names)


def install_released_imports(root: Path) -> dict[str, str]:
    """Make ``import src....`` load the released tree at ``root``; stub what does not import. Returns what was used."""
    import torch

    sys.path.insert(0, str(root))
    import src

    if Path(src.__file__).resolve().parent != (root / "src").resolve():
        raise RuntimeError(f"'src' resolved to {src.__file__}, not the released tree {root / 'src'}")
    used = {}
    for name, probe, stub in (
        ("timm", "timm.models.vision_transformer", _stub_timm),
        ("geomloss", "geomloss", _stub_geomloss),
        ("hydra", "hydra.utils", _stub_hydra),
        ("transformers", "transformers.trainer_pt_utils", _stub_transformers),
    ):
        found = _importable(probe)
        if found is None:
            stub()
        used[name] = found or "stub"
    # src.common.utils: the released function definitions, without the module's plotting imports.
    _module("src.common").__path__ = [str(root / "src" / "common")]
    path = root / "src" / "common" / "utils.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    utils = _module("src.common.utils", __file__=str(path), logging=logging, math=math, os=os, sys=sys, np=np, th=torch)
    exec(
        compile(
            ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef)], type_ignores=[]),
            str(path),
            "exec",
        ),
        utils.__dict__,
    )
    used["src.common.utils"] = "released functions, plotting imports skipped"
    _module("src.models").__path__ = [str(root / "src" / "models")]  # skip the aggregating __init__
    return used


def released_fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    for rel in RELEASED_FILES:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- coin states
# A step's cost depends on coins drawn inside it: the self-conditioning pass (both sides) and, released only, the
# whole-batch condition dropout (a dropped batch skips the per-cell adaLN). The step times are therefore a mixture;
# the median of a few steps lands on whichever mode was drawn more often. Each step's state is recorded (a forward
# pre-hook on the denoiser) and the expected step time is sum_state P(state) x median(times of that state).


def _state_timer(timer: Any, net_of: Any, state_of: Any) -> Any:
    """``timer`` (a step-timer callback) that also records, per step, the denoiser calls' ``state_of(kwargs)``."""

    class StateTimer(type(timer)):
        def __init__(self):
            super().__init__()
            self.states: list[tuple] = []
            self._calls: list = []

        def on_train_start(self, trainer, pl_module):
            net_of(pl_module).register_forward_pre_hook(
                lambda _m, _args, kwargs: self._calls.append(state_of(kwargs)), with_kwargs=True
            )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._calls.clear()
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.states.append(tuple(self._calls))

    return StateTimer()


def _released_cond_dropped(kwargs: dict) -> bool:
    """The released whole-batch condition dropout of a ``Cross_DiT`` call (its covariates set to ``None``)."""
    return kwargs["self_condition"].get("batch_emb") is None


def _expected(per_state: dict[str, float], probs: dict[str, float]) -> float:
    """``sum_state P(state) x per_state[state]``."""
    return sum(p * per_state[s] for s, p in probs.items())


def _state_name(calls: tuple) -> str:
    """``"self-cond on"`` / ``"self-cond off"``, with ``", cond dropped"`` / ``", cond kept"`` on the released side."""
    name = "self-cond " + ("on" if len(calls) > 1 else "off")
    if calls and calls[0] is not None:
        name += ", cond dropped" if calls[0] else ", cond kept"
    return name


def state_probabilities(p_self_cond: float, p_drop_cond: float | None) -> dict[str, float]:
    """P(state) of one step; ``p_drop_cond=None`` for our side (a per-set dropout costs the same either way)."""
    sc = {"self-cond on": p_self_cond, "self-cond off": 1 - p_self_cond}
    if p_drop_cond is None:
        return {k: v for k, v in sc.items() if v > 0}
    out = {
        f"{k}, cond {d}": v * (p_drop_cond if d == "dropped" else 1 - p_drop_cond)
        for k, v in sc.items()
        for d in ("dropped", "kept")
    }
    return {k: v for k, v in out.items() if v > 0}


def expected_step(times: list[float], states: list[str], probs: dict[str, float]) -> float | None:
    """``sum_state P(state) x median(times of state)``; ``None`` when a state of positive probability was not drawn."""
    by_state: dict[str, list[float]] = {}
    for t, s in zip(times, states, strict=True):
        by_state.setdefault(s, []).append(t)
    if any(s not in by_state for s in probs):
        return None
    return _expected({s: statistics.median(ts) for s, ts in by_state.items()}, probs)


def sgemm_gflops(m: int = 512, k: int = 1024, n: int = 3072, repeats: int = 20) -> float:
    """The float32 matmul rate of this process (the largest GEMM shape of a paper-config step), GFLOP/s."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def released_flops(pl_model: Any, batches: list, probs: dict[str, float], max_tries: int = 64) -> dict:
    """FLOPs (matmuls and attention, ``torch.utils.flop_counter``) of one released step in each coin state."""
    from torch.utils.flop_counter import FlopCounterMode

    class _NoModules:  # the released gene-embedding output breaks FlopCounterMode's module tracker
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return None

    calls: list = []
    hook = pl_model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(_released_cond_dropped(kwargs)), with_kwargs=True
    )
    per_state: dict[str, float] = {}
    try:
        for i in range(max_tries):
            calls.clear()
            counter = FlopCounterMode(display=False)
            counter.mod_tracker = _NoModules()
            with counter:
                d = pl_model._compute_loss(dict(batches[i % len(batches)]))
                (d["loss"] * d["weights"]).mean().backward()
            pl_model.zero_grad(set_to_none=True)
            per_state.setdefault(_state_name(tuple(calls)), counter.get_total_flops())
            if all(s in per_state for s in probs):
                break
    finally:
        hook.remove()
    missing = [s for s in probs if s not in per_state]
    if missing:
        raise RuntimeError(f"released FLOP count: states {missing} not drawn in {max_tries} steps")
    return {"per_state": per_state, "expected": _expected(per_state, probs)}


def ours_flops(model: Any, sets_per_batch: int) -> dict:
    """FLOPs of one of our steps per self-conditioning state (``speed.training_flops`` with the coin fixed)."""
    module = model.module
    p = module.p_self_cond
    per_state = {}
    try:
        for name, coin in (("self-cond off", 0.0), ("self-cond on", 1.0)):
            module.p_self_cond = coin
            per_state[name] = speed.training_flops(model, sets_per_batch)
    finally:
        module.p_self_cond = p
    return {"per_state": per_state, "expected": _expected(per_state, state_probabilities(p, None))}


# ----------------------------------------------------------------------------------------- released side
def released_batches(cfg: dict[str, Cfg], sizes: dict, sets_per_step: int, n_batches: int, seed: int = 0) -> list:
    """Batches as the released collate function returns them: per-cell covariates ``(B, S)``, counts / 10."""
    import torch

    g, s = sizes["n_genes"], sizes["set_size"]
    adata = speed.synthetic_adata(g, seed=seed)
    x = np.asarray(adata.X.todense(), dtype=np.float32) / cfg["data"].normalize_counts
    perts = adata.obs["perturbation"].to_numpy()
    contexts = adata.obs["context"].to_numpy()
    pert_codes = {p: i for i, p in enumerate(["control", "p1", "p2", "p3", "p4"])}
    ctx_codes = {c: i for i, c in enumerate(["c1", "c2"])}
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        target, control, pert, ctx = [], [], [], []
        for _ in range(sets_per_step):
            p, c = rng.choice(["p1", "p2", "p3", "p4"]), rng.choice(["c1", "c2"])
            cells = np.flatnonzero((perts == p) & (contexts == c))
            ctrl = np.flatnonzero((perts == "control") & (contexts == c))
            target.append(x[rng.choice(cells, s, replace=len(cells) < s)])
            control.append(x[rng.choice(ctrl, s, replace=len(ctrl) < s)])
            pert.append(pert_codes[p])
            ctx.append(ctx_codes[c])
        batches.append(
            {
                "pert_emb": torch.from_numpy(np.stack(target)),
                "cont_emb": torch.from_numpy(np.stack(control)),
                "cov_pert": torch.tensor(pert).repeat_interleave(s).reshape(-1, s),
                "cov_celltype": torch.tensor(ctx).repeat_interleave(s).reshape(-1, s),
                "cov_batch": torch.zeros(sets_per_step, s, dtype=torch.long),
                "ds_name": [RELEASED_DATASET] * sets_per_step,
            }
        )
    return batches


def _pl_timer():
    """``speed.make_timer`` for a ``pytorch_lightning`` trainer (the released code uses that package)."""
    from pytorch_lightning.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            speed._sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            speed._sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def time_released(spec: dict) -> dict:
    """Median s/step of the released ``PlModel`` under ``pytorch_lightning.Trainer`` (see the module docstring)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    root = Path(spec["released"]).resolve()
    imports = install_released_imports(root)
    import pytorch_lightning as pl
    from src.models.lightning.lightning_factories import EMAWeightAveraging
    from src.models.lightning.lightning_module import PlModel

    sizes, sets, steps, warmup = spec["sizes"], spec["sets_per_step"], spec["steps"], spec["warmup"]
    cfg, run_overrides = released_configs(root, sizes, sets, spec["accelerator"])
    pl_model = PlModel(cfg["cov_encoding"], cfg["model"], None, cfg["optimization"], cfg["trainer"], all_split_names=[])
    batches = released_batches(cfg, sizes, sets, n_batches=min(4, steps + warmup))

    # The released denoiser's output for a (batch, set, genes) input, the way training_losses calls it.
    b0 = batches[0]
    with torch.no_grad():
        cond = {
            "batch_emb": pl_model.cov_encoder(b0["cov_pert"], b0["cov_celltype"], b0["cov_batch"]),
            "gene_emb": None,
            "ds_name": b0["ds_name"],
        }
        zeros = torch.zeros_like(b0["pert_emb"])
        t = torch.zeros(sets, dtype=torch.long)
        out = pl_model.model(
            torch.cat([b0["pert_emb"], zeros], -1),
            torch.cat([b0["cont_emb"], zeros], -1),
            t.unsqueeze(1),
            self_condition=cond,
        )
    expected = (sets, sizes["set_size"], sizes["n_genes"])
    if tuple(out["x"].shape) != expected:
        raise RuntimeError(f"released Cross_DiT output {tuple(out['x'].shape)}, expected {expected}")

    class Batches(Dataset):
        def __len__(self) -> int:
            return steps + warmup

        def __getitem__(self, i: int) -> dict:
            return dict(batches[i % len(batches)])

    timer = _state_timer(_pl_timer(), lambda m: m.model, _released_cond_dropped)
    ema = cfg["lightning"].ema
    tr = cfg["trainer"]
    ema_callback = EMAWeightAveraging(decay=ema.decay, update_steps=ema.update_steps)
    trainer = pl.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        max_steps=steps + warmup,
        max_epochs=1,
        precision=tr.precision,
        gradient_clip_val=tr.gradient_clip_val,
        accumulate_grad_batches=tr.accumulate_grad_batches,
        deterministic=tr.deterministic,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[ema_callback, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(pl_model, train_dataloaders=DataLoader(Batches(), batch_size=None, num_workers=0))
    wall = time.perf_counter() - start
    params = [p for m in (pl_model.model, pl_model.cov_encoder) for p in m.parameters() if p.requires_grad]
    probs = state_probabilities(0.5, cfg["model"].p_drop_cond)  # released: ``th.rand(1) > 0.5`` self-cond coin
    return {
        **_stats(timer.times, warmup, [_state_name(c) for c in timer.states], probs),
        "flops": released_flops(pl_model, batches, probs) if spec.get("count_flops") else None,
        "wall_s_per_step_incl_data": wall / max(1, len(timer.times)),
        "output_shape": list(out["x"].shape),
        "last_loss": float(trainer.callback_metrics["training_loss_step"]),
        "ema_last_update_step": ema_callback._latest_update_step,
        "imports": imports,
        "fingerprint": released_fingerprint(root),
        "overrides": {"paper (README)": PAPER_OVERRIDES, "this run": run_overrides},
        "settings": {
            **{k: sizes[k] for k in ("n_genes", "set_size")},
            "sets_per_step": cfg["optimization"].micro_batch_size // sizes["set_size"],
            "n_hidden": pl_model.model.hidden_size,
            "depth": len(pl_model.model.blocks),
            "n_heads": pl_model.model.num_heads,
            "mlp_ratio": pl_model.model.blocks[0].block.mlp.fc1.out_features / pl_model.model.hidden_size,
            "n_cov": cfg["cov_encoding"].hidden_dim,
            "n_cov_hidden": pl_model.cov_encoder.transform.out_features,
            "n_timesteps": pl_model.diffusion.num_timesteps,
            "input_scale": cfg["data"].normalize_counts,
            "p_drop_cond": cfg["model"].p_drop_cond,
            "p_drop_control": cfg["model"].p_drop_control,
            "mmd_factor": cfg["optimization"].MMD_loss_factor,
            "gradient_clip_val": tr.gradient_clip_val,
            "ema_decay": ema.decay,
            "ema_every": ema.update_steps,
            "precision": str(tr.precision),
            "n_parameters": sum(p.numel() for p in params),
            "n_parameters_gene_embedding": sum(p.numel() for p in pl_model.model.gene_embedding.parameters()),
        },
    }


# ----------------------------------------------------------------------------------------- our side
def time_ours(spec: dict) -> dict:
    """``speed.time_training`` (a real ``model.train``), with the per-step times and the sizes ours used."""
    timers = []
    make_timer = speed.make_timer

    def capturing_timer():
        timers.append(_state_timer(make_timer(), lambda m: m.module.denoiser, lambda kw: None))
        return timers[-1]

    speed.make_timer = capturing_timer  # same timer, kept so that the per-step times come back
    try:
        row = speed.time_training(
            spec["config"],
            spec["sizes"]["set_size"],
            spec["sizes"]["n_genes"],
            steps=spec["steps"],
            warmup=spec["warmup"],
            sets_per_batch=spec["sets_per_step"],
            accelerator=spec["accelerator"],
            precision=spec.get("precision"),
        )
    finally:
        speed.make_timer = make_timer
    model = row.pop("_model")
    module = model.module
    den = module.denoiser
    probs = state_probabilities(module.p_self_cond, None)
    n_hidden = den.x_embed.out_features
    import perturbdiff_scvi

    return {
        **_stats(timers[0].times, spec["warmup"], [_state_name(c) for c in timers[0].states], probs),
        "flops": ours_flops(model, spec["sets_per_step"]) if spec.get("count_flops") else None,
        "sgemm_gflops": sgemm_gflops() if spec.get("count_flops") else None,
        "wall_s_per_step_incl_data": row["wall_s_per_step_incl_data"],
        "package_path": str(Path(perturbdiff_scvi.__file__).parent),
        "settings": {
            "n_genes": module.n_genes,
            "set_size": module.set_size,
            "sets_per_batch": row["sets_per_batch"],
            "n_hidden": n_hidden,
            "depth": len(den.blocks),
            "n_heads": den.blocks[0].attn.n_heads,
            "mlp_ratio": den.blocks[0].mlp[0].out_features / n_hidden,
            "n_cov": den.cov_embed.batch.embedding_dim,
            "n_cov_hidden": den.cov_embed.project.out_features,
            "n_timesteps": module.diffusion.n_timesteps,
            "input_scale": module.input_scale,
            "p_drop_cond": module.p_drop_cond,
            "p_self_cond": module.p_self_cond,
            "mse_weight": module.mse_weight,
            "energy_weight": module.energy_weight,
            "ema_decay": module.ema_decay,
            "ema_every": module.ema_every,
            "n_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "precision": spec.get("precision") or "32-true",
        },
    }


# ----------------------------------------------------------------------------------------- processes
def _stats(times: list[float], warmup: int, states: list[str], probs: dict[str, float]) -> dict:
    measured, states = (times[warmup:], states[warmup:]) if len(times) > warmup else (times, states)
    return {
        "steps_timed": len(measured),
        "s_per_step_expected": expected_step(measured, states, probs),
        "s_per_step": statistics.median(measured),
        "s_per_step_mean": statistics.fmean(measured),
        "s_per_step_iqr": float(np.subtract(*np.percentile(measured, [75, 25]))),
        "step_times": measured,
        "step_states": states,
        "state_probabilities": probs,
    }


def _worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    row = time_released(spec) if spec["side"] == "released" else time_ours(spec)
    print("SPEED_RESULT " + json.dumps(row), flush=True)


def run_side(side: str, spec: dict) -> dict:
    """One fresh process timing ``side`` ("ours" or "released")."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps({**spec, "side": side})],
        env=env,
        capture_output=True,
        text=True,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SPEED_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{side} worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line.removeprefix("SPEED_RESULT "))


def compare(args: argparse.Namespace) -> dict:
    """Interleaved fresh-process timings of both sides; ours runs first so the released run copies its sizes."""
    spec = {
        "released": str(Path(args.released).resolve()),
        "config": args.config,
        "sizes": {"n_genes": args.genes, "set_size": args.set_size},
        "sets_per_step": args.sets_per_step,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "accelerator": args.accelerator,
        "precision": args.ours_precision,
    }
    rows: dict[str, list[dict]] = {"ours": [], "released": []}
    for r in range(args.rounds):
        for side in ("ours", "released") if r % 2 == 0 else ("released", "ours"):
            if side == "released":
                spec["sizes"] = {
                    k: rows["ours"][0]["settings"][k]
                    for k in ("n_genes", "set_size", "n_hidden", "depth", "n_heads", "n_cov")
                }
            row = run_side(side, {**spec, "count_flops": r == 0 and args.flops})
            rows[side].append(row)
            expected = row["s_per_step_expected"]
            print(
                f"  round {r + 1} {side}: expected {expected if expected is None else round(expected, 4)} s/step, "
                f"median {row['s_per_step']:.4f}, mean {row['s_per_step_mean']:.4f} (of {row['steps_timed']})",
                flush=True,
            )
    # The expectation over the coin states; the plain mean where a state was not drawn in a round.
    per_round = {k: [x["s_per_step_expected"] or x["s_per_step_mean"] for x in v] for k, v in rows.items()}
    med = {k: statistics.median(v) for k, v in per_round.items()}
    step_medians = {k: [x["s_per_step"] for x in v] for k, v in rows.items()}  # the old statistic, per round
    ours, released = rows["ours"][0], rows["released"][0]
    flops = {k: v[0]["flops"] for k, v in rows.items()} if args.flops else None
    return {
        "spec": {k: v for k, v in spec.items() if k != "sizes"},
        "rounds": args.rounds,
        "s_per_step_expected": per_round,
        "rounds_without_every_state": {k: sum(x["s_per_step_expected"] is None for x in v) for k, v in rows.items()},
        "s_per_step": step_medians,
        "s_per_step_mean": {k: [x["s_per_step_mean"] for x in v] for k, v in rows.items()},
        "median_s_per_step": med,
        "speedup_ours_vs_released": med["released"] / med["ours"],
        "speedup_per_round": [a / b for a, b in zip(per_round["released"], per_round["ours"], strict=True)],
        "speedup_of_medians": statistics.median(step_medians["released"]) / statistics.median(step_medians["ours"]),
        "flops": flops,
        "flop_ratio": flops["released"]["expected"] / flops["ours"]["expected"] if flops else None,
        "sgemm_gflops": ours["sgemm_gflops"],
        "cells_per_s": {k: args.sets_per_step * args.set_size / v for k, v in med.items()},
        "settings": settings_table(ours["settings"], released["settings"]),
        "released": {k: released[k] for k in ("imports", "fingerprint", "output_shape", "overrides")},
        "ours_package_path": ours["package_path"],
        "runs": rows,
    }


# ----------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    m, c = report["machine"], report["compare"]
    rel = c["released"]
    lines = [
        "# Training step: released PerturbDiff (`Cross_DiT`) vs perturbdiff-scvi",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['platform']}, Python {m['python']}, {m['cpu_count']} CPUs, torch threads "
        f"{c['spec']['threads']} per process, GPU {m['gpu'] or 'none'}; versions {m['versions']}; git "
        f"{m['git_revision']}{' (dirty)' if m['git_dirty'] else ''}.",
        "",
        f"Released code: `{c['spec']['released']}` (commit {report['released_commit'] or 'not given'}; fingerprint "
        f"of the used files {rel['fingerprint']}); imports: "
        + ", ".join(f"{k}: {v}" for k, v in rel["imports"].items())
        + f". Released `Cross_DiT` output shape {tuple(rel['output_shape'])} = (sets, cells, genes).",
        "",
        "One step = forward, loss, backward, clipping, AdamW, EMA update when due, timed from "
        "`on_train_batch_start` to `on_train_batch_end` (data loading excluded), "
        f"{c['spec']['steps']} steps after {c['spec']['warmup']} warm-up steps, each side in a fresh process, "
        f"interleaved over {c['rounds']} rounds. A step's cost depends on coins drawn in it (the self-conditioning "
        "pass; released only, the whole-batch condition dropout, which skips the per-cell adaLN), so each step's "
        "state is recorded and the **expected** s/step is sum over states of P(state) x median(steps in that state): "
        "the cost per step of a long training. The median of all steps (reported before 2026-12-07) lands on "
        "whichever mode was drawn more often.",
        "",
        "## Configuration",
        "",
        "| setting | ours | released | same |",
        "|---|---|---|---|",
    ]
    for row in c["settings"]:
        lines.append(f"| {row['setting']} | {row['ours']} | {row['released']} | {row['same']} |")
    lines += [
        "",
        "## Seconds per step",
        "",
        "| side | expected s/step per round | median s/step per round | mean s/step per round | expected (median of "
        "rounds) | cells/s |",
        "|---|---|---|---|---|---|",
    ]
    for side in ("released", "ours"):
        lines.append(
            f"| {side} | {', '.join(f'{x:.4f}' for x in c['s_per_step_expected'][side])} | "
            f"{', '.join(f'{x:.4f}' for x in c['s_per_step'][side])} | "
            f"{', '.join(f'{x:.4f}' for x in c['s_per_step_mean'][side])} | {c['median_s_per_step'][side]:.4f} | "
            f"{c['cells_per_s'][side]:.0f} |"
        )
    missing = c["rounds_without_every_state"]
    lines += [
        "",
        f"Speed-up of ours over the released code (expected released / expected ours): "
        f"**{c['speedup_ours_vs_released']:.2f}x** (per round: "
        + ", ".join(f"{x:.2f}x" for x in c["speedup_per_round"])
        + f"; the ratio of the medians of all steps, the old statistic, would read {c['speedup_of_medians']:.2f}x)."
        + (f" Rounds where a state was not drawn (their plain mean used): {missing}." if any(missing.values()) else ""),
        "",
    ]
    if c["flops"]:
        f = c["flops"]
        lines += [
            "## FLOPs per step",
            "",
            "Matmul and attention FLOPs of one step (forward and backward, `torch.utils.flop_counter`), per coin state "
            "and expected; the rate is expected FLOPs / expected s/step.",
            "",
            "| side | GFLOP per state | expected GFLOP | GFLOP/s |",
            "|---|---|---|---|",
        ]
        for side in ("released", "ours"):
            per = ", ".join(f"{k}: {v / 1e9:.1f}" for k, v in f[side]["per_state"].items())
            rate = f[side]["expected"] / c["median_s_per_step"][side] / 1e9
            lines.append(f"| {side} | {per} | {f[side]['expected'] / 1e9:.1f} | {rate:.1f} |")
        lines += [
            "",
            f"FLOP ratio released / ours: **{c['flop_ratio']:.2f}x**. This process's float32 matmul rate "
            f"(512 x 1024 x 3072, the largest GEMM of a step): {c['sgemm_gflops']:.1f} GFLOP/s. A side whose rate is "
            "near it spends its step in matmuls; an exact float32 speed-up beyond the FLOP ratio can only come "
            "from the other side's overhead.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--released", help="folder with an extracted copy of DeepGraphLearning/PerturbDiff")
    parser.add_argument("--released-commit", default=None, help="commit of that copy, recorded in the result")
    parser.add_argument("--config", default="paper", choices=("paper", "small"), help="our preset (small: smoke)")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--set-size", type=int, default=256, help="cells per set (S)")
    parser.add_argument("--sets-per-step", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per process (>= 16: every coin state)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--ours-precision", default=None, help="our precision, e.g. bf16-mixed (default float32, as released)"
    )
    parser.add_argument(
        "--no-flops", dest="flops", action="store_false", help="skip the FLOP count of each side (first round)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for speed.md and speed.json")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return None
    if not args.released:
        parser.error("--released PATH is required (see the module docstring to make it from a mirror).")
    missing = [f for f in RELEASED_FILES if not (Path(args.released) / f).is_file()]
    if missing:
        parser.error(f"{args.released} is not an extracted PerturbDiff tree (missing {missing[:3]}).")

    import torch

    torch.set_num_threads(args.threads)
    report: dict = {
        "command": " ".join([".venv/bin/python benchmarks/speed_released.py", *(argv or sys.argv[1:])]),
        "machine": speed.machine(),
        "released_commit": args.released_commit,
    }
    report["machine"]["versions"]["pytorch-lightning"] = version("pytorch-lightning")
    report["compare"] = compare(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "speed.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
