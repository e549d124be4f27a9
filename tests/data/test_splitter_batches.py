"""Real SetDataSplitter batches, from a registered AnnData whose expression encodes each cell's row: the
``[P1, C1, P2, C2, ...]`` layout, pure perturbed sets, matched controls (with the documented fallback), and that
the module reads them as such."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData

from perturbdiff_scvi._constants import PDIFF_KEYS
from perturbdiff_scvi.data import SetDataSplitter, registered_codes
from perturbdiff_scvi.model import DiffusionOptions

S = 4
KEYS = {"perturbation_key": "pert", "control_value": "ctrl", "context_key": "ctx", "batch_key": "batch"}


def _encoded_adata() -> AnnData:
    """Gene 0 of cell ``i`` is ``0.01 * i + 0.005`` (so every row is recoverable); the other genes are noise.

    Control cells exist for (c0, b0), (c0, b1) and (c1, b0) only: (c1, b1) must fall back to the same context in
    another batch, and c2 (no controls at all) to the same batch in other contexts.
    """
    rng = np.random.default_rng(0)
    cells = []
    for ctx, batch, n_ctrl in [("c0", "b0", 9), ("c0", "b1", 7), ("c1", "b0", 6), ("c1", "b1", 0), ("c2", "b0", 0)]:
        cells += [("ctrl", ctx, batch)] * n_ctrl
        cells += [("A", ctx, batch)] * int(rng.integers(5, 11)) + [("B", ctx, batch)] * int(rng.integers(3, 9))
    cells += [("A", "c2", "b1")] * 6
    order = rng.permutation(len(cells))
    obs = pd.DataFrame([cells[i] for i in order], columns=["pert", "ctx", "batch"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    x = rng.uniform(0.1, 3.0, size=(len(obs), 5)).astype(np.float32)
    x[:, 0] = 0.01 * np.arange(len(obs)) + 0.005
    return AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))


def _rows(x: torch.Tensor) -> np.ndarray:
    return np.rint((x[:, 0].double().numpy() - 0.005) / 0.01).astype(np.int64)


def _expected_pool(obs: pd.DataFrame, ctx: str, batch: str) -> set[int]:
    """The documented control matching: same (context, batch); else same context, other batches; else same batch,
    other contexts; else all controls (PerturbDiff.setup_anndata)."""
    ctrl = (obs["pert"] == "ctrl").to_numpy()
    for mask in (
        (obs["ctx"] == ctx) & (obs["batch"] == batch),
        obs["ctx"] == ctx,
        obs["batch"] == batch,
        np.ones(len(obs), dtype=bool),
    ):
        rows = np.flatnonzero(ctrl & np.asarray(mask))
        if len(rows):
            return set(rows.tolist())
    raise AssertionError("no controls")


@pytest.fixture
def registered(scvi_module):
    from perturbdiff_scvi import PerturbDiff

    adata = _encoded_adata()
    PerturbDiff.setup_anndata(adata, **KEYS)
    model = PerturbDiff(
        adata, set_size=S, n_hidden=16, depth=1, n_heads=2, n_cov=8, options=DiffusionOptions(n_timesteps=20)
    )
    return adata, model


def _control_code(model) -> int:
    mapping = list(model.adata_manager.get_state_registry(PDIFF_KEYS.PERT_KEY).categorical_mapping)
    return mapping.index("ctrl")


def _check_batch(batch: dict, adata: AnnData, model, allowed_targets: set[int]) -> list[int]:
    """Layout, identities and codes of one served batch; returns the rows of its perturbed sets."""
    obs = adata.obs
    x = batch[PDIFF_KEYS.X_KEY]
    assert x.shape[0] % (2 * S) == 0
    rows = _rows(x)
    np.testing.assert_array_equal(x.numpy(), adata.X[rows])  # every row is that cell's whole expression
    for key, col in ((PDIFF_KEYS.PERT_KEY, "pert"), (PDIFF_KEYS.CONTEXT_KEY, "ctx"), (PDIFF_KEYS.BATCH_KEY, "batch")):
        codes = batch[key].reshape(-1).long().numpy()
        mapping = model.adata_manager.get_state_registry(key).categorical_mapping
        np.testing.assert_array_equal(mapping[codes], obs[col].to_numpy()[rows])  # codes are those cells' codes
    targets = []
    for p_rows, c_rows in rows.reshape(-1, 2, S):
        p_obs, c_obs = obs.iloc[p_rows][["pert", "ctx", "batch"]], obs.iloc[c_rows]
        assert len(p_obs.drop_duplicates()) == 1, p_obs  # one (perturbation, context, batch) per set
        _, ctx, batch_label = p_obs.iloc[0]
        assert (c_obs["pert"] == "ctrl").all()
        assert set(c_rows.tolist()) <= _expected_pool(obs, ctx, batch_label), (ctx, batch_label)
        assert set(p_rows.tolist()) <= allowed_targets
        targets.extend(p_rows.tolist())
    return targets


def test_splitter_batches_layout_identities_and_control_matching(registered):
    adata, model = registered
    with pytest.warns(UserWarning, match="no control cells") as record:
        splitter = SetDataSplitter(
            model.adata_manager,
            _control_code(model),
            set_size=S,
            sets_per_batch=3,
            validation_size=0.2,
            split="set",
            train_on_controls=True,
            seed=0,
        )
    message = next(str(w.message) for w in record if "no control cells" in str(w.message))
    assert "(context='c1', batch='b1') -> same_context" in message
    assert "(context='c2', batch='b0') -> same_batch" in message
    train, val = set(splitter.train_idx.tolist()), set(splitter.val_idx.tolist())
    assert train and val and not train & val
    served = []
    for batch in splitter.train_dataloader():
        served += _check_batch(batch, adata, model, train)
    assert set(served) == train  # an epoch serves every training cell
    val_served = [r for batch in splitter.val_dataloader() for r in _check_batch(batch, adata, model, val)]
    assert set(val_served) == val
    # the fallback pools are really used: c1/b1 sets get c1/b0 controls, c2/b0 sets b0 controls of c0 and c1
    obs = adata.obs
    used = {}
    for batch in splitter.train_dataloader():
        for p_rows, c_rows in _rows(batch[PDIFF_KEYS.X_KEY]).reshape(-1, 2, S):
            key = tuple(obs.iloc[p_rows[0]][["ctx", "batch"]])
            used.setdefault(key, set()).update(map(tuple, obs.iloc[c_rows][["ctx", "batch"]].to_numpy()))
    assert used[("c1", "b1")] == {("c1", "b0")}
    assert used[("c2", "b0")] <= {("c0", "b0"), ("c1", "b0")} and used[("c2", "b1")] == {("c0", "b1")}


class _Capture(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.detach().clone() for k, v in batch.items()})


def test_training_batches_reach_the_denoiser_as_matched_sets(registered):
    """In a real train() run: what the denoiser gets as controls and codes is the served control block and the
    perturbed block's codes (the module unpacks the splitter's layout, with input_scale applied)."""
    from perturbdiff_scvi import PerturbDiff

    adata, _ = registered
    model = PerturbDiff(
        adata,
        set_size=S,
        n_hidden=16,
        depth=1,
        n_heads=2,
        n_cov=8,
        options=DiffusionOptions(n_timesteps=20, input_scale=2.0, p_self_cond=0.0),
    )
    seen = []
    model.module.denoiser.register_forward_hook(lambda net, args, out: seen.append([a.detach() for a in args[:6]]))
    capture = _Capture()
    with pytest.warns(UserWarning, match="no control cells"):
        model.train(max_steps=3, sets_per_batch=3, validation_size=0.0, enable_progress_bar=False, callbacks=[capture])
    assert len(seen) == len(capture.batches) == 3
    code_of = dict(zip(("perturbation", "context", "batch"), registered_codes(model.adata_manager), strict=True))
    for batch, (_, _, x_ctrl, pert, ctx, b) in zip(capture.batches, seen, strict=True):
        _check_batch(batch, adata, model, set(range(adata.n_obs)))
        rows = _rows(batch[PDIFF_KEYS.X_KEY]).reshape(-1, 2, S)
        np.testing.assert_array_equal((2.0 * x_ctrl).numpy(), adata.X[rows[:, 1]])  # the control block of each set
        for name, got in (("perturbation", pert), ("context", ctx), ("batch", b)):
            np.testing.assert_array_equal(got.numpy(), code_of[name][rows[:, 0, 0]])  # the perturbed block's codes
