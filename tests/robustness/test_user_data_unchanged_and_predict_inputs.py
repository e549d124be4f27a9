"""The user's AnnData survives setup/train/predict untouched; predict_population rejects bad inputs clearly."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from _helpers import TINY_TIMESTEPS, make_perturbation_adata, predict_kwargs, train_tiny_model
from anndata import AnnData
from scipy import sparse

KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}
FAST = {"n_steps": 2, "seed": 0}


def _rich_adata() -> AnnData:
    """The helper's data plus what real users carry: layers, obsm, var annotations, uns, extra obs columns."""
    adata = make_perturbation_adata(n_cells=160, seed=11)
    rng = np.random.default_rng(0)
    adata.layers["counts"] = sparse.csr_matrix(np.round(np.expm1(adata.X.toarray()) * 10))
    adata.layers["dense"] = adata.X.toarray()
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 5))
    adata.obsm["meta"] = pd.DataFrame({"umi": rng.integers(0, 100, adata.n_obs)}, index=adata.obs_names)
    adata.var["gene_symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 2 == 0
    adata.obs["n_counts"] = rng.integers(500, 5000, adata.n_obs)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2"], adata.n_obs))
    adata.uns["log1p"] = {"base": None}
    adata.uns["note"] = "keep me"
    return adata


def _snapshot(adata: AnnData) -> dict:
    return {
        "X": adata.X.copy(),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obsm": {k: v.copy() for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
    }


def _same_matrix(a, b) -> bool:
    if sparse.issparse(a) != sparse.issparse(b) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if sparse.issparse(a):
        return a.format == b.format and (a != b).nnz == 0
    return np.array_equal(a, b)


@pytest.fixture(scope="module")
def trained(scvi_module):
    """One model trained on a rich AnnData, shared by this module (prediction does not change the model)."""
    from perturbdiff_scvi import PerturbDiff

    adata = _rich_adata()
    before = _snapshot(adata)
    PerturbDiff.setup_anndata(adata, **KEYS)
    return train_tiny_model(adata, seed=0), adata, before


@pytest.fixture
def model(trained):
    return trained[0]


def _controls(order=None) -> AnnData:
    """The training data's control cells, from a never-set-up copy (no _scvi columns)."""
    fresh = make_perturbation_adata(n_cells=160, seed=11)
    ctrl = fresh[fresh.obs["pert"] == "ctrl"].copy()
    return ctrl if order is None else ctrl[:, order].copy()


# ---------------------------------------------------------------------------------------------- user data unchanged
def test_user_anndata_unchanged_by_setup_train_predict(trained):
    model, adata, before = trained
    model.predict_population(["A", "B"], n_cells=5, n_populations=2, **FAST)
    model.predict_population("A", control_adata=_controls(), n_cells=5, **FAST)

    assert _same_matrix(adata.X, before["X"])
    assert set(adata.layers) == set(before["layers"])
    for key, value in before["layers"].items():
        assert _same_matrix(adata.layers[key], value), key
    assert set(adata.obsm) == set(before["obsm"])
    np.testing.assert_array_equal(adata.obsm["X_pca"], before["obsm"]["X_pca"])
    pd.testing.assert_frame_equal(adata.obsm["meta"], before["obsm"]["meta"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    pd.testing.assert_index_equal(adata.obs_names, before["obs_names"])
    pd.testing.assert_index_equal(adata.var_names, before["var_names"])

    original = list(before["obs"].columns)
    pd.testing.assert_frame_equal(adata.obs[original], before["obs"])  # values and dtypes (object stays object)
    new_cols = [c for c in adata.obs.columns if c not in original]
    assert new_cols and all(c.startswith("_scvi_") for c in new_cols), new_cols

    new_uns = set(adata.uns) - set(before["uns"])
    assert all(k.startswith("_scvi") for k in new_uns), new_uns
    for key, value in before["uns"].items():
        assert adata.uns[key] == value, key


def test_control_adata_view_is_read_not_modified(model, trained):
    """A view of the training data works as control_adata and neither it nor its parent is changed."""
    _, adata, _ = trained
    obs_before, x_before = adata.obs.copy(), adata.X.copy()
    view = adata[adata.obs["pert"] == "ctrl"]
    pred = model.predict_population("A", contexts="c0", control_adata=view, n_cells=4, **FAST)
    assert pred.n_obs == 4 * pred.obs["batch"].nunique()
    assert view.is_view
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert _same_matrix(adata.X, x_before)


# ---------------------------------------------------------------------------------------------- unknown names
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"perturbations": "Aa"}, r"Unknown perturbation 'Aa': .*'pert'.*Close matches: \['A'\]"),
        ({"perturbations": ["A", "BB"]}, r"Unknown perturbation 'BB'.*Close matches: \['B'\]"),
        ({"perturbations": "A", "contexts": "c00"}, r"Unknown context 'c00': .*'ctx'.*Close matches: \['c0'\]"),
        ({"perturbations": "A", "batches": "b00"}, r"Unknown batch 'b00': .*'batch'.*Close matches: \['b0'\]"),
        ({"perturbations": "A", "batches": ["b1", "b_0"]}, r"Unknown batch 'b_0'.*Close matches: \['b0'"),
    ],
)
def test_unknown_names_have_close_match_hints(model, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        model.predict_population(**kwargs, **FAST)
    assert "Known values: [" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"perturbations": []}, "perturbations"),
        ({"perturbations": "A", "contexts": []}, "contexts"),
        ({"perturbations": "A", "batches": []}, "batches"),
    ],
)
def test_empty_selection_names_argument(model, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} is empty; give at least one value"):
        model.predict_population(**kwargs, **FAST)


