"""What every peer runner shares: reading the job, choosing source control cells, writing the prediction.

Imports only numpy, pandas and anndata, so that it runs in any peer's venv. The job folder that
``benchmarks/peers.py`` writes holds:

- ``train.h5ad`` (or the path in ``job.json``'s ``train``, relative to the folder): the split's training cells
  (log-normalised ``X``, dense float32); ``obs`` has the perturbation, context and batch columns.
- ``job.json``: ``perturbation_key``, ``context_key`` (or null), ``batch_key`` (or null), ``control_value``,
  ``combination_delimiter`` (or null), ``seed``, ``threads``, ``settings`` (the peer's own options) and
  ``conditions``: a list of ``{"perturbation", "context", "batch", "n_cells"}`` to predict.

A runner writes ``pred.h5ad`` (all predicted cells; ``X`` log-normalised over the same ``var_names`` as
``train.h5ad``; ``obs`` columns named by the perturbation / context / batch keys) and ``result.json``
(``train_seconds``, ``predict_seconds``, ``settings`` as used, ``versions``, ``cannot``: the conditions the
peer cannot predict, each with its reason, and ``variants``: other samplings of the same trained model, each
``{name: file}`` shaped like ``pred.h5ad``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


def pin_threads(threads: int) -> None:
    """One BLAS / OpenMP / XLA thread pool of ``threads`` (set before the peer's libraries are imported)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[name] = str(threads)
    if threads == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


class Job:
    """The job folder ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        spec = json.loads((self.folder / "job.json").read_text())
        self.spec = spec
        self.pert_key: str = spec["perturbation_key"]
        self.context_key: str | None = spec.get("context_key")
        self.batch_key: str | None = spec.get("batch_key")
        self.control: str = str(spec["control_value"])
        self.delimiter: str | None = spec.get("combination_delimiter")
        self.seed: int = int(spec.get("seed", 0))
        self.threads: int = int(spec.get("threads", 1))
        self.settings: dict = dict(spec.get("settings", {}))
        self.conditions: list[dict] = list(spec["conditions"])
        self.cannot: list[dict] = []
        self.t0 = time.time()

    def read_train(self) -> ad.AnnData:
        train = ad.read_h5ad(self.folder / self.spec.get("train", "train.h5ad"))
        for key in self.obs_keys:
            train.obs[key] = train.obs[key].astype(str).astype("category")
        return train

    @property
    def obs_keys(self) -> list[str]:
        return [k for k in (self.pert_key, self.context_key, self.batch_key) if k]

    def components(self, perturbation: str) -> list[str]:
        """The single perturbations of a (possibly combined) perturbation."""
        if self.delimiter:
            return [p for p in str(perturbation).split(self.delimiter) if p]
        return [str(perturbation)]

    def where(self, adata: ad.AnnData, condition: dict, perturbation: str | None = None) -> np.ndarray:
        """Cells of ``adata`` in the condition's context and batch (and of ``perturbation`` when given)."""
        keep = np.ones(adata.n_obs, dtype=bool)
        if perturbation is not None:
            keep &= (adata.obs[self.pert_key].astype(str) == str(perturbation)).to_numpy()
        if self.context_key and condition.get("context") is not None:
            keep &= (adata.obs[self.context_key].astype(str) == str(condition["context"])).to_numpy()
        if self.batch_key and condition.get("batch") is not None:
            keep &= (adata.obs[self.batch_key].astype(str) == str(condition["batch"])).to_numpy()
        return keep

    def source_cells(self, train: ad.AnnData, condition: dict, rng: np.random.Generator) -> ad.AnnData:
        """``n_cells`` control cells of the condition's context (and batch): all of them, topped up by drawing
        with replacement when there are fewer, or a draw without replacement when there are more."""
        idx = np.flatnonzero(self.where(train, condition, self.control))
        if idx.size == 0:
            raise ValueError(f"no control cells in the training data for {condition}")
        n = int(condition["n_cells"])
        if idx.size >= n:
            pick = rng.choice(idx, size=n, replace=False)
        else:
            pick = np.concatenate([idx, rng.choice(idx, size=n - idx.size, replace=True)])
        source = train[np.sort(pick)].copy()
        source.obs_names_make_unique()
        return source

    def predictable(self, train: ad.AnnData, why_not) -> list[dict]:
        """The job's conditions the peer can predict. ``why_not(condition)`` returns the peer's own reason it cannot
        (or None); a condition without control cells of its context / batch in ``train`` cannot either. The others
        are marked "cannot" with their reason."""
        todo = []
        for cond in self.conditions:
            reason = why_not(cond)
            if reason is None and not self.where(train, cond, self.control).any():
                reason = "no control cells of the condition's context/batch in training"
            if reason is None:
                todo.append(cond)
            else:
                self.mark_cannot(cond, reason)
        return todo

    def mark_cannot(self, condition: dict, reason: str) -> None:
        self.cannot.append({**condition, "reason": reason})
        print(f"cannot predict {condition}: {reason}", file=sys.stderr, flush=True)

    def prediction(self, X, var_names, condition: dict) -> ad.AnnData:
        """A prediction AnnData for one condition: ``X`` (cells x genes) with the job's obs columns."""
        X = np.asarray(X, dtype=np.float32)
        obs = {self.pert_key: [str(condition["perturbation"])] * X.shape[0]}
        if self.context_key:
            obs[self.context_key] = [str(condition.get("context"))] * X.shape[0]
        if self.batch_key:
            obs[self.batch_key] = [str(condition.get("batch"))] * X.shape[0]
        out = ad.AnnData(X, obs=pd.DataFrame(obs, index=[f"pred{i}" for i in range(X.shape[0])]))
        out.var_names = list(var_names)
        return out

    def _write_h5ad(self, preds: list[ad.AnnData], name: str) -> None:
        pred = ad.concat(preds, index_unique="-")
        for key in self.obs_keys:
            pred.obs[key] = pred.obs[key].astype("category")
        pred.write_h5ad(self.folder / name)

    def write(
        self, preds: list[ad.AnnData], train_seconds: float, predict_seconds: float, packages, variants=None
    ) -> None:
        """``pred.h5ad`` and ``result.json`` (see the module docstring); ``variants``: ``{name: [AnnData]}``."""
        if preds:
            self._write_h5ad(preds, "pred.h5ad")
        files = {}
        for i, (name, vpreds) in enumerate((variants or {}).items()):
            files[name] = f"pred_variant{i}.h5ad"
            self._write_h5ad(vpreds, files[name])
        versions = {}
        for name in packages:
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                versions[name] = None
        versions["python"] = sys.version.split()[0]
        result = {
            "train_seconds": round(train_seconds, 2),
            "predict_seconds": round(predict_seconds, 2),
            "total_seconds": round(time.time() - self.t0, 2),
            "settings": self.settings,
            "threads": self.threads,
            "versions": versions,
            "cannot": self.cannot,
            "variants": files,
        }
        (self.folder / "result.json").write_text(json.dumps(result, indent=2, default=str))
