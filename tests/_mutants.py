"""A pytest plugin that breaks one thing in the package, to show that tests can fail (not collected: no ``test_``).

    MUTANT=sample_noise python -m pytest -q -p _mutants tests/model

``MUTANT`` names the break (see the branches below); unset, the plugin does nothing. Every test changed in 0.2.0
(the shared fixture, the option objects) was run under these mutants: each fails under at least one, or (five
read-only fixture swaps) asserts exactly what it did before on the per-test model.
"""

import os

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _mutant(monkeypatch):
    m = os.environ.get("MUTANT", "")
    if not m:
        yield
        return
    import torch

    from perturbdiff_scvi.model import _predict
    from perturbdiff_scvi.module import _module as mod

    if m == "sample_noise":  # the sampler adds unseeded noise: seeds, bias and offsets break
        real = mod.PerturbDiffModule.sample

        def noisy(self, *a, **k):
            out = real(self, *a, **k)
            return out + 0.3 * torch.rand(out.shape)

        monkeypatch.setattr(mod.PerturbDiffModule, "sample", noisy)
    elif m == "sample_ignores_condition":  # the sampler drops perturbation / controls
        real = mod.PerturbDiffModule.sample

        def blind(self, x_ctrl, pert, ctx, batch, **k):
            return real(self, torch.zeros_like(x_ctrl), torch.zeros_like(pert), ctx, batch, **k)

        monkeypatch.setattr(mod.PerturbDiffModule, "sample", blind)
    elif m == "no_bias_correction":
        monkeypatch.setattr(_predict, "subtract_control_bias", lambda jobs, conditions, cells, regen, source: cells)
    elif m == "no_transport":
        monkeypatch.setattr(
            _predict, "transported", lambda jobs, c, cells, s, rng: (cells, [j.control_rows for j in jobs])
        )
    elif m == "no_zero_threshold":
        monkeypatch.setattr(_predict, "zero_threshold_value", lambda value, auto: None)
    elif m == "x0_bound_ignored":  # the cap is recorded but not applied while sampling
        real_jobs = _predict.sample_jobs
        monkeypatch.setattr(_predict, "sample_jobs", lambda *a: real_jobs(*a[:-1], None))
    elif m == "output_scaled":  # every prediction 10 % too high
        real = _predict.predict

        def scaled(*a, **k):
            out = real(*a, **k)
            out.X = np.asarray(out.X) * 1.1
            return out

        monkeypatch.setattr(_predict, "predict", scaled)
    elif m == "options_ignored":  # the option objects never reach the module: defaults everywhere
        from perturbdiff_scvi.model import _model

        monkeypatch.setattr(
            _model, "split_deprecated", lambda flat, groups, **k: {n: c() for n, (c, _) in groups.items()}
        )
    elif m == "embedding_swap":  # use_ema picks the other network
        from perturbdiff_scvi.model import _embeddings

        monkeypatch.setattr(_embeddings, "network", lambda module, use_ema: module.denoiser if use_ema else module.ema)
    elif m == "validation_off":  # counts and names are not checked
        monkeypatch.setattr(_predict, "positive_int", lambda value, *a, **k: value)
        monkeypatch.setattr(_predict, "optional_positive_int", lambda value, *a, **k: value)
        from perturbdiff_scvi.model import _embeddings

        for where in (_predict, _embeddings):
            if hasattr(where, "find_category"):
                monkeypatch.setattr(where, "find_category", lambda mapping, value, *a, **k: 0)
    elif m == "io_checks_off":
        from perturbdiff_scvi.model import _io

        real_save = _io.atomic_save
        monkeypatch.setattr(
            _io, "atomic_save", lambda write, path, *, overwrite: real_save(write, path, overwrite=True)
        )
        monkeypatch.setattr(_io, "check_same_genes", lambda adata, genes: None)
    else:
        raise ValueError(m)
    yield
