"""Combinatorial perturbations (``combination_delimiter``): splitting, embedding, unseen A+B at prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, seeded
from anndata import AnnData

from perturbdiff_scvi._combinations import PerturbationVocabulary, split_combination
from perturbdiff_scvi.nn._dit import CovariateEmbedder


def test_split_combination_is_order_free_and_drops_the_control():
    assert split_combination("B+A", "+", "ctrl") == ("A", "B")
    assert split_combination(" A + B ", "+", "ctrl") == ("A", "B")
    assert split_combination("ctrl+A", "+", "ctrl") == ("A",)
    assert split_combination("ctrl", "+", "ctrl") == ()
    with pytest.raises(ValueError, match="empty component"):
        split_combination("A++B", "+", "ctrl")


def test_vocabulary_matrix_and_unknown_component_error():
    vocab = PerturbationVocabulary(["A", "A+B", "ctrl", "C"], "+", "ctrl")
    assert vocab.components == ["A", "B", "C"]
    np.testing.assert_array_equal(vocab.matrix, [[0, -1], [0, 1], [-1, -1], [2, -1]])
    np.testing.assert_array_equal(vocab.codes("C+A", {"A", "B", "C"}, "pert"), [0, 2])
    with pytest.raises(ValueError, match=r"'Bx' never occurs.*Close matches: \['B'\]"):
        vocab.codes("A+Bx", {"A", "B", "C"}, "pert")
    with pytest.raises(ValueError, match="'C' occurs only in labels without cells"):
        vocab.codes("A+C", {"A", "B"}, "pert")


def test_embedder_sums_components_and_embeds_the_control_as_zero():
    emb = CovariateEmbedder(3, 1, 1, n_hidden=8, n_cov=4, n_cov_hidden=8)
    pert = torch.tensor([[0, 1], [1, 0], [2, -1], [-1, -1]])
    out = emb.embed_perturbation(pert)
    table = emb.perturbation.weight
    torch.testing.assert_close(out[0], table[0] + table[1])
    torch.testing.assert_close(out[1], out[0])  # order-free
    torch.testing.assert_close(out[2], table[2])
    torch.testing.assert_close(out[3], torch.zeros(4))
    torch.testing.assert_close(emb.embed_perturbation(torch.tensor([2])), table[2:3])


def _combination_adata(seed: int = 0) -> AnnData:
    """A raises genes 0-4, B lowers genes 5-9; labels ctrl, A, B (no A+B)."""
    adata = make_perturbation_adata(n_cells=360, seed=seed, sparse_x=False)
    adata.obs["pert"] = adata.obs["pert"].astype(str)
    return adata


@pytest.mark.slow  # 400 training steps
def test_unseen_combination_is_generated_from_its_components(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = _combination_adata()
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", combination_delimiter="+")
    with seeded(0):  # the weights do not depend on the tests that ran before
        model = PerturbDiff(adata, **{**TINY, "set_size": 16, "n_hidden": 32, "n_cov": 16})
        assert model.module.perturbation_components.shape == (3, 1)
        model.train(**{**TINY_TRAIN, "max_steps": 400, "sets_per_batch": 8})
    pred = model.predict_population(["A+B", "ctrl"], n_cells=128, seed=0, guidance_scale=0.0)
    assert list(pred.obs["pert"].cat.categories) == ["ctrl", "A+B"]
    x = np.asarray(pred.X)
    combo, ctrl = x[(pred.obs["pert"] == "A+B").to_numpy()], x[(pred.obs["pert"] == "ctrl").to_numpy()]
    delta = combo.mean(0) - ctrl.mean(0)
    # Both components' effects show up in the never-seen combination.
    assert delta[:5].mean() > 0.3, delta[:5]
    assert delta[5:10].mean() < -0.3, delta[5:10]
    assert np.abs(delta[10:]).mean() < 0.5 * min(delta[:5].mean(), -delta[5:10].mean())


def test_combination_model_round_trips_and_rejects_unknown_components(scvi_module, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    adata = _combination_adata()
    adata.obs.loc[adata.obs_names[:40], "pert"] = "A+B"  # a registered combination
    PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", combination_delimiter="+")
    model = PerturbDiff(adata, **TINY)
    model.train(**TINY_TRAIN)
    assert model.get_setup_arg("combination_delimiter") == "+"
    pred = model.predict_population(["B+A", "A+B"], n_cells=5, seed=1)
    # "B+A" is the same set of components as the registered "A+B": same seed, same population.
    swapped = model.predict_population("B+A", n_cells=5, seed=3)
    np.testing.assert_allclose(swapped.X, model.predict_population("A+B", n_cells=5, seed=3).X)
    model.save(tmp_path / "m", save_anndata=True)
    again = PerturbDiff.load(tmp_path / "m").predict_population(["B+A", "A+B"], n_cells=5, seed=1)
    np.testing.assert_allclose(again.X, pred.X)
    with pytest.raises(ValueError, match="component 'Q' never occurs"):
        model.predict_population("A+Q", n_cells=5)


def test_without_delimiter_a_combination_is_an_unknown_label(shared_model):
    with pytest.raises(ValueError, match="Unknown perturbation 'A\\+B'"):
        shared_model.predict_population("A+B", n_cells=5)


@pytest.mark.parametrize(
    ("labels", "delimiter", "match"),
    [
        (["ctrl", "A", "A++B"], "+", "empty component"),
        (["ctrl", "A", "B"], "", "combination_delimiter must be a non-empty string"),
        (["ctrl", "A", "ctrl+ctrl"], "+", "no component other than the control"),
    ],
)
def test_setup_rejects_bad_combination_labels(scvi_module, labels, delimiter, match):
    from perturbdiff_scvi import PerturbDiff

    adata = _combination_adata()
    adata.obs["pert"] = pd.Categorical(np.resize(labels, adata.n_obs))
    before = adata.obs.copy()
    with pytest.raises(ValueError, match=match):
        PerturbDiff.setup_anndata(adata, perturbation_key="pert", control_value="ctrl", combination_delimiter=delimiter)
    pd.testing.assert_frame_equal(adata.obs, before)
