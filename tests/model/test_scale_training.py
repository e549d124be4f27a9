"""Training at scale, on CPU: bf16 mixed precision, torch.compile of the denoiser, multi-process DDP."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TIMESTEPS, TINY_TRAIN


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


# ------------------------------------------------------------------------------------------------ torch.compile
def _no_cxx_compiler() -> str | None:
    """Why inductor (torch.compile's default backend) cannot build CPU kernels here, or None if it can."""
    import os
    import shutil

    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in candidates):
        return f"torch.compile (inductor) needs a C++ compiler to build CPU kernels; none of {candidates} found"
    return None


def test_compile_context_replaces_and_restores_only_the_denoiser_forward():
    from perturbdiff_scvi.model import _train
    from perturbdiff_scvi.module import PerturbDiffModule

    module = PerturbDiffModule(6, 3, 2, 2, set_size=4, n_hidden=16, depth=1, n_heads=2, n_cov=8, n_timesteps=20)
    keys = list(module.state_dict())
    with pytest.raises(KeyError, match="boom"), _train.compiled_denoiser(module, True, {"backend": "eager"}):
        assert "forward" in vars(module.denoiser) and "forward" not in vars(module.ema)
        assert list(module.state_dict()) == keys
        raise KeyError("boom")
    assert "forward" not in vars(module.denoiser)  # restored after the error
    with _train.compiled_denoiser(module, False, None):
        assert "forward" not in vars(module.denoiser)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"compile": 1}, "compile must be True or False"), ({"compile_kwargs": {"mode": "default"}}, "compile=False")],
)
def test_compile_arguments_checked(setup_adata, kwargs, match):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    with pytest.raises(ValueError, match=match):
        model.train(**TINY_TRAIN, **kwargs)


@pytest.mark.slow  # inductor builds C++ kernels
def test_train_compile_matches_eager_and_saves_eager_names(setup_adata, tmp_path):
    """``train(compile=True)`` (inductor) trains with finite losses; the compiled denoiser gives the eager outputs
    (allclose) on the training shapes; the forward is eager again afterwards and the saved keys are the eager ones."""
    reason = _no_cxx_compiler()
    if reason:
        pytest.skip(reason)
    from perturbdiff_scvi import PerturbDiff
    from perturbdiff_scvi.model import _train

    model = PerturbDiff(setup_adata, **TINY)
    eager_keys = list(model.module.state_dict())
    model.train(**{**TINY_TRAIN, "max_steps": 3}, compile=True)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert "forward" not in vars(model.module.denoiser)
    assert list(model.module.state_dict()) == eager_keys

    module = model.module.train()
    g = torch.Generator().manual_seed(0)
    b, s, n_genes = TINY_TRAIN["sets_per_batch"], TINY["set_size"], setup_adata.n_vars
    x_t, x_ctrl, self_cond = (torch.rand(b, s, n_genes, generator=g) for _ in range(3))
    t = torch.randint(0, TINY_TIMESTEPS, (b,), generator=g)
    codes = torch.zeros(b, dtype=torch.long)
    drop = torch.tensor([True, False, False, True])
    args = (x_t, t, x_ctrl, codes, codes + 1, codes, self_cond, drop)
    eager = module.denoiser(*args)
    eager_grad = torch.autograd.grad(eager.sum(), module.denoiser.x_embed.weight)[0]
    with _train.compiled_denoiser(module, True, None):
        compiled = module.denoiser(*args)
        compiled_grad = torch.autograd.grad(compiled.sum(), module.denoiser.x_embed.weight)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)

    model.save(tmp_path / "m", overwrite=True)
    saved = torch.load(tmp_path / "m" / "model.pt", map_location="cpu", weights_only=False)["model_state_dict"]
    assert [k for k in saved if k != "pyro_param_store"] == eager_keys
    loaded = PerturbDiff.load(tmp_path / "m", adata=setup_adata)
    assert np.isfinite(loaded.predict_population("A", contexts="c0", n_cells=5, seed=0, n_steps=3).X).all()


