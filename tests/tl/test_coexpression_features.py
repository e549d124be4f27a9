"""``coexpression_features``: each target's correlation profile over the control cells (``tl/_features.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import make_perturbation_adata

from perturbdiff_scvi.tl import coexpression_features


def test_profiles_are_correlations_over_control_cells():
    adata = make_perturbation_adata()
    feats = coexpression_features(adata, ["gene3", "gene0"], perturbation_key="pert", control_value="ctrl")
    assert list(feats.index) == ["gene3", "gene0"] and list(feats.columns) == list(adata.var_names)
    assert feats.dtypes.unique().tolist() == [np.float32]
    ctrl = adata[adata.obs["pert"] == "ctrl"].X.toarray()
    np.testing.assert_allclose(feats.loc["gene0", "gene7"], np.corrcoef(ctrl[:, 0], ctrl[:, 7])[0, 1], atol=1e-5)
    np.testing.assert_allclose(feats.loc["gene3", "gene3"], 1.0, atol=1e-6)
    some = coexpression_features(adata, "gene1", genes=["gene2", "gene1"])  # every cell, two columns
    assert some.shape == (1, 2)


def test_unmeasured_targets_are_listed_or_dropped():
    adata = make_perturbation_adata()
    with pytest.raises(ValueError, match=r"not measured in adata \['KLF1', 'GATA1'\]"):
        coexpression_features(adata, ["gene0", "KLF1", "GATA1"], perturbation_key="pert", control_value="ctrl")
    with pytest.warns(UserWarning, match="left out"):
        feats = coexpression_features(adata, ["gene0", "KLF1"], on_missing="drop")
    assert list(feats.index) == ["gene0"]
    with pytest.raises(ValueError, match="Give both perturbation_key and control_value"):
        coexpression_features(adata, ["gene0"], perturbation_key="pert")
    with pytest.raises(ValueError, match="not in adata.var_names"):
        coexpression_features(adata, ["gene0"], genes=["nope"])
