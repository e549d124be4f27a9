"""``tl.population_summary`` and ``tl.calibration`` on synthetic populations with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from perturbdiff_scvi import tl
from perturbdiff_scvi.metrics import energy_distance

PC = 0.1


def _adata(x, **obs) -> AnnData:
    x = np.asarray(x, dtype=np.float32)
    frame = pd.DataFrame({k: np.asarray(v).astype(str) for k, v in obs.items()}, index=[f"c{i}" for i in range(len(x))])
    return AnnData(X=x, obs=frame, var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]))


@pytest.fixture
def tiny():
    """Three populations of two cells, two genes; linear values chosen so every number is hand-computable."""
    linear = np.array(
        [[1.0, 0.0], [3.0, 0.0], [0.0, 0.5], [0.0, 0.5], [5.0, 2.0], [5.0, 0.0]]
    )  # population means: (2, 0), (0, 0.5), (5, 1)
    pred = _adata(np.log1p(linear), condition="stim", population=[0, 0, 1, 1, 2, 2])
    control = _adata(np.log1p([[1.0, 0.5], [1.0, 0.5]]), condition="ctrl")  # control mean (1, 0.5)
    return pred, control


def test_summary_hand_computed_lfc_and_direction(tiny):
    pred, control = tiny
    table = tl.population_summary(pred, control, perturbation_key="condition", levels=(0.5,), n_pcs=None)
    assert list(table["gene"]) == ["g0", "g1"] and (table["n_populations"] == 3).all()
    lfc = np.log2((np.array([[2.0, 0.0], [0.0, 0.5], [5.0, 1.0]]) + PC) / (np.array([1.0, 0.5]) + PC))
    np.testing.assert_allclose(table["lfc_mean"], lfc.mean(0), rtol=1e-6)
    np.testing.assert_allclose(table["lfc_sd"], lfc.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(table["p_up"], [2 / 3, 1 / 3])  # g1: populations 0 (down), 1 (equal), 2 (up)
    np.testing.assert_allclose(table["p_down"], [1 / 3, 1 / 3])
    expr = np.array([[np.log1p([1.0, 3.0]).mean(), 0.0], [0.0, np.log1p(0.5)], [np.log1p(5.0), np.log1p(2) / 2]])
    np.testing.assert_allclose(table["expr_mean"], expr.mean(0), rtol=1e-6)
    np.testing.assert_allclose(table["control_expr"], np.log1p([1.0, 0.5]), rtol=1e-6)
    # weibull quantiles of 3 values at 0.25 / 0.75: positions 1 and 3, i.e. the minimum and the maximum
    np.testing.assert_allclose(table["lfc_lower_50"], lfc.min(0), rtol=1e-6)
    np.testing.assert_allclose(table["lfc_upper_50"], lfc.max(0), rtol=1e-6)
    assert table.attrs["levels"] == [0.5] and table.attrs["pseudocount"] == PC


def test_summary_intervals_and_edistance_spread():
    rng = np.random.default_rng(0)
    # four populations whose gene-0 log fold changes are exactly 0, 1, 2, 3 (control mean expm1 = 1, pc -> 0)
    linear = np.repeat(np.array([[1.0], [2.0], [4.0], [8.0]]), 3, axis=0) * np.ones((1, 3))
    linear[:, 1:] += rng.uniform(0, 1, (12, 2))
    pred = _adata(np.log1p(linear), condition="stim", population=np.repeat(np.arange(4), 3))
    ctrl = np.ones((5, 3))
    ctrl[:, 1:] += rng.uniform(0, 0.5, (5, 2))  # gene 0: control mean 1 exactly
    control = _adata(np.log1p(ctrl), condition="ctrl")
    table = tl.population_summary(
        pred, control, perturbation_key="condition", levels=(0.5, 0.8), pseudocount=1e-12, n_pcs=None
    )
    row = table.set_index("gene").loc["g0"]
    # weibull: p = 0.25 -> position 1.25 -> 0.25; p = 0.75 -> 3.75 -> 2.75; p = 0.1 -> 0.5 -> clamped to 0
    assert row["lfc_lower_50"] == pytest.approx(0.25) and row["lfc_upper_50"] == pytest.approx(2.75)
    assert row["lfc_lower_80"] == pytest.approx(0.0) and row["lfc_upper_80"] == pytest.approx(3.0)
    assert row["p_up"] == pytest.approx(0.75) and row["p_down"] == 0
    on_genes = tl.population_summary(pred, control, perturbation_key="condition", n_pcs=None)
    x = pred.X
    pops = [x[3 * k : 3 * k + 3] for k in range(4)]
    d = [energy_distance(pops[i], pops[j]) for i in range(4) for j in range(i + 1, 4)]
    first = on_genes.iloc[0]
    assert first["edist_mean"] == pytest.approx(np.mean(d)) and first["edist_sd"] == pytest.approx(np.std(d, ddof=1))
    assert first["edist_min"] == pytest.approx(min(d)) and first["edist_max"] == pytest.approx(max(d))
    assert (on_genes["edist_mean"] == first["edist_mean"]).all()  # repeated on every row of the condition
    on_pcs = tl.population_summary(pred, control, perturbation_key="condition", n_pcs=2)
    assert np.isfinite(on_pcs["edist_mean"]).all() and "PCA" in on_pcs.attrs["edistance_space"]


def test_summary_contexts_genes_uns_and_inputs_unchanged(tiny):
    pred, control = tiny
    pred.obs["cell_type"] = ["a", "a", "a", "b", "b", "b"]
    pred.obs["population"] = ["0", "0", "1", "0", "1", "1"]
    control.obs["cell_type"] = ["a", "b"]
    pred.uns["perturbdiff"] = {"perturbation_key": "condition", "context_key": "cell_type"}
    before = (pred.obs.copy(), pred.X.copy(), set(pred.uns))
    table = tl.population_summary(pred, control, genes=["g1"], key_added="population_summary", n_pcs=None)
    assert table[["perturbation", "context", "gene"]].values.tolist() == [["stim", "a", "g1"], ["stim", "b", "g1"]]
    assert pred.uns["population_summary"] is table
    assert set(pred.uns) - before[2] == {"population_summary"}
    pd.testing.assert_frame_equal(pred.obs, before[0])
    np.testing.assert_array_equal(pred.X, before[1])


def test_summary_errors(tiny):
    pred, control = tiny
    with pytest.raises(ValueError, match="perturbation_key is required"):
        tl.population_summary(pred, control)
    with pytest.raises(KeyError, match="no population column 'pop'"):
        tl.population_summary(pred, control, perturbation_key="condition", population_key="pop")
    with pytest.raises(ValueError, match=r"genes not in pred.var_names: \['nope'\]"):
        tl.population_summary(pred, control, perturbation_key="condition", genes=["g0", "nope"])
    with pytest.raises(ValueError, match="control lacks 1 of the 2 genes"):
        tl.population_summary(pred, control[:, ["g0"]].copy(), perturbation_key="condition")
    with pytest.raises(ValueError, match="levels must be numbers strictly between 0 and 1"):
        tl.population_summary(pred, control, perturbation_key="condition", levels=(0.8, 1.0))
    with pytest.raises(ValueError, match="pseudocount must be a number > 0"):
        tl.population_summary(pred, control, perturbation_key="condition", pseudocount=0)
    one = pred[pred.obs["population"] == "0"].copy()
    with pytest.warns(UserWarning, match="single population"):
        table = tl.population_summary(one, control, perturbation_key="condition", n_pcs=None)
    assert table["lfc_sd"].isna().all() and table["lfc_lower_80"].isna().all() and table["edist_mean"].isna().all()
    assert np.isfinite(table["lfc_mean"]).all()


# --------------------------------------------------------------------------- calibration


def _groups(n_groups, n_genes, mu, sd, *, key, n_cells=20, rng, shift=0.0):
    """``n_groups`` populations: group-level log-means ``N(mu + shift, sd)`` per gene, gamma cells around them."""
    level = np.exp(mu + shift + sd * rng.normal(size=(n_groups, n_genes)))
    cells = rng.gamma(25.0, np.repeat(level, n_cells, axis=0) / 25.0)
    return _adata(np.log1p(cells), condition="stim", **{key: np.repeat(np.arange(n_groups), n_cells)})


@pytest.fixture
def truth():
    rng = np.random.default_rng(1)
    n_genes = 300
    mu, sd = rng.normal(0.5, 1.0, n_genes), rng.uniform(0.3, 0.8, n_genes)
    control = _adata(np.log1p(rng.gamma(25.0, 1 / 25.0, (60, n_genes))), condition="ctrl")
    real = _groups(12, n_genes, mu, sd, key="donor", rng=rng)
    return rng, mu, sd, real, control


def test_calibrated_populations_cover_about_nominal(truth):
    rng, mu, sd, real, control = truth
    pred = _groups(40, real.n_vars, mu, sd, key="population", rng=rng)  # the same distribution as the donors
    result = tl.calibration(pred, real, control, group_key="donor", perturbation_key="condition")
    cov = result.coverage.set_index("level")
    assert list(cov.index) == ["50", "80", "90", "95"] and (cov["n"] == 12 * real.n_vars).all()
    np.testing.assert_allclose(cov["empirical"], cov["nominal"], atol=0.05)
    hist = result.rank_histogram
    assert (hist["n_populations"] == 40).all() and list(hist["rank"]) == list(range(41))
    assert hist["count"].sum() == 12 * real.n_vars and hist["expected"].iloc[0] == pytest.approx(1 / 41)
    assert hist["frequency"].max() < 2.5 / 41  # flat within noise
    groups = result.groups
    assert len(groups) == 12 and abs(groups["z_mean"].mean()) < 0.1 and 0.9 < groups["z_sd"].mean() < 1.2
    assert len(result.per_gene) == 12 * real.n_vars and {"real_lfc", "inside_80", "rank", "z"} <= set(
        result.per_gene.columns
    )


def test_too_narrow_and_biased_populations_are_caught(truth):
    rng, mu, sd, real, control = truth
    narrow = _groups(40, real.n_vars, mu, sd / 5, key="population", rng=rng)
    result = tl.calibration(narrow, real, control, group_key="donor", perturbation_key="condition")
    cov = result.coverage.set_index("level")["empirical"]
    assert cov["80"] < 0.45 and cov["50"] < 0.25
    freq = result.rank_histogram["frequency"].to_numpy()
    assert freq[0] + freq[-1] > 0.4  # U-shaped: the real values fall beyond the sampled ones
    assert result.groups["z_sd"].mean() > 2
    biased = _groups(40, real.n_vars, mu, sd, key="population", rng=rng, shift=1.0)
    result = tl.calibration(biased, real, control, group_key="donor", perturbation_key="condition")
    freq = result.rank_histogram["frequency"].to_numpy()
    assert freq[:10].sum() > 0.5 and result.groups["bias"].mean() < -1.0  # real values sit below the samples


def test_matched_control_and_per_group_predictions():
    # donors 101 / 107 differ in baseline (x1 / x4); the response is x4 of each donor's own control in both genes
    base = {"101": 1.0, "107": 4.0}
    ctrl = np.log1p(np.array([[base[d]] * 2 for d in ("101", "107") for _ in range(3)]))
    control = _adata(ctrl, condition="ctrl", donor=np.repeat(["101", "107"], 3))
    real = _adata(np.log1p([[4 * base[d]] * 2 for d in ("101", "107")]), condition="stim", donor=["101", "107"])
    factors = np.array([2.0, 3.0, 8.0])  # three populations per donor: x2, x3, x8 of that donor's baseline
    x = np.log1p([[f * base[d]] * 2 for d in ("101", "107") for f in factors])
    pred = _adata(x, condition="stim", donor=np.repeat(["101", "107"], 3), population=np.tile([0, 1, 2], 2))
    result = tl.calibration(
        pred, real, control, group_key="donor", perturbation_key="condition", pseudocount=1e-9, levels=(0.5,)
    )
    per_gene = result.per_gene
    np.testing.assert_allclose(per_gene["real_lfc"], 2.0, atol=1e-6)  # log2(4) against the donor's own control
    np.testing.assert_allclose(per_gene["lfc_mean"], np.log2(factors).mean(), atol=1e-6)
    assert per_gene["inside_50"].all() and (per_gene["rank"] == 2).all()
    pooled = tl.calibration(
        pred,
        real,
        control,
        group_key="donor",
        perturbation_key="condition",
        pseudocount=1e-9,
        matched_control=False,
        levels=(0.5,),
    )
    np.testing.assert_allclose(
        pooled.per_gene.groupby("group")["real_lfc"].first(), np.log2([4 / 2.5, 16 / 2.5]), atol=1e-6
    )
    no_donor = _adata(ctrl, condition="ctrl")
    with pytest.raises(ValueError, match="matched_control=True needs a 'donor' column"):
        tl.calibration(pred, real, no_donor, group_key="donor", perturbation_key="condition", matched_control=True)


def test_calibration_errors_and_warnings(truth):
    rng, mu, sd, real, control = truth
    pred = _groups(5, real.n_vars, mu, sd, key="population", rng=rng)
    kwargs = {"perturbation_key": "condition"}
    with pytest.warns(UserWarning, match=r"levels \[0.8, 0.9, 0.95\] exceed"):
        result = tl.calibration(pred, real, control, group_key="donor", **kwargs)
    assert result.coverage["max_attainable"].iloc[0] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="group_key is required"):
        tl.calibration(pred, real, control, group_key=None, **kwargs)
    with pytest.raises(KeyError, match="group_key='batch' is not a column of real.obs"):
        tl.calibration(pred, real, control, group_key="batch", **kwargs)
    one = pred[pred.obs["population"] == "0"].copy()
    with pytest.raises(ValueError, match="single population"):
        tl.calibration(one, real, control, group_key="donor", **kwargs)
    other = real.copy()
    other.obs["condition"] = "IFN"
    with pytest.raises(ValueError, match=r"pred has no cell of the real condition \('IFN', None\)"):
        tl.calibration(pred, other, control, group_key="donor", **kwargs)
    with pytest.raises(ValueError, match="real lacks 1 of the"):
        tl.calibration(pred, real[:, 1:].copy(), control, group_key="donor", **kwargs)
    with pytest.raises(KeyError, match="no population column"):
        tl.calibration(pred, real, control, group_key="donor", population_key="pop", **kwargs)


def test_summary_of_a_model_prediction_reads_its_keys_from_uns(shared_model):
    pred = shared_model.predict_population("A", n_cells=6, n_populations=3, n_steps=3, seed=0)
    recorded = pred.uns["perturbdiff"]
    assert (recorded["perturbation_key"], recorded["context_key"], recorded["batch_key"]) == ("pert", "ctx", "batch")
    data = shared_model.adata
    control = data[data.obs["pert"] == "ctrl"].copy()
    table = tl.population_summary(pred, control, n_pcs=None)  # no keys passed
    assert set(table["context"]) == set(pred.obs["ctx"]) and (table["n_populations"] == 3).all()
