"""The main job's command line (a few steps only: the quality check is the end-to-end test) and the public API."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from importlib.metadata import version

import pytest


@pytest.mark.slow  # the whole quickstart on the bundled Kang data
def test_quickstart_cli_writes_outputs(scvi_module, tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import torch

    from perturbdiff_scvi.__main__ import main

    out = tmp_path / "qs"
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    args = ["quickstart", "--out", str(out), "--max-steps", "3", "--no-progress", "--accelerator", "cpu"]
    assert main([*args, "--transport", "quantile", "--guidance-scale", "0"]) == 0
    # The quickstart seeds the calls it makes, not the session: the global RNGs are as they were.
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    metrics = json.loads((out / "metrics.json").read_text())
    e_pred, e_ctrl = metrics["energy_distance_pred_vs_real"], metrics["energy_distance_control_vs_real"]
    assert math.isfinite(e_pred) and math.isfinite(e_ctrl) and e_pred >= 0 and e_ctrl > 0
    assert metrics["prediction_closer_than_control"] == (e_pred < e_ctrl)
    for key in ("pearson_delta_top100_de", "pearson_delta_all_genes"):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert metrics["max_steps"] == 3
    assert metrics["predict_kwargs"]["guidance_scale"] == 0.0
    assert metrics["predict_kwargs"]["output_options"]["transport"] == "quantile"
    realism = metrics["realism"]
    assert 0.3 < realism["c2st_auroc_ceiling"] < 0.7 and realism["c2st_auroc_control"] > 0.9  # stimulated vs control
    assert 0.0 <= realism["c2st_auroc"] <= 1.0 and realism["knn_mixing_ceiling"] > 0.8
    for png in ("umap_real_vs_predicted.png", "delta_scatter_top100_de.png", "loss_curve.png"):
        assert (out / png).stat().st_size > 10_000, png
    pred = ad.read_h5ad(out / "predicted_cd4t_stimulated.h5ad")
    assert pred.n_obs == metrics["n_cells"]["real_stimulated_cd4t"]
    assert set(pred.obs["cell_type"]) == {"CD4T"} and set(pred.obs["condition"]) == {"stimulated"}
    assert pred.uns["perturbdiff"]["transport"] == "quantile" and pred.uns["perturbdiff"]["guidance_scale"] == 0.0
    printed = capsys.readouterr().out
    assert f"prediction {e_pred:.3f} vs control cells {e_ctrl:.3f}" in printed  # the summary shows what was written


@pytest.mark.parametrize("sub", ["model", "module", "nn", "diffusion", "data", "metrics", "datasets", "pl"])
def test_public_names_import(scvi_module, sub):
    """Every name in ``__all__`` exists (so ``from ... import *`` works), once, and is the package's own object."""
    mod = importlib.import_module(f"perturbdiff_scvi.{sub}")
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, missing
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("perturbdiff_scvi."), (name, obj.__module__)


def test_top_level_api(scvi_module):
    import perturbdiff_scvi as pdiff
    from perturbdiff_scvi import model

    assert pdiff.PerturbDiff is model.PerturbDiff and pdiff.PAPER_CONFIG is model.PAPER_CONFIG  # lazy re-exports
    assert pdiff.__version__ == version("perturbdiff-scvi")
    # PAPER_CONFIG is a valid set of constructor options (PerturbDiff(adata, **PAPER_CONFIG)); see also
    # test_model.py::test_paper_config_builds for what the module gets from it.
    params = inspect.signature(pdiff.PerturbDiff.__init__).parameters
    unknown = set(pdiff.PAPER_CONFIG) - set(params)
    assert not unknown, unknown
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in pdiff.PAPER_CONFIG)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = pdiff.nope


def test_datasets_load_offline():
    import numpy as np

    from perturbdiff_scvi import datasets

    kang = datasets.kang2018()
    assert kang.shape == (1975, 6998)
    assert set(kang.obs["condition"]) == {"control", "stimulated"}
    assert kang.uns["provenance"]["source_repo"]
    donors = datasets.kang2018_donors()
    assert donors.shape == (1556, 1267) and set(donors.obs["donor"]) == {"101", "107"}
    assert donors.X.max() < 15 and float(donors.layers["counts"].max()) > 100  # log-normalised X, counts kept
    np.testing.assert_allclose(np.expm1(donors.X[:5].toarray()).sum(1), 1e4, rtol=1e-3)
    norman = datasets.norman2019()
    assert norman.shape == (5961, 500)
    assert {"norman19", "mcfaline23"} == set(norman.obs["dataset"])
    assert any("+" in p for p in norman.obs["perturbation"].unique())
