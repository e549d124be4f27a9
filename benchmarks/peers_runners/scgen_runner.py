"""scGen runner (pertpy's ``pt.tl.Scgen``, JAX): VAE latent arithmetic, as in pertpy's scGen tutorial.

Run by ``benchmarks/peers.py`` as ``<scgen venv>/bin/python scgen_runner.py JOB_FOLDER`` (see ``_common.py``).
Tutorial settings (pertpy "scGen" perturbation-prediction notebook on Kang 2018): ``setup_anndata(batch_key=
<perturbation key>, labels_key=<context key>)``, ``Scgen(adata)`` with its defaults (800 hidden, 100 latent,
2 layers, dropout 0.2), ``train(max_epochs=100, batch_size=32, early_stopping=True,
early_stopping_patience=25)``; ``predict(ctrl_key=<control>, stim_key=<perturbation>, adata_to_predict=<the
context's control cells, resampled to n_cells>)``, the same as ``celltype_to_predict`` but with the number of cells
of the real held-out set. ``X`` of the prediction is the decoder's mean (log-normalised space, as the input).

scGen shifts a cell type by the latent difference between two conditions that it saw in other cell types, so it
"cannot" predict: a perturbation absent from training (an unseen combination included), or a task with no
context column (one cell line).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Job, pin_threads

DEFAULTS = {"max_epochs": 100, "batch_size": 32, "early_stopping": True, "early_stopping_patience": 25}


def main(folder: str) -> None:
    job = Job(folder)
    pin_threads(job.threads)
    import numpy as np

    s = job.settings = {**DEFAULTS, **job.settings}
    rng = np.random.default_rng(job.seed)
    train = job.read_train()
    trained = set(train.obs[job.pert_key].astype(str)) - {job.control}

    def why_not(cond: dict) -> str | None:
        if job.context_key is None:
            return "scGen transfers a perturbation across cell types; this task has no context column"
        if str(cond["perturbation"]) not in trained:
            return "perturbation never seen in training (scGen needs its cells in other contexts)"
        return None

    todo = job.predictable(train, why_not)
    if not todo:
        job.write([], 0.0, 0.0, ["pertpy", "scvi-tools", "jax", "flax", "anndata"])
        return

    import jax
    import pertpy as pt
    import scvi

    scvi.settings.seed = job.seed
    scvi.settings.num_threads = job.threads
    fit = train.copy()
    del fit.layers  # scGen models X
    pt.tl.Scgen.setup_anndata(fit, batch_key=job.pert_key, labels_key=job.context_key)
    model = pt.tl.Scgen(fit)
    t0 = time.time()
    model.train(
        max_epochs=int(s["max_epochs"]),
        batch_size=int(s["batch_size"]),
        early_stopping=bool(s["early_stopping"]),
        early_stopping_patience=int(s["early_stopping_patience"]),
        accelerator="cpu",
        enable_progress_bar=False,
    )
    train_seconds = time.time() - t0
    s["epochs_run"] = int(model.history["elbo_train"].shape[0]) if "elbo_train" in model.history else None
    s["jax_devices"] = [str(d) for d in jax.devices()]

    t0 = time.time()
    preds = []
    for cond in todo:
        source = job.source_cells(train, cond, rng)
        del source.layers
        pred, _ = model.predict(ctrl_key=job.control, stim_key=str(cond["perturbation"]), adata_to_predict=source)
        X = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
        preds.append(job.prediction(X, train.var_names, cond))
    job.write(preds, train_seconds, time.time() - t0, ["pertpy", "scvi-tools", "jax", "flax", "anndata"])


if __name__ == "__main__":
    main(sys.argv[1])