# ---------------------------------------------------------------------------------------------- control_adata
def test_control_adata_gene_order_does_not_matter(model):
    genes = list(_controls().var_names)
    shuffled = list(np.random.default_rng(1).permutation(genes))
    kwargs = {"contexts": ["c0", "c1"], "n_cells": 6, **FAST}
    in_order = model.predict_population("A", control_adata=_controls(), **kwargs)
    reordered = model.predict_population("A", control_adata=_controls(shuffled), **kwargs)
    reversed_ = model.predict_population("A", control_adata=_controls(genes[::-1]), **kwargs)
    np.testing.assert_array_equal(in_order.X, reordered.X)
    np.testing.assert_array_equal(in_order.X, reversed_.X)
    assert list(reordered.var_names) == genes
    pd.testing.assert_frame_equal(in_order.obs, reordered.obs)
    # The same cells as control_adata, in training order, are exactly the registered controls.
    registered = model.predict_population("A", **kwargs)
    np.testing.assert_array_equal(in_order.X, registered.X)


def test_control_adata_dense_and_sparse_agree(model):
    dense = _controls()
    dense.X = dense.X.toarray()
    a = model.predict_population("B", contexts="c1", control_adata=dense, n_cells=5, **FAST)
    b = model.predict_population("B", contexts="c1", control_adata=_controls(), n_cells=5, **FAST)
    np.testing.assert_array_equal(a.X, b.X)


def test_control_adata_missing_genes(model):
    ctrl = _controls()
    keep = [g for g in ctrl.var_names if g not in ("gene3", "gene7", "gene29")]
    with pytest.raises(
        ValueError,
        match=r"control_adata lacks 3 of the 30 training genes \(e\.g\. \['gene29', 'gene3', 'gene7'\]\); "
        r"subset or pad it to model\.var_names",
    ):
        model.predict_population("A", control_adata=ctrl[:, keep].copy(), **FAST)


def test_control_adata_no_gene_overlap(model):
    ctrl = _controls()
    ctrl.var_names = [f"ENSG{i:05d}" for i in range(ctrl.n_vars)]
    with pytest.raises(
        ValueError, match=r"shares no gene with the training data.*\['gene0', 'gene1', 'gene2'\].*same gene identifiers"
    ):
        model.predict_population("A", control_adata=ctrl, **FAST)


def test_control_adata_duplicated_var_names(model):
    ctrl = _controls()
    x = ctrl.X.toarray()
    with pytest.warns(UserWarning, match="not unique"):  # anndata's own warning on construction
        dup = AnnData(
            X=np.hstack([x, x[:, :2]]),
            obs=ctrl.obs.copy(),
            var=pd.DataFrame(index=[*ctrl.var_names, "gene0", "gene1"]),
        )
    with pytest.raises(ValueError, match=r"control_adata\.var_names are not unique.*var_names_make_unique\(\)"):
        model.predict_population("A", control_adata=dup, **FAST)


def test_control_adata_lacking_requested_context(model):
    ctrl = _controls()
    only_c0 = ctrl[ctrl.obs["ctx"] == "c0"].copy()
    with pytest.raises(
        ValueError, match=r"control_adata has no cell of context 'c1' in column 'ctx'; add such control cells"
    ):
        model.predict_population("A", contexts="c1", control_adata=only_c0, **FAST)
    # Without the context column its cells serve every context (the advertised alternative).
    only_c0.obs = only_c0.obs.drop(columns="ctx")
    pred = model.predict_population("A", contexts="c1", control_adata=only_c0, n_cells=3, **FAST)
    assert set(pred.obs["ctx"]) == {"c1"}


