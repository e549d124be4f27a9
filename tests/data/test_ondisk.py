"""Training and prediction from a backed (on-disk) AnnData: the same numbers as in memory, X never loaded."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata
from scipy import sparse

from perturbdiff_scvi._ondisk import is_on_disk, take_rows


@pytest.fixture(params=[True, False], ids=["sparse", "dense"])
def h5ad_path(tmp_path, request):
    adata = make_perturbation_adata(sparse_x=request.param)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_take_rows_keeps_order_and_repeats(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    memory = ad.read_h5ad(h5ad_path)
    assert is_on_disk(backed.X) and not is_on_disk(memory.X)
    rows = np.array([17, 3, 3, 200, 0, 17])
    got, want = take_rows(backed.X, rows), memory.X[rows]
    got = got.toarray() if sparse.issparse(got) else got
    want = want.toarray() if sparse.issparse(want) else want
    np.testing.assert_array_equal(got, want)
    backed.file.close()


def _fit(adata, seed=0):
    from perturbdiff_scvi import PerturbDiff

    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", context_key="ctx")
    torch.manual_seed(seed)
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN, datasplitter_kwargs={"seed": seed})
    return model


def test_backed_training_matches_in_memory_training(h5ad_path):
    backed = ad.read_h5ad(h5ad_path, backed="r")
    on_disk = _fit(backed)
    in_memory = _fit(ad.read_h5ad(h5ad_path))
    assert backed.isbacked and is_on_disk(backed.X)  # X was never loaded
    for (name, a), (_, b) in zip(
        on_disk.module.state_dict().items(), in_memory.module.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    loss = np.asarray(on_disk.history["train_loss"]).ravel()
    np.testing.assert_array_equal(loss, np.asarray(in_memory.history["train_loss"]).ravel())
    # prediction conditions on control cells read from the file, in the same order
    p_disk = on_disk.predict_population("A", contexts="c1", n_cells=20, seed=3)
    p_mem = in_memory.predict_population("A", contexts="c1", n_cells=20, seed=3)
    np.testing.assert_array_equal(p_disk.X, p_mem.X)
    backed.file.close()


def test_backed_layer_is_refused(tmp_path):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    adata.layers["lognorm"] = adata.X.copy()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match="backed AnnData keeps only X on disk"):
        PerturbDiff.setup_anndata(backed, perturbation_key="pert", control_value="ctrl", layer="lognorm")
    backed.file.close()
