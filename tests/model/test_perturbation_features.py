"""Perturbations described by features (``setup_anndata(perturbation_features=...)``): checks, encoder, unseen ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, seeded

from perturbdiff_scvi._perturbation_features import FeatureVocabulary, check_perturbation_features
from perturbdiff_scvi.nn import FeatureEncoder


def _features(names=("A", "B", "C"), seed: int = 0, n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        np.random.default_rng(seed).normal(size=(len(names), n)), index=list(names), columns=[f"f{i}" for i in range(n)]
    )


def test_feature_encoder_centres_scales_and_encodes_rows():
    table = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    enc = FeatureEncoder(table, n_cov=3)
    # centred, then divided by the RMS of the whole centred table (sqrt(8 / 6)): one scale for all columns
    torch.testing.assert_close(enc.features[:, 0], torch.tensor([-1.7321, 0.0, 1.7321]), atol=1e-4, rtol=0)
    torch.testing.assert_close(enc.features[:, 1], torch.zeros(3))  # a constant column becomes 0
    torch.testing.assert_close(enc(torch.tensor([2, 0])), enc.mlp(enc.features[[2, 0]]))
    assert "features" not in enc.state_dict()  # the model stores the table in its setup arguments
    with pytest.raises(ValueError, match="non-empty 2-d table"):
        FeatureEncoder(torch.zeros(0, 3), n_cov=3)


def test_feature_vocabulary_maps_labels_and_combinations_to_rows():
    table = check_perturbation_features(_features(("B", "A", "C")), ["ctrl", "A", "B+A"], "+", "ctrl", "pert")
    vocab = FeatureVocabulary(["A", "A+B", "ctrl"], table, "+", "ctrl")
    assert vocab.components == ["B", "A", "C"]
    np.testing.assert_array_equal(vocab.matrix, [[1, -1], [1, 0], [-1, -1]])
    np.testing.assert_array_equal(vocab.codes("C+A", set(), "pert"), [1, 2])  # no training needed, only a row
    with pytest.raises(ValueError, match="'Q' has no row in perturbation_features"):
        vocab.codes("A+Q", {"A"}, "pert")


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        (np.zeros((3, 2)), TypeError, "must be a pandas DataFrame"),
        (pd.DataFrame(index=["A", "B"]), ValueError, "is empty"),
        (pd.DataFrame({"f": [1.0, 2.0, 3.0]}, index=["A", "B", "A"]), ValueError, r"duplicate index entries \['A'\]"),
        (pd.DataFrame({"f": [1.0, 2.0], "g": ["x", "y"]}, index=["A", "B"]), ValueError, r"non-numeric columns"),
        (pd.DataFrame({"f": [1.0, np.nan]}, index=["A", "B"]), ValueError, r"NaN or infinite values in rows \['B'\]"),
        (pd.DataFrame({"f": [1.0, 2.0]}, index=["A", "C"]), ValueError, r"no row for the training perturbations \['B"),
    ],
)
def test_setup_rejects_bad_feature_tables(scvi_module, features, error, match):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    before = adata.obs.copy()
    with pytest.raises(error, match=match):
        PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", perturbation_features=features)
    pd.testing.assert_frame_equal(adata.obs, before)


def test_combination_features_need_component_rows(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    adata.obs["pert"] = adata.obs["pert"].astype(str).replace({"B": "A+D"})
    with pytest.raises(ValueError, match=r"no row for the training components \['D'\]"):
        PerturbDiff.setup_anndata(
            adata, perturbation_key="pert", control_value="ctrl", combination_delimiter="+",
            perturbation_features=_features(("A", "B")),
        )  # fmt: skip


def test_unseen_perturbation_is_predicted_from_features_and_survives_save_load(scvi_module, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    table = _features(("A", "B", "C"))
    PerturbDiff.setup_anndata(
        adata, perturbation_key="pert", control_value="ctrl", context_key="ctx", perturbation_features=table
    )
    table.iloc[:, :] = 0.0  # setup keeps its own copy
    model = PerturbDiff(adata, **TINY)
    assert isinstance(model.module.denoiser.cov_embed.perturbation, FeatureEncoder)
    np.testing.assert_array_equal(model.module.perturbation_components.numpy().ravel(), [0, 1, -1])
    model.train(**TINY_TRAIN)
    pred = model.predict_population(["C", "A"], n_cells=6, seed=0)  # C has no training cells
    assert list(pred.obs["pert"].cat.categories) == ["A", "C"]
    emb = model.get_perturbation_embedding()
    assert list(emb.obs_names) == ["A", "B", "ctrl", "C"]
    assert emb.obs["in_training"].tolist() == [True, True, True, False]
    np.testing.assert_array_equal(emb["ctrl"].X, 0)
    with pytest.raises(ValueError, match="'Q' has no row in perturbation_features"):
        model.predict_population("Q", n_cells=4)
    model.save(tmp_path / "m")
    loaded = PerturbDiff.load(tmp_path / "m", adata=adata)
    stored = loaded.get_setup_arg("perturbation_features")
    assert stored.shape == (3, 4) and np.abs(stored.to_numpy()).sum() > 0
    np.testing.assert_array_equal(loaded.predict_population(["C", "A"], n_cells=6, seed=0).X, pred.X)


def test_combination_with_features_is_the_sum_of_its_parts(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata()
    adata.obs["pert"] = adata.obs["pert"].astype(str)
    PerturbDiff.setup_anndata(
        adata, perturbation_key="pert", control_value="ctrl", combination_delimiter="+",
        perturbation_features=_features(("A", "B", "E")),
    )  # fmt: skip
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    emb = model.get_perturbation_embedding(["A", "E", "A+E"])
    np.testing.assert_allclose(emb["A+E"].X, emb["A"].X + emb["E"].X, rtol=1e-5, atol=1e-6)
    pred = model.predict_population("A+E", n_cells=4, seed=0)  # E never measured, alone or combined
    assert pred.n_obs == 4


@pytest.mark.slow  # 300 training steps
def test_unseen_perturbation_follows_its_features(scvi_module):
    """A raises genes 0-4 and B lowers genes 5-9; C (never measured) has features next to A's."""
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata(n_cells=360, sparse_x=False)
    table = pd.DataFrame({"f0": [1.0, -1.0, 0.9], "f1": [0.0, 0.0, 0.1]}, index=["A", "B", "C"])
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", perturbation_features=table)
    with seeded(0):  # the weights do not depend on the tests that ran before
        model = PerturbDiff(adata, **{**TINY, "set_size": 16, "n_hidden": 32, "n_cov": 16})
        model.train(**{**TINY_TRAIN, "max_steps": 300, "sets_per_batch": 8})
    pred = model.predict_population(["A", "B", "C", "ctrl"], n_cells=96, seed=0, guidance_scale=0.0)
    x = np.asarray(pred.X)
    mean = {p: x[(pred.obs["pert"] == p).to_numpy()].mean(0) for p in ("A", "B", "C", "ctrl")}
    delta = {p: mean[p] - mean["ctrl"] for p in ("A", "B", "C")}
    assert delta["C"][:5].mean() > 0.3, delta["C"][:5]  # A's up-regulation, never trained for C
    assert delta["C"][:5].mean() > 2 * abs(delta["C"][5:10].mean()), delta["C"][:10]  # mostly not B's genes
    assert np.corrcoef(delta["C"], delta["A"])[0, 1] > np.corrcoef(delta["C"], delta["B"])[0, 1] + 0.5
