"""``pl.population_spread`` and ``pl.lfc_intervals`` under the Agg backend: they draw the numbers they are given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from perturbdiff_scvi import pl, tl


def _adata(x, **obs) -> AnnData:
    frame = pd.DataFrame({k: np.asarray(v).astype(str) for k, v in obs.items()}, index=[f"c{i}" for i in range(len(x))])
    return AnnData(X=np.asarray(x, dtype=np.float32), obs=frame, var=pd.DataFrame(index=[f"g{j}" for j in range(6)]))


@pytest.fixture
def parts():
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 2.0])  # gene 5 varies most across populations
    level = np.exp(scale * rng.normal(size=(5, 6)))
    pred = _adata(np.log1p(np.repeat(level, 4, axis=0)), condition="stim", population=np.repeat(np.arange(5), 4))
    real = _adata(np.log1p(rng.uniform(0.5, 2, (6, 6))), condition="stim", donor=np.repeat(["101", "107"], 3))
    control = _adata(np.log1p(rng.uniform(0.5, 1.5, (8, 6))), condition="ctrl", donor=np.repeat(["101", "107"], 4))
    return pred, real, control, np.log1p(level)


def test_population_spread_draws_population_and_real_pseudobulks(parts):
    pred, real, _, bulk = parts
    ax = pl.population_spread(pred, real, genes=["g0", "g5"], group_key="donor")
    sampled, reals = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    assert sampled.shape == (10, 2) and reals.shape == (4, 2)
    np.testing.assert_allclose(np.sort(sampled[:5, 1]), np.sort(bulk[:, 0]), rtol=1e-5)  # gene g0, 5 populations
    np.testing.assert_allclose(np.sort(sampled[5:, 1]), np.sort(bulk[:, 5]), rtol=1e-5)
    expected = [real.X[:3, 0].mean(), real.X[3:, 0].mean()]
    np.testing.assert_allclose(reals[:2, 1], expected, rtol=1e-5)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g0", "g5"]
    auto = pl.population_spread(pred, n_genes=1)
    assert [t.get_text() for t in auto.get_xticklabels()] == ["g5"] and len(auto.collections) == 1
    one_group = pl.population_spread(pred, real, genes="g1")
    assert one_group.collections[1].get_offsets().shape == (1, 2)
    with pytest.raises(ValueError, match="genes not in pred.var_names"):
        pl.population_spread(pred, real, genes=["nope"])
    with pytest.raises(KeyError, match="group_key='batch'"):
        pl.population_spread(pred, real, genes=["g0"], group_key="batch")
    with pytest.raises(KeyError, match="no population column"):
        pl.population_spread(pred, population_key="pop")
    plt.close("all")


def test_lfc_intervals_draws_intervals_and_real_marks(parts):
    pred, real, control, _ = parts
    summary = tl.population_summary(pred, control, perturbation_key="condition", n_pcs=None)
    result = tl.calibration(pred, real, control, group_key="donor", perturbation_key="condition", levels=(0.5,))
    ax = pl.lfc_intervals(summary, n_top=3, level=0.8, real_lfc=result)
    top = summary.set_index("gene")["lfc_mean"].abs().sort_values(ascending=False).index[:3]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(top)
    assert list(ax.get_yticks()) == [2, 1, 0]  # the largest at the top
    segments = np.array(ax.collections[0].get_segments())  # (3 genes, 2 ends, xy)
    rows = summary.set_index("gene").loc[list(top)]
    np.testing.assert_allclose(segments[:, 0, 0], rows["lfc_lower_80"], rtol=1e-6)
    np.testing.assert_allclose(segments[:, 1, 0], rows["lfc_upper_80"], rtol=1e-6)
    marks = [c.get_offsets() for c in ax.collections[2:]]
    assert len(marks) == 2 and all(m.shape == (3, 2) for m in marks)  # one cross per donor and gene
    series = result.per_gene[result.per_gene["group"] == "101"].set_index("gene")["real_lfc"]
    ax2 = pl.lfc_intervals(summary, genes=["g2", "g0"], real_lfc=series)
    assert [t.get_text() for t in ax2.get_yticklabels()] == ["g2", "g0"] and len(ax2.collections) == 3
    with pytest.raises(ValueError, match="summary has no 0.9 interval"):
        pl.lfc_intervals(summary, level=0.9)
    with pytest.raises(ValueError, match="genes not in summary"):
        pl.lfc_intervals(summary, genes=["nope"])
    both = pd.concat([summary, summary.assign(perturbation="IFN")])
    with pytest.raises(ValueError, match="summary holds 2 conditions"):
        pl.lfc_intervals(both)
    assert len(pl.lfc_intervals(both, perturbation="IFN", n_top=2).get_yticklabels()) == 2
    with pytest.raises(TypeError, match="real_lfc must be"):
        pl.lfc_intervals(summary, real_lfc=[1, 2])
    with pytest.raises(TypeError, match="summary must be the DataFrame"):
        pl.lfc_intervals(pred)
    plt.close("all")