def test_compiled_forward_pickles_without_the_compiled_code():
    """``ddp_spawn`` pickles the model to start its processes: the compiled forward travels as (module, options) and
    each copy compiles its own (here with the ``eager`` backend: no C++ compiler needed)."""
    import pickle

    from perturbdiff_scvi.model import _train
    from perturbdiff_scvi.module import PerturbDiffModule

    torch.manual_seed(0)
    module = PerturbDiffModule(6, 3, 2, 2, set_size=4, n_hidden=16, depth=2, n_heads=2, n_cov=8, n_timesteps=20)
    g = torch.Generator().manual_seed(1)
    x, ctrl = torch.rand(2, 4, 6, generator=g), torch.rand(2, 4, 6, generator=g)
    args = (x, torch.tensor([1, 7]), ctrl, torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0, 1]))
    eager = module.denoiser(*args)
    with _train.compiled_denoiser(module, True, {"backend": "eager"}):
        compiled = module.denoiser(*args)
        assert module.denoiser.forward._compiled is not None
        copy = pickle.loads(pickle.dumps(module))
    forward = vars(copy.denoiser)["forward"]
    assert isinstance(forward, _train.CompiledForward) and forward._compiled is None and forward.module is copy.denoiser
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(copy.denoiser(*args), eager)
    assert list(copy.state_dict()) == list(module.state_dict())


def test_use_distributed_sampler_rejected(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    with pytest.raises(ValueError, match="shards the sets over processes itself"):
        model.train(**TINY_TRAIN, use_distributed_sampler=True)


# ------------------------------------------------------------------------------------------ DDP, 2 CPU processes
@pytest.mark.slow  # spawns two processes that import scvi-tools
def test_ddp_spawn_two_cpu_processes(setup_adata, tmp_path):
    """``train(devices=2, strategy="ddp_spawn", accelerator="cpu")`` through scvi-tools' TrainRunner (gloo): the
    ranks serve disjoint shards of the same epoch, draw different random streams, run ``max_steps`` optimiser steps
    in total with finite losses, and the model (rank 0's weights, equal on all ranks) saves, loads and predicts."""
    import copy
    import json

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    from _ddp_helpers import SetRecorder

    from perturbdiff_scvi import PerturbDiff
    from perturbdiff_scvi.data import SetDataSplitter

    model = PerturbDiff(setup_adata, **TINY)
    steps, sets_per_batch = 4, 2
    recorder = SetRecorder(tmp_path, setup_adata.X.toarray(), TINY["set_size"])
    model.train(
        max_steps=steps, sets_per_batch=sets_per_batch, accelerator="cpu", devices=2, strategy="ddp_spawn",
        enable_progress_bar=False, callbacks=[recorder], log_save_dir=str(tmp_path),  # DDP history goes to disk
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["sets"]) for r in ranks] == [steps, steps]  # max_steps = optimiser steps in total, on each rank
    served = [[tuple(s) for batch in r["sets"] for s in batch] for r in ranks]
    assert not set(served[0]) & set(served[1]), "the ranks saw a common set"
    assert ranks[0]["rng"] != ranks[1]["rng"], "both ranks draw the same timesteps and noise"

    # Exactly the shards of the single-process sampler's first epoch (same seed).
    splitter = SetDataSplitter(model.adata_manager, model.registry_view.control_code, set_size=TINY["set_size"],
                               sets_per_batch=sets_per_batch)  # fmt: skip
    sampler = splitter.train_dataloader().sampler
    for r in (0, 1):
        shard = copy.copy(sampler)
        shard.num_replicas, shard.rank = 2, r
        expected = [
            [b.tolist() for b in np.asarray(rows).reshape(-1, 2, TINY["set_size"])[:, 0]]
            for rows in list(shard)[:steps]
        ]
        assert ranks[r]["sets"] == expected

    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert model.module.ema_updates.item() == steps and model.is_trained
    pred = model.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3)
    model.save(tmp_path / "ddp_model", overwrite=True)
    loaded = PerturbDiff.load(tmp_path / "ddp_model", adata=setup_adata)
    np.testing.assert_array_equal(loaded.predict_population("A", contexts="c0", n_cells=9, seed=3, n_steps=3).X, pred.X)
