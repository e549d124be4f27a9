"""Faults (Ctrl+C in training, interrupted save, corrupt or mismatched load) and reproducibility."""

from __future__ import annotations

import signal

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _helpers import TINY, TINY_TRAIN, make_perturbation_adata, seeded


class _InterruptAt(pl.Callback):
    """Raise KeyboardInterrupt (what Ctrl+C does) after ``step`` optimisation steps, keeping a weight snapshot."""

    def __init__(self, step: int):
        self.step = step
        self.snapshot = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.snapshot = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
            raise KeyboardInterrupt


def _setup(adata=None):
    from perturbdiff_scvi import PerturbDiff

    adata = make_perturbation_adata() if adata is None else adata
    PerturbDiff.setup_anndata(
        adata, perturbation_key="pert", control_value="ctrl", context_key="ctx", batch_key="batch"
    )
    return adata


def test_keyboard_interrupt_leaves_usable_model(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = _setup()
    model = PerturbDiff(adata, **TINY)
    handler_before = signal.getsignal(signal.SIGINT)
    stop = _InterruptAt(3)
    with pytest.warns(UserWarning, match="interrupted after 3 optimisation steps"):
        model.train(**{**TINY_TRAIN, "max_steps": 50}, callbacks=[stop])
    assert signal.getsignal(signal.SIGINT) is handler_before  # Lightning had set SIG_IGN
    assert model.is_trained and not model.module.training
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, stop.snapshot[key]), key  # the weights of the last completed step
    pred = model.predict_population("A", n_cells=4, seed=0, n_steps=3)
    assert np.isfinite(pred.X).all()
    model.train(**TINY_TRAIN)  # and training can go on
    assert model.is_trained


def test_other_errors_in_training_still_raise(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    class _Boom(pl.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    model = PerturbDiff(_setup(), **TINY)
    with pytest.raises(RuntimeError, match="boom"):
        model.train(**TINY_TRAIN, callbacks=[_Boom()])


def test_save_is_atomic(shared_model, tmp_path, monkeypatch):
    from perturbdiff_scvi import PerturbDiff

    target = tmp_path / "model"
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        shared_model.save(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind

    monkeypatch.setattr(torch, "save", real_save)
    shared_model.save(target)
    before = shared_model.predict_population("A", n_cells=5, seed=0, n_steps=3)
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        shared_model.save(target, overwrite=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    after = PerturbDiff.load(target, adata=make_perturbation_adata()).predict_population(
        "A", n_cells=5, seed=0, n_steps=3
    )
    np.testing.assert_array_equal(before.X, after.X)  # the old model survived intact


def test_save_refuses_to_overwrite_without_flag(shared_model, tmp_path):
    shared_model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        shared_model.save(tmp_path / "m")


def test_load_missing_or_corrupt(shared_model, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerturbDiff.load(tmp_path / "nope", adata=make_perturbation_adata())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a folder written by PerturbDiff.save"):
        PerturbDiff.load(tmp_path / "empty", adata=make_perturbation_adata())
    shared_model.save(tmp_path / "m")
    model_file = tmp_path / "m" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        PerturbDiff.load(tmp_path / "m", adata=make_perturbation_adata())


def test_load_with_mismatched_adata(shared_model, tmp_path):
    from perturbdiff_scvi import PerturbDiff

    shared_model.save(tmp_path / "m")
    fewer = make_perturbation_adata()[:, 1:].copy()
    with pytest.raises(ValueError, match="29 genes but the model was trained on 30"):
        PerturbDiff.load(tmp_path / "m", adata=fewer)
    reordered = make_perturbation_adata()
    reordered = reordered[:, reordered.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="another order"):
        PerturbDiff.load(tmp_path / "m", adata=reordered)
    new_category = make_perturbation_adata()
    new_category.obs["pert"] = new_category.obs["pert"].replace({"B": "C"})
    with pytest.raises(ValueError, match="does not match the saved model.*Category C"):
        PerturbDiff.load(tmp_path / "m", adata=new_category)


def test_training_is_reproducible_on_cpu(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    preds = []
    for _ in range(2):
        with seeded(7):  # scvi.settings.seed = 7, put back afterwards
            model = PerturbDiff(_setup(), **TINY)
            model.train(**TINY_TRAIN)
        preds.append(model.predict_population("B", n_cells=6, seed=1, n_steps=4).X)
    np.testing.assert_array_equal(preds[0], preds[1])
    other = model.predict_population("B", n_cells=6, seed=2, n_steps=4).X
    assert not np.array_equal(preds[1], other)
