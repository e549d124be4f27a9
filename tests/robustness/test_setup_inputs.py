"""Robustness of PerturbDiff.setup_anndata (and a tiny train/predict) against awkward user inputs.

Every rejected input must raise the exact exception type with a message that names the offending
key/value and says how to fix it; every accepted input must survive setup -> train -> predict.
"""

from __future__ import annotations

import re
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, tiny
from scipy import sparse

KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}
# Few cells: training cost depends on TINY_TRAIN's steps, not on the data size.
N_CELLS = 96


@pytest.fixture
def pdiff(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    return PerturbDiff


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _train(pdiff, adata, **model_kwargs):
    model = pdiff(adata, **tiny(**model_kwargs))
    model.train(**TINY_TRAIN)
    return model


# ---------------------------------------------------------------------------------------------- obs keys
@pytest.mark.parametrize("arg", ["perturbation_key", "context_key", "batch_key"])
def test_missing_obs_key_is_keyerror_naming_key_and_columns(pdiff, arg):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    with pytest.raises(KeyError, match=rf"{arg}='nope' is not a column of adata\.obs.*Available: \['pert', 'ctx'"):
        pdiff.setup_anndata(adata, **{**KEYS, arg: "nope"})


def test_misspelt_batch_key_suggests_close_match(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    with pytest.raises(KeyError, match=r"batch_key='bach'.*Did you mean \['batch'\]"):
        pdiff.setup_anndata(adata, **{**KEYS, "batch_key": "bach"})


def test_missing_layer_names_layer_and_lists_available(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.layers["counts"] = adata.X.copy()
    adata.layers["other"] = adata.X.copy()
    with pytest.raises(
        KeyError, match=r"Layer 'lognorm' not found in adata\.layers \(available: \['counts', 'other'\]\).*layer=None"
    ):
        pdiff.setup_anndata(adata, **KEYS, layer="lognorm")


def test_layer_is_checked_not_x(pdiff):
    """The log-normalisation check runs on the registered layer: raw counts there are named as such ..."""
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.layers["counts"] = sparse.csr_matrix(np.round(np.expm1(adata.X.toarray()) * 10))
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] looks like raw counts.*normalize_total"):
        pdiff.setup_anndata(adata, **KEYS, layer="counts")


def test_raw_x_with_lognormalised_layer_is_accepted(pdiff):
    """... and raw counts in X do not matter when a log-normalised layer is registered."""
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.layers["lognorm"] = adata.X.copy()
    adata.X = sparse.csr_matrix(np.round(np.expm1(adata.X.toarray()) * 10))
    pdiff.setup_anndata(adata, **KEYS, layer="lognorm")
    assert pdiff(adata, **TINY).summary_stats["n_perturbation"] == 3


# ---------------------------------------------------------------------------------------------- control value
def test_absent_control_value_names_value_and_lists_present(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    with pytest.raises(
        ValueError,
        match=r"control_value='control' does not occur in adata\.obs\['pert'\]\. Close matches: \['ctrl'\]\..*"
        r"Values present: \['A', 'B', 'ctrl'\]",
    ):
        pdiff.setup_anndata(adata, **{**KEYS, "control_value": "control"})


def test_every_cell_control_is_rejected(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.obs["pert"] = "ctrl"
    with pytest.raises(ValueError, match=r"Every cell of 'pert' is the control 'ctrl'.*needs perturbed cells"):
        pdiff.setup_anndata(adata, **KEYS)


# ---------------------------------------------------------------------------------------------- expression values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_nan_or_inf_in_x(pdiff, bad, fmt):
    adata = make_perturbation_adata(n_cells=N_CELLS, sparse_x=False)
    x = adata.X.copy()
    x[7, 3] = bad
    adata.X = sparse.csr_matrix(x) if fmt == "csr" else x
    with pytest.raises(ValueError, match=r"adata\.X contains NaN or infinite values; remove or impute them"):
        pdiff.setup_anndata(adata, **KEYS)


def test_negative_values_in_x(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS, sparse_x=False)
    adata.X = adata.X - adata.X.mean(0)  # centred / scaled data (sc.pp.scale)
    with pytest.raises(ValueError, match=r"adata\.X contains negative values.*sc\.pp\.normalize_total"):
        pdiff.setup_anndata(adata, **KEYS)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_raw_integer_counts_in_x(pdiff, fmt):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    counts = np.round(np.expm1(adata.X.toarray()) * 10).astype(np.float32)
    adata.X = {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}[fmt](counts)
    with pytest.raises(ValueError, match=r"adata\.X looks like raw counts \(all integers.*normalize_total"):
        pdiff.setup_anndata(adata, **KEYS)


def test_non_integer_values_far_above_log_scale(pdiff):
    """Normalised but not log-transformed (e.g. CPM without log1p): not integers, yet far too large."""
    adata = make_perturbation_adata(n_cells=N_CELLS, sparse_x=False)
    adata.X = np.expm1(adata.X) * 13.7 + 0.25
    with pytest.raises(ValueError, match=r"adata\.X has values up to .*far above log1p-normalised.*sc\.pp\.log1p"):
        pdiff.setup_anndata(adata, **KEYS)


def test_x_none_asks_for_layer(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.layers["lognorm"] = adata.X.copy()
    adata.X = None
    with pytest.raises(ValueError, match=r"adata\.X is empty \(None\); pass `layer=`"):
        pdiff.setup_anndata(adata, **KEYS)


# ---------------------------------------------------------------------------------------------- obs values
@pytest.mark.parametrize("categorical", [False, True])
@pytest.mark.parametrize(("arg", "col"), [("perturbation_key", "pert"), ("context_key", "ctx"), ("batch_key", "batch")])
def test_missing_values_in_obs_column(pdiff, arg, col, categorical):
    adata = make_perturbation_adata(n_cells=N_CELLS)
    if categorical:
        adata.obs[col] = adata.obs[col].astype("category")
    adata.obs.loc[adata.obs_names[[2, 5]], col] = np.nan
    with pytest.raises(
        ValueError, match=rf"adata\.obs\['{col}'\] \({arg}\) has 2 missing values; fill or drop those cells"
    ):
        pdiff.setup_anndata(adata, **KEYS)


# ---------------------------------------------------------------------------------------------- object kinds
def test_empty_anndata(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)[:0].copy()
    with pytest.raises(ValueError, match=r"The AnnData is empty \(0 cells x 30 genes\)"):
        pdiff.setup_anndata(adata, **KEYS)


def test_anndata_without_genes(pdiff):
    adata = make_perturbation_adata(n_cells=N_CELLS)[:, :0].copy()
    with pytest.raises(ValueError, match=rf"The AnnData is empty \({N_CELLS} cells x 0 genes\)"):
        pdiff.setup_anndata(adata, **KEYS)


def test_view_is_rejected_and_parent_untouched(pdiff):
    """setup_anndata on ``adata[mask]`` raises (rather than silently writing into the parent) and says .copy()."""
    parent = make_perturbation_adata(n_cells=N_CELLS)
    obs_before, uns_before, x_before = parent.obs.copy(), dict(parent.uns), parent.X.copy()
    view = parent[parent.obs["ctx"] == "c0"]
    assert view.is_view
    with pytest.raises(ValueError, match=r"The AnnData is a view.*adata = adata\[mask\]\.copy\(\)"):
        pdiff.setup_anndata(view, **KEYS)
    pd.testing.assert_frame_equal(parent.obs, obs_before)
    assert dict(parent.uns) == uns_before
    assert (parent.X != x_before).nnz == 0
    assert view.is_view  # not silently turned into an actual AnnData either
    # The advertised fix works.
    pdiff.setup_anndata(view.copy(), **KEYS)


def test_backed_anndata_registers_x_and_refuses_a_layer(pdiff, tmp_path):
    path = tmp_path / "backed.h5ad"
    adata = make_perturbation_adata(n_cells=N_CELLS)
    adata.layers["lognorm"] = adata.X.copy()
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        assert backed.isbacked
        with pytest.raises(ValueError, match=r"backed AnnData keeps only X on disk.*layer='lognorm'"):
            pdiff.setup_anndata(backed, **KEYS, layer="lognorm")
        pdiff.setup_anndata(backed, **KEYS)  # X of the file is registered without loading it
        assert backed.isbacked and "_scvi_uuid" in backed.uns
    finally:
        backed.file.close()


def test_setup_anndata_rejects_mudata(pdiff):
    import mudata

    mdata = mudata.MuData({"rna": make_perturbation_adata(n_cells=N_CELLS)})
    with pytest.raises(TypeError, match="setup_anndata expects an AnnData, got MuData; use setup_mudata"):
        pdiff.setup_anndata(mdata, **KEYS)


# ---------------------------------------------------------------------------------------------- control fallback
def test_context_without_controls_falls_back_and_predicts(pdiff):
    """A context of only perturbed cells, and a (context, batch) pair without controls, train with a warning."""
    adata = make_perturbation_adata(n_cells=N_CELLS, seed=1)
    obs = adata.obs
    perturbed = np.flatnonzero((obs["pert"] != "ctrl").to_numpy())
    obs.iloc[perturbed[:16], obs.columns.get_loc("ctx")] = "c2"  # c2: perturbed cells only
    drop = ((obs["pert"] == "ctrl") & (obs["ctx"] == "c1") & (obs["batch"] == "b1")).to_numpy()
    adata = adata[~drop].copy()  # (c1, b1): perturbed cells, controls only in (c1, b0)
    assert not ((adata.obs["ctx"] == "c2") & (adata.obs["pert"] == "ctrl")).any()

    pdiff.setup_anndata(adata, **KEYS)  # setup itself accepts it
    model = pdiff(adata, **TINY)
    with pytest.warns(UserWarning, match="no control cells") as record:
        model.train(**TINY_TRAIN)
    message = next(str(w.message) for w in record if "no control cells" in str(w.message))
    assert re.search(r"\(context='c2', batch='b\d'\) -> same_batch", message), message
    assert "(context='c1', batch='b1') -> same_context" in message, message
    assert "same context in other batches" in message and "all controls" in message, message

    pred = model.predict_population("A", contexts="c2", n_cells=5, seed=0, n_steps=2)
    assert set(pred.obs["ctx"]) == {"c2"} and set(pred.obs["pert"]) == {"A"}
    assert pred.n_obs == 5 * pred.obs["batch"].nunique() > 0
    assert np.isfinite(pred.X).all()
    pred = model.predict_population("B", contexts="c1", batches="b1", n_cells=4, seed=0, n_steps=2)
    assert pred.n_obs == 4 and set(pred.obs["batch"]) == {"b1"}


# ---------------------------------------------------------------------------------------------- tiny groups
def _with_tiny_group(n_tiny: int):
    adata = make_perturbation_adata(n_cells=N_CELLS, seed=2)
    rows = np.flatnonzero((adata.obs["pert"] == "A").to_numpy())[:n_tiny]
    adata.obs.iloc[rows, adata.obs.columns.get_loc("pert")] = "C"
    return adata


@pytest.mark.parametrize(
    "n_tiny",
    [
        1,
        3,
    ],
)
@pytest.mark.filterwarnings("ignore:Category .* has fewer than 3 cells:UserWarning")  # scvi's own, at setup
def test_group_smaller_than_set_size_trains_by_resampling(pdiff, n_tiny):
    adata = _with_tiny_group(n_tiny)
    pdiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl")  # one context, one batch
    model = pdiff(adata, **TINY)
    assert model.module.set_size == 8 > n_tiny
    with pytest.warns(UserWarning, match="resampl"):
        model.train(**TINY_TRAIN)
        assert model.is_trained
        pred = model.predict_population("C", n_cells=11, seed=0, n_steps=2)
        assert pred.n_obs == 11 and set(pred.obs["pert"]) == {"C"}
        assert np.isfinite(pred.X).all()


# ---------------------------------------------------------------------------------------------- column dtypes
def _str_pert(adata):
    adata.obs["pert"] = adata.obs["pert"].astype(object)
    return {"perturbation_key": "pert", "control_value": "ctrl"}, "A", "pert"


def _categorical_pert(adata):
    adata.obs["pert"] = pd.Categorical(adata.obs["pert"], categories=["B", "ctrl", "A"])
    return {"perturbation_key": "pert", "control_value": "ctrl"}, "A", "pert"


def _integer_pert(adata):
    adata.obs["dose"] = adata.obs["pert"].map({"ctrl": 0, "A": 10, "B": 20}).astype(np.int64)
    return {"perturbation_key": "dose", "control_value": 0}, 10, "dose"


def _boolean_pert(adata):
    adata.obs["treated"] = (adata.obs["pert"] != "ctrl").to_numpy()
    return {"perturbation_key": "treated", "control_value": False}, True, "treated"


def _integer_context(adata):
    adata.obs["line"] = adata.obs["ctx"].map({"c0": 3, "c1": 7}).astype(np.int64)
    return {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "line"}, 7, "line"


@pytest.mark.parametrize(
    "prepare", [_str_pert, _categorical_pert, _integer_pert, _boolean_pert, _integer_context], ids=lambda f: f.__name__
)
def test_obs_column_dtypes(pdiff, prepare):
    adata = make_perturbation_adata(n_cells=N_CELLS, seed=3)
    setup_kwargs, value, column = prepare(adata)
    dtype_before = adata.obs[column].dtype
    pdiff.setup_anndata(adata, **setup_kwargs)
    assert adata.obs[column].dtype == dtype_before  # the user's column is not converted
    model = _train(pdiff, adata)
    if column == "line":
        pred = model.predict_population("A", contexts=value, n_cells=3, seed=0, n_steps=2)
    else:
        pred = model.predict_population(value, n_cells=3, seed=0, n_steps=2)
    assert pred.n_obs == 3
    assert value in set(pred.obs[column])
    assert set(pred.obs[column]) == {value}
    assert list(pred.var_names) == list(adata.var_names)


# ---------------------------------------------------------------------------------------------- matrix formats
@pytest.mark.filterwarnings("ignore:Training will be faster when sparse matrix is formatted as CSR:UserWarning")
@pytest.mark.parametrize("fmt", ["dense32", "dense64", "csr", "csc"])
def test_matrix_formats(pdiff, fmt):
    adata = make_perturbation_adata(n_cells=N_CELLS, seed=4, sparse_x=False)
    convert = {
        "dense32": lambda x: np.asarray(x, dtype=np.float32),
        "dense64": lambda x: np.asarray(x, dtype=np.float64),
        "csr": sparse.csr_matrix,
        "csc": sparse.csc_matrix,
    }[fmt]
    adata.X = convert(adata.X)
    x_object, x_type, x_dtype, x_values = adata.X, type(adata.X), adata.X.dtype, _dense(adata.X).copy()

    pdiff.setup_anndata(adata, **KEYS)
    # Required: the values of the user's X are unchanged. Observed with scvi-tools 1.4.2 (recorded, not
    # required): X even stays the very same object of the same type and dtype for every format; CSC is not
    # converted to CSR, scvi only warns that CSR would be faster.
    assert np.array_equal(_dense(adata.X), x_values)
    observed = (type(adata.X) is x_type, adata.X.dtype == x_dtype, adata.X is x_object)
    if observed != (True, True, True):
        warnings.warn(f"setup_anndata replaced the user's {fmt} X (same type, dtype, object: {observed})", stacklevel=1)

    model = _train(pdiff, adata)
    pred = model.predict_population("B", contexts="c1", batches="b0", n_cells=4, seed=0, n_steps=2)
    assert pred.shape == (4, adata.n_vars) and pred.X.dtype == np.float32 and np.isfinite(pred.X).all()
    assert np.array_equal(_dense(adata.X), x_values)


def test_formats_give_identical_training_data(pdiff):
    """Dense and CSC copies of the same data register the same expression (nothing lost in conversion)."""
    from perturbdiff_scvi._constants import PDIFF_KEYS

    registered = []
    for convert in (np.asarray, sparse.csc_matrix):
        adata = make_perturbation_adata(n_cells=N_CELLS, seed=4, sparse_x=False)
        adata.X = convert(adata.X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pdiff.setup_anndata(adata, **KEYS)
        model = pdiff(adata, **TINY)
        registered.append(_dense(model.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY)))
    np.testing.assert_array_equal(registered[0], registered[1])
