"""End to end on real bundled data: Kang 2018 PBMC, stimulated CD4T cells never seen in training.

Trains a small model on CPU, predicts stimulated CD4T, and checks the prediction moved toward the truth.
The scanpy checks run on the same output.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 1000 training steps on real data

N_GENES = 1000  # HVGs of the training cells
STEPS = 1000  # about 2 minutes on 2 CPU cores with the default model


@pytest.fixture(scope="module")
def kang_run(scvi_module):
    import scanpy as sc

    from perturbdiff_scvi import PerturbDiff, datasets

    scvi_module.settings.seed = 0
    adata = datasets.kang2018()
    held_out = ((adata.obs.cell_type == "CD4T") & (adata.obs.condition == "stimulated")).to_numpy()
    train = adata[~held_out].copy()
    sc.pp.highly_variable_genes(train, n_top_genes=N_GENES)
    genes = train.var_names[train.var.highly_variable.to_numpy()]
    train = train[:, genes].copy()
    real = adata[held_out, genes].copy()
    control = adata[((adata.obs.cell_type == "CD4T") & (adata.obs.condition == "control")).to_numpy(), genes].copy()
    PerturbDiff.setup_anndata(train, perturbation_key="condition", control_value="control", context_key="cell_type")
    model = PerturbDiff(train)  # the package defaults
    model.train(max_steps=STEPS, enable_progress_bar=False, accelerator="cpu")
    pred = model.predict_population("stimulated", contexts="CD4T", n_cells=real.n_obs, seed=0)
    return {"model": model, "train": train, "real": real, "control": control, "pred": pred}


def test_training_data_never_contains_the_held_out_cells(kang_run):
    train = kang_run["train"]
    assert not ((train.obs.cell_type == "CD4T") & (train.obs.condition == "stimulated")).any()


def test_prediction_moves_toward_truth(kang_run):
    from perturbdiff_scvi.metrics import energy_distance, pearson_delta, top_de_genes

    real, control, pred = kang_run["real"].X, kang_run["control"].X, kang_run["pred"].X
    e_pred, e_ctrl = energy_distance(pred, real), energy_distance(control, real)
    de = top_de_genes(real, control, n=100)
    r = pearson_delta(pred, real, control, genes=de)
    print(f"E(pred, real)={e_pred:.3f}  E(control, real)={e_ctrl:.3f}  pearson_delta top-100 DE={r:.3f}")
    assert e_pred < e_ctrl
    assert r > 0.5


def test_scanpy_on_prediction(kang_run, tmp_path):
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    real, pred = kang_run["real"], kang_run["pred"]
    combined = ad.concat([real, pred], label="source", keys=["real", "predicted"], index_unique="-")
    assert combined.n_vars == real.n_vars
    sc.pp.pca(combined, n_comps=20)
    sc.pp.neighbors(combined)
    sc.tl.umap(combined)
    assert combined.obsm["X_umap"].shape == (combined.n_obs, 2)
    sc.pl.umap(combined, color="condition", show=False)
    sc.pl.umap(combined, color="source", show=False)
    plt.savefig(tmp_path / "umap.png")
    plt.close("all")
    assert (tmp_path / "umap.png").stat().st_size > 0

    pred = pred.copy()
    sc.pp.filter_genes(pred, min_cells=1)
    pred.obs["half"] = np.where(np.arange(pred.n_obs) % 2 == 0, "a", "b")
    sc.tl.rank_genes_groups(pred, "half", method="wilcoxon")
    assert "rank_genes_groups" in pred.uns
    pred.write_h5ad(tmp_path / "pred.h5ad")
