"""Tests of perturbdiff_scvi.baselines on small synthetic data with a known additive structure."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

from perturbdiff_scvi.baselines import (
    additive_shift_baseline,
    cell_mean_baseline,
    control_baseline,
    half_vs_half_ceiling,
    linear_baseline,
    pooled_other_contexts_baseline,
)

KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}
N_GENES = 20
# Unequal group sizes, so pooling cells over contexts would mix in context effects.
SIZES = {
    ("ctrl", "c0"): 40,
    ("ctrl", "c1"): 40,
    ("ctrl", "c2"): 40,
    ("A", "c0"): 50,
    ("A", "c1"): 20,
    ("A", "c2"): 30,
    ("B", "c0"): 30,
    ("B", "c1"): 30,
    ("B", "c2"): 30,
}
CTX_SHIFT = {"c0": 0.0, "c1": 1.0, "c2": 0.5}  # on genes 10-14
BASELINES = [
    control_baseline,
    cell_mean_baseline,
    additive_shift_baseline,
    pooled_other_contexts_baseline,
    linear_baseline,
]
BASELINE_IDS = [f.__name__ for f in BASELINES]


def true_mean(pert: str, ctx: str, base: np.ndarray) -> np.ndarray:
    mu = base.copy()
    mu[10:15] += CTX_SHIFT[ctx]
    if pert == "A":
        mu[:5] += 2.0
    elif pert == "B":
        mu[5:10] -= 0.5
    return mu


def make_adata(sparse_x: bool = False, seed: int = 0) -> AnnData:
    """Log1p-like non-negative data: A = +2 on genes 0-4 in every context, contexts shift genes 10-14."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(1.0, 2.0, N_GENES)
    rows, pert, ctx = [], [], []
    for (p, c), n in SIZES.items():
        rows.append(true_mean(p, c, base) + rng.normal(0.0, 0.15, (n, N_GENES)))
        pert += [p] * n
        ctx += [c] * n
    x = np.maximum(np.concatenate(rows), 0.0).astype(np.float32)
    obs = pd.DataFrame(
        {
            "pert": pd.Categorical(pert, categories=["ctrl", "A", "B"]),
            "ctx": ctx,
            "batch": rng.choice(["b0", "b1"], len(pert)),
        },
        index=[f"cell{i}" for i in range(len(pert))],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    adata = AnnData(X=sparse.csr_matrix(x) if sparse_x else x, obs=obs, var=var)
    adata.uns["base"] = base
    return adata


@pytest.fixture(scope="module")
def adata() -> AnnData:
    return make_adata()


def mask(adata: AnnData, pert: str, ctx: str | None = None) -> np.ndarray:
    m = (adata.obs["pert"] == pert).to_numpy()
    return m if ctx is None else m & (adata.obs["ctx"] == ctx).to_numpy()


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def real_mean(adata: AnnData, pert: str, ctx: str) -> np.ndarray:
    return dense(adata.X[mask(adata, pert, ctx)]).mean(0)


def sources(pred: AnnData, adata: AnnData) -> AnnData:
    return adata[pred.uns["baseline"]["source_cells"]]


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("sparse_x", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("fn", BASELINES, ids=BASELINE_IDS)
def test_output_contract(fn, sparse_x):
    adata = make_adata(sparse_x=sparse_x)
    pred = fn(adata, "A", "c2", **KEYS)
    n_ctrl = SIZES[("ctrl", "c2")]
    assert pred.shape == (n_ctrl, N_GENES)
    assert isinstance(pred.X, np.ndarray) and pred.X.dtype == np.float32
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    assert list(pred.var_names) == list(adata.var_names)
    assert list(pred.obs_names) == [f"baseline_{i}" for i in range(n_ctrl)]
    assert list(pred.obs.columns) == ["pert", "ctx", "batch", "population"]
    for key in ("pert", "ctx", "batch"):
        assert isinstance(pred.obs[key].dtype, pd.CategoricalDtype)
    assert list(pred.obs["pert"].cat.categories) == ["A"] and (pred.obs["pert"] == "A").all()
    assert list(pred.obs["ctx"].cat.categories) == ["c2"] and (pred.obs["ctx"] == "c2").all()
    assert set(pred.obs["batch"].cat.categories) <= {"b0", "b1"}
    assert pred.obs["population"].dtype == np.int64 and (pred.obs["population"] == 0).all()
    settings = pred.uns["baseline"]
    assert settings["name"] == fn.__name__.removesuffix("_baseline")
    assert (settings["perturbation"], settings["context"], settings["n_cells"], settings["seed"]) == ("A", "c2", 40, 0)
    assert len(settings["source_cells"]) == n_ctrl
    # Each cell carries the batch of the training cell it was built on.
    np.testing.assert_array_equal(pred.obs["batch"].astype(str), sources(pred, adata).obs["batch"].astype(str))


@pytest.mark.parametrize("fn", BASELINES, ids=BASELINE_IDS)
def test_n_cells_seed_and_h5ad(fn, adata, tmp_path):
    big = fn(adata, "A", "c2", **KEYS, n_cells=100, seed=1)  # more than the 40 controls: with replacement
    assert big.shape == (100, N_GENES)
    again = fn(adata, "A", "c2", **KEYS, n_cells=100, seed=1)
    np.testing.assert_array_equal(big.X, again.X)
    small = fn(adata, "A", "c2", **KEYS, n_cells=10, seed=2)
    assert small.n_obs == 10 and len(set(small.uns["baseline"]["source_cells"])) == 10  # without replacement
    big.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_array_equal(back.X, big.X)
    assert back.uns["baseline"]["name"] == big.uns["baseline"]["name"]


def test_no_context_and_no_batch(adata):
    one = adata[adata.obs["ctx"] == "c0"].copy()
    for fn in (control_baseline, cell_mean_baseline):
        pred = fn(one, "A", None, perturbation_key="pert", control_value="ctrl", context_key=None)
        assert list(pred.obs.columns) == ["pert", "population"]
        assert pred.n_obs == SIZES[("ctrl", "c0")]
    # cell-mean in one context without any A cells is the unseen-perturbation (VCC) setting.
    unseen = one[one.obs["pert"] != "A"].copy()
    pred = cell_mean_baseline(unseen, "A", None, perturbation_key="pert", control_value="ctrl", context_key=None)
    np.testing.assert_allclose(pred.X[0], dense(unseen.X[mask(unseen, "B")]).mean(0), atol=1e-5)


def test_layer_is_used(adata):
    moved = adata.copy()
    moved.layers["lognorm"] = sparse.csr_matrix(moved.X)
    moved.X = np.zeros(moved.shape, dtype=np.float32)
    for fn in BASELINES:
        expected = fn(adata, "A", "c2", **KEYS).X
        np.testing.assert_allclose(fn(moved, "A", "c2", **KEYS, layer="lognorm").X, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- values
def test_control_baseline_returns_control_cells(adata):
    pred = control_baseline(adata, "A", "c2", **KEYS)
    src = sources(pred, adata)
    assert (src.obs["pert"] == "ctrl").all() and (src.obs["ctx"] == "c2").all()
    assert src.obs_names.is_unique  # default n_cells: every control cell once
    np.testing.assert_array_equal(pred.X, dense(src.X).astype(np.float32))


def test_cell_mean_rows_equal_mean_of_perturbed_training_cells(adata):
    pred = cell_mean_baseline(adata, "A", "c2", **KEYS)
    assert (pred.X == pred.X[0]).all()
    perturbed = ~mask(adata, "ctrl") & ~mask(adata, "A", "c2")
    np.testing.assert_allclose(pred.X[0], dense(adata.X[perturbed]).mean(0), atol=1e-5)
    assert pred.uns["baseline"]["n_cells_averaged"] == perturbed.sum()


def test_additive_shift_recovers_held_out_mean(adata):
    pred = additive_shift_baseline(adata, "A", "c2", **KEYS)
    assert np.abs(pred.X.mean(0) - real_mean(adata, "A", "c2")).max() < 0.2
    assert np.abs(pred.X.mean(0) - true_mean("A", "c2", adata.uns["base"])).max() < 0.15
    ctrl_error = np.abs(control_baseline(adata, "A", "c2", **KEYS).X.mean(0) - real_mean(adata, "A", "c2"))
    assert ctrl_error[:5].min() > 1.5  # the control baseline misses the effect
    shift = pred.uns["baseline"]["shift"]
    np.testing.assert_allclose(shift[:5], 2.0, atol=0.15)
    np.testing.assert_allclose(shift[5:], 0.0, atol=0.15)
    assert list(pred.uns["baseline"]["other_contexts"]) == ["c0", "c1"]
    # Same seed, same control draw: additive = control + shift (nothing is clipped on this data).
    ctrl = control_baseline(adata, "A", "c2", **KEYS)
    assert list(ctrl.uns["baseline"]["source_cells"]) == list(pred.uns["baseline"]["source_cells"])
    np.testing.assert_allclose(pred.X, ctrl.X + shift, atol=1e-5)
    # Pooling cells over contexts of unequal sizes leaks their context shift into genes 10-14.
    pooled = additive_shift_baseline(adata, "A", "c2", **KEYS, average="cells")
    assert np.abs(pooled.uns["baseline"]["shift"][10:15]).mean() > 0.1


def test_additive_shift_kernel_takes_the_response_of_the_nearest_context():
    # c1's controls sit next to c2's, c0's far away; the response is gene 0 in c0 and gene 1 in c1 (and c2).
    ctrl_means = {"c0": [0.0, 0.0, 0.0, 5.0], "c1": [0.0, 0.0, 0.0, 1.0], "c2": [0.0, 0.0, 0.0, 1.1]}
    rows, obs = [], []
    for ctx, base in ctrl_means.items():
        for i in range(6):
            jitter = np.array([0.1, 0.1, 0.1, 0.0]) * (i % 2)
            rows.append(np.asarray(base) + 1.0 + jitter)
            obs.append(("ctrl", ctx))
            if ctx != "c2":
                effect = np.zeros(4)
                effect[0 if ctx == "c0" else 1] = 2.0
                rows.append(np.asarray(base) + 1.0 + jitter + effect)
                obs.append(("A", ctx))
    adata = AnnData(
        np.asarray(rows, dtype=np.float32),
        obs=pd.DataFrame(obs, columns=["pert", "ctx"], index=[f"c{i}" for i in range(len(obs))]),
    )
    kw = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx"}
    kernel = additive_shift_baseline(adata, "A", "c2", **kw, average="kernel")
    weights = dict(zip(kernel.uns["baseline"]["other_contexts"], kernel.uns["baseline"]["weights"], strict=True))
    assert weights["c1"] > 0.999 and weights["c0"] < 1e-3
    np.testing.assert_allclose(kernel.uns["baseline"]["shift"], [0.0, 2.0, 0.0, 0.0], atol=1e-3)
    mean = additive_shift_baseline(adata, "A", "c2", **kw)  # the plain mean splits the response over genes 0 and 1
    np.testing.assert_allclose(mean.uns["baseline"]["shift"], [1.0, 1.0, 0.0, 0.0], atol=1e-5)
    assert "weights" not in mean.uns["baseline"]
    np.testing.assert_allclose(kernel.X, np.asarray(mean.X) + [-1.0, 1.0, 0.0, 0.0], atol=1e-3)  # same control draw


def test_additive_shift_clips_at_zero(adata):
    neg = adata.copy()
    neg.X[mask(neg, "B"), :5] = 0.0  # B wipes out genes 0-4: a shift of minus their control level
    pred = additive_shift_baseline(neg, "B", "c2", **KEYS)
    unclipped = control_baseline(neg, "B", "c2", **KEYS).X + pred.uns["baseline"]["shift"]
    assert (unclipped < 0).any() and (pred.X >= 0).all()
    np.testing.assert_allclose(pred.X, np.maximum(unclipped, 0), atol=1e-5)


def test_pooled_cells_come_from_other_contexts_only(adata):
    pred = pooled_other_contexts_baseline(adata, "A", "c2", **KEYS, n_cells=200)
    src = sources(pred, adata)
    assert (src.obs["pert"] == "A").all()
    assert set(src.obs["ctx"]) == {"c0", "c1"}
    np.testing.assert_array_equal(pred.X, dense(src.X).astype(np.float32))


def test_linear_baseline_close_to_truth(adata):
    pred = linear_baseline(adata, "A", "c2", **KEYS)
    assert np.abs(pred.X.mean(0) - real_mean(adata, "A", "c2")).max() < 0.2
    assert np.abs(pred.X.mean(0) - true_mean("A", "c2", adata.uns["base"])).max() < 0.15
    effect = pred.uns["baseline"]["effect"]
    np.testing.assert_allclose(effect[:5], 2.0, atol=0.15)
    np.testing.assert_allclose(effect[5:], 0.0, atol=0.15)
    assert pred.uns["baseline"]["n_pseudobulks"] == len(SIZES) - 1
    # Ridge 0 (minimum-norm least squares) and a strong ridge (shrinks the effect).
    exact = linear_baseline(adata, "A", "c2", **KEYS, ridge=0.0).uns["baseline"]["effect"]
    np.testing.assert_allclose(exact, effect, atol=0.02)
    shrunk = linear_baseline(adata, "A", "c2", **KEYS, ridge=10.0).uns["baseline"]["effect"]
    assert (np.abs(shrunk[:5]) < np.abs(effect[:5]) - 0.5).all()


def test_linear_matches_additive_on_balanced_design(adata):
    # With every (perturbation, context) observed but the held-out one, the fitted effect of A is a
    # contrast of pseudobulks, close to the per-context shift of the additive baseline.
    lin = linear_baseline(adata, "A", "c2", **KEYS, ridge=0.0).uns["baseline"]["effect"]
    add = additive_shift_baseline(adata, "A", "c2", **KEYS).uns["baseline"]["shift"]
    np.testing.assert_allclose(lin, add, atol=0.1)


@pytest.mark.parametrize("fn", BASELINES, ids=BASELINE_IDS)
def test_held_out_cells_are_never_used(fn, adata):
    without = adata[~mask(adata, "A", "c2")].copy()
    with_cells = fn(adata, "A", "c2", **KEYS, n_cells=64, seed=3)
    without_cells = fn(without, "A", "c2", **KEYS, n_cells=64, seed=3)
    np.testing.assert_array_equal(with_cells.X, without_cells.X)
    pd.testing.assert_frame_equal(with_cells.obs, without_cells.obs)
    np.testing.assert_array_equal(
        with_cells.uns["baseline"]["source_cells"], without_cells.uns["baseline"]["source_cells"]
    )


# ---------------------------------------------------------------------------------------------- ceiling
def test_ceiling_halves_are_disjoint_and_cover(adata):
    real = adata[mask(adata, "A", "c2") | mask(adata, "B", "c2")].copy()
    pred, ref = half_vs_half_ceiling(real, perturbation_key="pert", context_key="ctx", batch_key="batch", seed=0)
    p_src, r_src = set(pred.uns["baseline"]["source_cells"]), set(ref.uns["baseline"]["source_cells"])
    assert not p_src & r_src and p_src | r_src == set(real.obs_names)
    assert (pred.n_obs, ref.n_obs) == (30, 30)  # 15 + 15 of each group
    assert (pred.obs["pert"].value_counts()[["A", "B"]] == 15).all()
    assert list(pred.obs_names[:2]) == ["baseline_0", "baseline_1"] and ref.obs_names[0] == "reference_0"
    assert (pred.uns["baseline"]["role"], ref.uns["baseline"]["role"]) == ("prediction", "reference")
    assert pred.X.dtype == np.float32 and list(pred.var_names) == list(real.var_names)
    assert list(pred.obs.columns) == ["pert", "ctx", "batch", "population"]
    np.testing.assert_array_equal(pred.X, dense(real[list(pred.uns["baseline"]["source_cells"])].X).astype(np.float32))
    again, _ = half_vs_half_ceiling(real, perturbation_key="pert", context_key="ctx", batch_key="batch", seed=0)
    np.testing.assert_array_equal(again.X, pred.X)
    odd = real[:31].copy()  # 30 A + 1 B cell -> the B group is too small
    with pytest.raises(ValueError, match="at least 2"):
        half_vs_half_ceiling(odd, perturbation_key="pert", context_key="ctx")
    pred_odd, ref_odd = half_vs_half_ceiling(real[:29].copy(), perturbation_key="pert", context_key=None)
    assert (pred_odd.n_obs, ref_odd.n_obs) == (14, 15)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", BASELINES, ids=BASELINE_IDS)
def test_common_errors(fn, adata):
    with pytest.raises(ValueError, match="Unknown context 'c9'"):
        fn(adata, "A", "c9", **KEYS)
    with pytest.raises(ValueError, match="No cell has 'pert' == 'DMSO'"):
        fn(adata, "A", "c2", **{**KEYS, "control_value": "DMSO"})
    with pytest.raises(ValueError, match="is the control value"):
        fn(adata, "ctrl", "c2", **KEYS)
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        fn(adata, "A", "c2", **{**KEYS, "batch_key": "donor"})
    with pytest.raises(ValueError, match="not found in adata.layers"):
        fn(adata, "A", "c2", **KEYS, layer="counts")
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        fn(adata, "A", "c2", **KEYS, n_cells=0)
    no_ctrl = adata[~mask(adata, "ctrl", "c2")].copy()
    with pytest.raises(ValueError, match="No control cells of context 'c2'"):
        fn(no_ctrl, "A", "c2", **KEYS)


@pytest.mark.parametrize("fn", [additive_shift_baseline, pooled_other_contexts_baseline, linear_baseline])
def test_errors_of_baselines_that_need_the_perturbation(fn, adata):
    with pytest.raises(ValueError, match="Unknown perturbation 'Z'"):
        fn(adata, "Z", "c2", **KEYS)
    only_c2 = adata[~mask(adata, "A") | mask(adata, "A", "c2")].copy()  # A seen only in the target context
    with pytest.raises(ValueError, match="outside context 'c2'"):
        fn(only_c2, "A", "c2", **KEYS)


def test_specific_errors(adata):
    with pytest.raises(ValueError, match="context_key is None"):
        additive_shift_baseline(adata, "A", None, perturbation_key="pert", control_value="ctrl", context_key=None)
    with pytest.raises(ValueError, match="context_key is None"):
        pooled_other_contexts_baseline(
            adata, "A", None, perturbation_key="pert", control_value="ctrl", context_key=None
        )
    with pytest.raises(ValueError, match="average must be"):
        additive_shift_baseline(adata, "A", "c2", **KEYS, average="genes")
    with pytest.raises(ValueError, match="ridge must be"):
        linear_baseline(adata, "A", "c2", **KEYS, ridge=-1.0)
    with pytest.raises(ValueError, match="context_key is None; pass context=None"):
        control_baseline(adata, "A", "c2", perturbation_key="pert", control_value="ctrl", context_key=None)
    # A is seen in c0 only, and c0 has no control cells: no context to estimate the shift on.
    sub = adata[~(mask(adata, "A", "c1") | mask(adata, "ctrl", "c0"))].copy()
    with pytest.raises(ValueError, match="no other context with control cells"):
        additive_shift_baseline(sub, "A", "c2", **KEYS)
    with pytest.raises(TypeError, match="AnnData"):
        control_baseline(adata.X, "A", "c2", **KEYS)
    with pytest.raises(ValueError, match="seed must be"):
        control_baseline(adata, "A", "c2", **KEYS, seed=1.5)


def test_import_stays_light():
    code = "import sys, perturbdiff_scvi.baselines; print('scvi' in sys.modules or 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_linear_baseline_adds_components_of_an_unseen_combination(adata):
    # "A+B" never occurs: with combination_delimiter its effect is effect(A) + effect(B).
    keys = {**KEYS, "combination_delimiter": "+"}
    combo = linear_baseline(adata, "A+B", "c2", **keys, ridge=0.0).uns["baseline"]["effect"]
    a = linear_baseline(adata, "A", "c2", **KEYS, ridge=0.0).uns["baseline"]["effect"]
    b = linear_baseline(adata, "B", "c2", **KEYS, ridge=0.0).uns["baseline"]["effect"]
    # The A fit leaves out (A, c2), the combination fit keeps it, so allow the estimation noise.
    np.testing.assert_allclose(combo, a + b, atol=0.1)
    # Only the components in a combination: "B+A" is the same prediction.
    swapped = linear_baseline(adata, "B+A", "c2", **keys, ridge=0.0, seed=5)
    np.testing.assert_array_equal(swapped.X, linear_baseline(adata, "A+B", "c2", **keys, ridge=0.0, seed=5).X)
    with pytest.raises(ValueError, match=r"component\(s\) \['Z'\] have no training cells"):
        linear_baseline(adata, "A+Z", "c2", **keys)
    with pytest.raises(ValueError, match="Unknown perturbation 'A\\+B'"):
        linear_baseline(adata, "A+B", "c2", **KEYS)
