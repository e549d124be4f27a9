"""Shared fixtures. scvi-tools is imported once per session (it costs ~10 s).

Which model fixture to use:

``shared_model`` (module scope)
    One tiny model (``TINY``, ``TINY_TRAIN``, seed 0) trained on a fresh ``make_perturbation_adata()`` set up with
    ``perturbation_key="pert"``, ``control_value="ctrl"``, ``context_key="ctx"``, ``batch_key="batch"``; built once
    per test module, inside :func:`_helpers.seeded`, so its weights are the same in every module and whatever ran
    before, and the global RNG states are left as they were. Its training data is ``shared_model.adata``.
    For tests that only READ the model: predict (with an explicit ``seed``), embed, inspect, save it elsewhere.
    A ``monkeypatch.setattr`` on it is fine (undone after the test). Do not train it further, load weights into it,
    change its registry, its settings or ``shared_model.adata``: the next tests of the module would see it.

``setup_adata`` / ``adata`` (function scope)
    The same data, set up (or not) for each test: a test that changes the model or its data builds its own model
    on them, e.g. ``train_tiny_model(setup_adata)`` from ``_helpers``.
"""

from __future__ import annotations

import pytest
from _helpers import make_perturbation_adata, train_tiny_model

KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}


@pytest.fixture(scope="session")
def scvi_module():
    import scvi

    scvi.settings.seed = 0
    return scvi


@pytest.fixture
def adata():
    return make_perturbation_adata()


@pytest.fixture
def setup_adata(scvi_module, adata):
    from perturbdiff_scvi import PerturbDiff

    PerturbDiff.setup_anndata(adata, **KEYS)
    return adata


@pytest.fixture(scope="module")
def shared_model(scvi_module):
    """A trained tiny model shared by the tests of a module that only read it (see the module docstring)."""
    import torch

    from perturbdiff_scvi import PerturbDiff

    data = make_perturbation_adata()
    PerturbDiff.setup_anndata(data, **KEYS)
    model = train_tiny_model(data, seed=0)
    weights = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    history = {k: v.copy() for k, v in model.history.items()}
    yield model
    # A test that changed the shared model makes the rest of its module check another model: say so.
    changed = [k for k, v in model.module.state_dict().items() if not torch.equal(v, weights[k])]
    assert not changed, f"a test changed the weights of shared_model: {changed[:5]}; build a model of its own"
    assert set(model.history) == set(history) and all(model.history[k].equals(v) for k, v in history.items()), (
        "a test trained shared_model further; build a model of its own"
    )
