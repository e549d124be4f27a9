"""Shared fixtures. scvi-tools is imported once per session (it costs ~10 s)."""

from __future__ import annotations

import pytest
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata


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

    PerturbDiff.setup_anndata(
        adata, perturbation_key="pert", control_value="ctrl", context_key="ctx", batch_key="batch"
    )
    return adata


@pytest.fixture
def trained_model(setup_adata):
    from perturbdiff_scvi import PerturbDiff

    model = PerturbDiff(setup_adata, **TINY)
    model.train(**TINY_TRAIN)
    return model