def test_control_adata_raw_counts(model):
    ctrl = _controls()
    ctrl.X = sparse.csr_matrix(np.round(np.expm1(ctrl.X.toarray()) * 10))
    with pytest.raises(ValueError, match=r"control_adata expression looks like raw counts.*normalize_total"):
        model.predict_population("A", control_adata=ctrl, **FAST)


def test_control_adata_without_control_cells(model):
    fresh = make_perturbation_adata(n_cells=160, seed=11)
    treated = fresh[fresh.obs["pert"] == "A"].copy()
    with pytest.raises(ValueError, match=r"control_adata\.obs\['pert'\] has no cell equal to the control value 'ctrl'"):
        model.predict_population("A", control_adata=treated, **FAST)


def test_control_adata_not_anndata(model):
    with pytest.raises(TypeError, match="control_adata must be an AnnData; got ndarray"):
        model.predict_population("A", control_adata=_controls().X.toarray(), **FAST)


# ---------------------------------------------------------------------------------------------- numeric arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cells": 0}, r"n_cells must be a positive integer or None; got 0\."),
        ({"n_cells": -3}, r"n_cells must be a positive integer or None; got -3\."),
        ({"n_cells": 2.5}, r"n_cells must be a positive integer or None; got 2\.5\."),
        ({"n_steps": 0}, r"n_steps must be an integer between 1 and n_timesteps=100; got 0\."),
        ({"n_steps": TINY_TIMESTEPS + 1}, r"n_steps must be an integer between 1 and n_timesteps=100; got 101\."),
        ({"guidance_scale": -0.1}, r"guidance_scale must be a number >= 0 \(0 = no guidance\) or 'auto'; got -0\.1\."),
        ({"guidance_scale": float("nan")}, r"guidance_scale must be a number >= 0 .* or 'auto'; got nan\."),
        ({"guidance_scale": float("inf")}, r"guidance_scale must be a number >= 0 .*; got inf\."),
        ({"guidance_scale": "Auto"}, r"guidance_scale must be a number >= 0 .* or 'auto'; got 'Auto'\."),
        ({"n_populations": 0}, r"n_populations must be a positive integer; got 0\."),
        ({"n_populations": 1.5}, r"n_populations must be a positive integer; got 1\.5\."),
        ({"sampler": "bogus"}, r"sampler must be 'ddim', 'ddpm' or 'ddim_truncated'; got 'bogus'\."),
        ({"sampler": "DDIM"}, r"sampler must be 'ddim', 'ddpm' or 'ddim_truncated'; got 'DDIM'\."),
        ({"batch_size": 0}, r"batch_size must be a positive integer; got 0\."),
        ({"batch_size": -2}, r"batch_size must be a positive integer; got -2\."),
    ],
)
def test_bad_numeric_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.predict_population("A", **predict_kwargs(**{**FAST, **kwargs}))


@pytest.mark.parametrize("arg", ["n_cells", "n_steps", "n_populations", "batch_size"])
def test_integral_float_arguments_are_accepted_as_integers(model, arg):
    """A whole-number float (``2.0``) is taken as that integer: the same cells as with ``2`` (non-integral floats
    are rejected, see test_bad_numeric_arguments)."""
    kwargs = {"contexts": "c0", "batches": "b0", "n_cells": 3, **FAST}
    as_float = model.predict_population("A", **predict_kwargs(**{**kwargs, arg: 2.0}))
    as_int = model.predict_population("A", **predict_kwargs(**{**kwargs, arg: 2}))
    np.testing.assert_array_equal(as_float.X, as_int.X)
    pd.testing.assert_frame_equal(as_float.obs, as_int.obs)
    expected_cells = {"n_cells": 2, "n_populations": 2 * 3}.get(arg, 3)
    assert as_float.n_obs == expected_cells
    n_steps = as_float.uns["perturbdiff"]["n_steps"]
    assert n_steps == 2 and type(n_steps) is int  # recorded as the integer


def test_numpy_integer_arguments_work(model):
    pred = model.predict_population(
        "A", contexts="c0", batches="b0", n_cells=np.int64(3), n_steps=np.int64(2), n_populations=np.int64(2), seed=0
    )
    assert pred.n_obs == 6 and sorted(pred.obs["population"].unique()) == [0, 1]
