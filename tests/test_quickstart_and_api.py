"""The main job's command line (a few steps only: the quality check is the end-to-end test) and the public API."""

from __future__ import annotations

import importlib
import json

import pytest


def test_quickstart_cli_writes_outputs(scvi_module, tmp_path, capsys):
    import anndata as ad

    from perturbdiff_scvi.__main__ import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--max-steps", "3", "--no-progress", "--accelerator", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("energy_distance_pred_vs_real", "energy_distance_control_vs_real", "pearson_delta_top100_de"):
        assert isinstance(metrics[key], float)
    assert metrics["max_steps"] == 3
    assert (out / "umap_real_vs_predicted.png").stat().st_size > 10_000
    pred = ad.read_h5ad(out / "predicted_cd4t_stimulated.h5ad")
    assert pred.n_obs == metrics["n_cells"]["real_stimulated_cd4t"]
    assert set(pred.obs["cell_type"]) == {"CD4T"} and set(pred.obs["condition"]) == {"stimulated"}
    assert "energy distance" in capsys.readouterr().out


@pytest.mark.parametrize("sub", ["model", "module", "nn", "diffusion", "data", "metrics", "datasets"])
def test_public_names_import(scvi_module, sub):
    mod = importlib.import_module(f"perturbdiff_scvi.{sub}")
    assert mod.__all__
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_top_level_api(scvi_module):
    import perturbdiff_scvi as pdiff

    assert pdiff.PerturbDiff.__name__ == "PerturbDiff"
    assert pdiff.PAPER_CONFIG["n_hidden"] == 512 and pdiff.PAPER_CONFIG["set_size"] == 256
    assert pdiff.__version__


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
