"""tl.evaluate: tidy table, methods side by side, normalised score against the cell-mean baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from perturbdiff_scvi import baselines, tl

KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx"}


def _data(seed: int = 0) -> AnnData:
    """Log-normalised-like data; perturbation A raises genes 0-4 by 1.5 and B lowers genes 5-9, in every context."""
    rng = np.random.default_rng(seed)
    n_genes, rows, obs = 40, [], []
    for ctx, shift in (("c0", 0.0), ("c1", 0.8), ("c2", 0.4)):
        for pert in ("ctrl", "A", "B"):
            mean = np.full(n_genes, 1.0)
            mean[20:25] += shift
            if pert == "A":
                mean[:5] += 1.5
            if pert == "B":
                mean[5:10] = 0.2
            x = np.clip(rng.normal(mean, 0.4, (60, n_genes)), 0, None) * (rng.random((60, n_genes)) > 0.2)
            rows.append(x)
            obs += [(pert, ctx)] * 60
    obs = pd.DataFrame(obs, columns=["pert", "ctx"], index=[f"c{i}" for i in range(len(obs))])
    return AnnData(np.vstack(rows).astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(40)]))


@pytest.fixture(scope="module")
def inputs():
    adata = _data()
    held = ((adata.obs.ctx == "c2") & (adata.obs.pert != "ctrl")).to_numpy()
    train, real = adata[~held].copy(), adata[held].copy()
    control = adata[((adata.obs.ctx == "c2") & (adata.obs.pert == "ctrl")).to_numpy()].copy()
    methods = {name: [] for name in ("control", "cell_mean", "additive")}
    for pert in ("A", "B"):
        methods["control"].append(baselines.control_baseline(train, pert, "c2", **KEYS))
        methods["cell_mean"].append(baselines.cell_mean_baseline(train, pert, "c2", **KEYS))
        methods["additive"].append(baselines.additive_shift_baseline(train, pert, "c2", **KEYS))
    import anndata as ad

    preds = {k: ad.concat(v, index_unique="-") for k, v in methods.items()}
    return preds, real, control, train


@pytest.fixture(scope="module")
def table(inputs):
    preds, real, control, train = inputs
    return tl.evaluate(preds, real, control, perturbation_key="pert", context_key="ctx", pca_reference=train, n_pcs=10)


def test_tidy_layout(table):
    assert list(table.columns) == ["method", "perturbation", "context", "metric", "value", "normalized_score"]
    assert set(table["method"]) == {"control", "cell_mean", "additive"}
    assert set(table["perturbation"]) == {"A", "B"} and set(table["context"]) == {"c2"}
    expected = {
        "mae",
        "pearson_delta",
        "r2_top100_de",
        "e_distance",
        "mmd_rbf",
        "overlap_at_N",
        "discrimination_score_l1",
        *tl.REALISM_METRICS,
    }
    assert expected <= set(table["metric"])
    assert not table.duplicated(["method", "perturbation", "context", "metric"]).any()


def test_additive_beats_control_and_cell_mean(table):
    v = table.pivot_table(index=["perturbation", "metric"], columns="method", values="value")
    for pert in ("A", "B"):
        assert v.loc[(pert, "pearson_delta"), "additive"] > 0.8
        assert v.loc[(pert, "mae"), "additive"] < v.loc[(pert, "mae"), "control"]
        assert v.loc[(pert, "e_distance"), "additive"] < v.loc[(pert, "e_distance"), "control"]
        assert v.loc[(pert, "discrimination_score_l1"), "additive"] == 1.0


def test_normalized_score_against_cell_mean(table):
    base = table[table["method"] == "cell_mean"]
    assert base["normalized_score"].isna().all()
    add = table[(table["method"] == "additive") & (table["metric"] == "pearson_delta")]
    assert (add["normalized_score"] > 0.5).all()
    unbounded = table[table["metric"].isin(["e_distance", "mmd_rbf"])]
    assert unbounded["normalized_score"].isna().all()


def test_mismatched_genes_are_refused():
    adata = _data()
    with pytest.raises(ValueError, match="other genes"):
        tl.evaluate({"m": adata[:, 1:].copy()}, adata, adata, perturbation_key="pert", context_key="ctx", baseline=None)
    with pytest.raises(ValueError, match="baseline='cell_mean' is not one of the methods"):
        tl.evaluate({"m": adata}, adata, adata, perturbation_key="pert", context_key="ctx")


def test_realism_rows(table):
    v = table.pivot_table(index=["perturbation", "metric"], columns="method", values="value")
    for pert in ("A", "B"):
        # the cell-mean baseline puts every cell at one point: separable, unmixed, no spread
        assert v.loc[(pert, "c2st_auroc"), "cell_mean"] == 1.0
        assert v.loc[(pert, "knn_mixing"), "cell_mean"] == 0.0
        assert v.loc[(pert, "spread_ratio_mean_abs_log"), "cell_mean"] == pytest.approx(np.log(1e3))
        # the additive shift moves real control cells onto the perturbed cloud: closer to real than control
        assert v.loc[(pert, "c2st_auroc"), "additive"] < v.loc[(pert, "c2st_auroc"), "control"]
        assert v.loc[(pert, "knn_mixing"), "additive"] > v.loc[(pert, "knn_mixing"), "control"]
        assert v.loc[(pert, "spread_ratio_mean_abs_log"), "additive"] < 0.5
        # control cells are real cells of the training data: as sparse as real, never out of range
        assert 0.9 < v.loc[(pert, "detected_genes_ratio"), "control"] < 1.1
        assert v.loc[(pert, "out_of_range_fraction"), "control"] == 0.0
        assert v.loc[(pert, "max_over_training"), "control"] <= 1.0
    # c2st's best value is 0.5: no normalised score; the two error-like realism rows have one
    rows = table[table["method"] == "additive"].set_index(["perturbation", "metric"])["normalized_score"]
    assert rows.loc[(slice(None), "c2st_auroc")].isna().all()
    assert rows.loc[(slice(None), "spread_ratio_mean_abs_log")].notna().all()
    assert "c2st_auroc" not in tl.METRIC_BEST and tl.METRIC_BEST["out_of_range_fraction"] == 0


def test_realism_false_leaves_the_other_rows_unchanged(inputs, table):
    preds, real, control, train = inputs
    plain = tl.evaluate(
        preds, real, control, perturbation_key="pert", context_key="ctx", pca_reference=train, n_pcs=10, realism=False
    )
    assert not set(tl.REALISM_METRICS) & set(plain["metric"])
    rest = table[~table["metric"].isin(tl.REALISM_METRICS)].reset_index(drop=True)
    pd.testing.assert_frame_equal(plain, rest)
    with pytest.raises(TypeError, match="realism"):
        tl.evaluate(preds, real, control, perturbation_key="pert", context_key="ctx", realism="yes")
