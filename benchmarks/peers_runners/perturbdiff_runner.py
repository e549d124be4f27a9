"""PerturbDiff runner: the package defaults, trained and sampled like any peer (same job folder, same output).

Run by ``benchmarks/peers.py`` as ``<this venv>/bin/python perturbdiff_runner.py JOB_FOLDER`` (see ``_common.py``),
so that PerturbDiff's train time is measured the way the peers' are, in a process of its own with the same thread
count. ``PerturbDiff.setup_anndata`` with the job's keys (``combination_delimiter`` for combinations),
``PerturbDiff(adata)`` and ``train()`` with the package defaults (``settings["max_steps"]`` overrides the step
count, ``settings["options"]`` is a dict of :class:`~perturbdiff_scvi.model.DiffusionOptions` for an ablation,
``settings["precision"]`` the trainer's precision, e.g. ``"bf16-mixed"``, ``settings["train"]`` more keywords of
``train()``, e.g. ``{"lr": 2e-3, "sets_per_batch": 4}``);
``predict_population`` with its defaults for ``pred.h5ad``, and ``guidance_scale=0`` from the same trained
model as the variant ``PerturbDiff (guidance 0)``, and ``guidance_scale="auto"`` as ``PerturbDiff (guidance
auto)``. The trained model is saved to ``<job folder>/model``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Job, pin_threads

DEFAULTS = {"max_steps": None, "options": {}, "precision": None, "train": {}}
VARIANTS = {
    "PerturbDiff (guidance 0)": {"guidance_scale": 0.0},
    "PerturbDiff (guidance auto)": {"guidance_scale": "auto"},
}


def main(folder: str) -> None:
    job = Job(folder)
    pin_threads(job.threads)
    import numpy as np
    import scvi
    import torch

    from perturbdiff_scvi import PerturbDiff
    from perturbdiff_scvi.model import DiffusionOptions

    torch.set_num_threads(job.threads)
    s = job.settings = {**DEFAULTS, **job.settings}
    train = job.read_train()
    PerturbDiff.setup_anndata(
        train,
        perturbation_key=job.pert_key,
        control_value=job.control,
        context_key=job.context_key,
        batch_key=job.batch_key,
        combination_delimiter=job.delimiter,
    )
    scvi.settings.seed = job.seed
    model = PerturbDiff(train, options=DiffusionOptions(**s["options"]) if s["options"] else None)
    t0 = time.time()
    extra = {"precision": s["precision"]} if s["precision"] else {}
    extra.update(s["train"])
    model.train(max_steps=s["max_steps"], enable_progress_bar=False, **extra)
    train_seconds = time.time() - t0
    s["train_steps"] = int(model.trainer.global_step)

    t0 = time.time()
    preds, variants = [], {name: [] for name in VARIANTS}
    for cond in job.conditions:
        where = {"n_cells": int(cond["n_cells"]), "seed": job.seed}
        if job.context_key:
            where["contexts"] = str(cond["context"])
        if job.batch_key and cond.get("batch") is not None:
            where["batches"] = str(cond["batch"])
        for name, options in [(None, {}), *VARIANTS.items()]:
            out = model.predict_population(str(cond["perturbation"]), **where, **options)
            X = out.X.toarray() if hasattr(out.X, "toarray") else np.asarray(out.X)
            (preds if name is None else variants[name]).append(job.prediction(X, train.var_names, cond))
    job.write(preds, train_seconds, time.time() - t0, ["perturbdiff-scvi", "scvi-tools", "torch"], variants)
    # the trained model stays in the job folder (not committed), so that prediction options can be compared later
    # without training again: PerturbDiff.load(f"{folder}/model", adata=train)
    model.save(str(Path(folder) / "model"), overwrite=True)


if __name__ == "__main__":
    main(sys.argv[1])
