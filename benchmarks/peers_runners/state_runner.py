"""STATE runner (``arc-state``, the State Transition model ``ST``): set-to-set transformer trained with its CLI code.

Run by ``benchmarks/peers.py`` as ``<state venv>/bin/python state_runner.py JOB_FOLDER`` (see ``_common.py``).
STATE is a Hydra / Lightning CLI (``state tx train ...``, ``state tx infer ...``). This runner calls the same
functions the CLI calls, in-process: the Hydra config ``state.configs/config.yaml`` composed with overrides, then
``state._cli._tx._train.run_tx_train(cfg)``; prediction with ``state._cli._tx._infer.run_tx_infer(args)`` on a
control template, as its README's ``state tx infer`` does. Settings follow the README / Virtual Cell Challenge
tutorial (``model=state_sm``, HVG matrix in ``obsm["X_hvg"]`` with ``data.kwargs.embed_key=X_hvg`` and
``output_space=gene``, one-hot perturbations, ``training.batch_size=16``, ``lr=1e-4``) scaled to a 2-core CPU:
``training.max_steps`` (tutorial 40,000; here 2,000 by default) and ``model.kwargs.cell_set_len`` (the set size,
state_sm 128; here 32); no W&B, no data-loader workers.

Data: one "dataset" folder with the training cells (``train.h5ad`` with ``obsm["X_hvg"] = X``) listed as
``[training]`` in the cell-load TOML; every context trains, the held-out context with its control cells only
(cell-load then maps them to themselves, as it does for a zero-shot cell type's controls).
Prediction: a template of the context's control cells (the control pool ``tx infer`` draws basal cells from, within
the ``--celltype-col`` group) plus ``n_cells`` rows labelled with the perturbation; the predicted rows'
``obsm["X_hvg"]`` (``tx infer`` clips to [0, 14]) is the prediction.

STATE's one-hot perturbation map has no vector for a perturbation (or combination) absent from training, and
``tx infer`` silently falls back to the control vector there: such a condition is reported as "cannot".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Job, pin_threads

DEFAULTS = {"max_steps": 2000, "cell_set_len": 32, "batch_size": 16, "lr": 1e-4, "model": "state_sm"}
BATCH_COL, ALL_CONTEXT = "_state_batch", "_all"


def main(folder: str) -> None:
    job = Job(folder)
    pin_threads(job.threads)
    import argparse

    import anndata as ad
    import numpy as np
    import torch
    from hydra import compose, initialize_config_module
    from state._cli._tx._infer import add_arguments_infer, run_tx_infer
    from state._cli._tx._train import run_tx_train

    torch.set_num_threads(job.threads)
    s = job.settings = {**DEFAULTS, **job.settings}
    rng = np.random.default_rng(job.seed)
    train = job.read_train()
    ctx_col = job.context_key or "_state_context"
    if job.context_key is None:
        train.obs[ctx_col] = ALL_CONTEXT
    train.obs[BATCH_COL] = train.obs[job.batch_key].astype(str) if job.batch_key else "b0"
    trained = set(train.obs[job.pert_key].astype(str))
    unseen = "perturbation never seen in training (STATE's one-hot map has no vector for it)"
    todo = job.predictable(train, lambda cond: None if str(cond["perturbation"]) in trained else unseen)
    if not todo:
        job.write([], 0.0, 0.0, ["arc-state", "cell-load", "torch", "lightning", "anndata"])
        return

    work = Path(folder) / "state"
    (work / "data").mkdir(parents=True, exist_ok=True)
    fit = ad.AnnData(np.asarray(train.X, dtype=np.float32), obs=train.obs[[job.pert_key, ctx_col, BATCH_COL]].copy())
    fit.var_names = [str(g) for g in train.var_names]
    fit.var.index.name = None  # cell-load reads the gene names from var/_index (or var/feature)
    fit.obsm["X_hvg"] = fit.X.copy()
    fit.write_h5ad(work / "data" / "train.h5ad")
    toml = work / "experiment.toml"
    toml.write_text(f'[datasets]\ntrain = "{work / "data"}"\n\n[training]\ntrain = "train"\n')
    steps = int(s["max_steps"])
    overrides = [
        f"model={s['model']}",
        f"data.kwargs.toml_config_path={toml}",
        "data.kwargs.embed_key=X_hvg",
        "data.kwargs.output_space=gene",
        f"data.kwargs.pert_col={job.pert_key}",
        f"data.kwargs.cell_type_key={ctx_col}",
        f"data.kwargs.control_pert={job.control}",
        f"data.kwargs.batch_col={BATCH_COL}",
        "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false",
        f"model.kwargs.cell_set_len={int(s['cell_set_len'])}",
        f"training.max_steps={steps}",
        f"training.val_freq={steps}",
        f"training.ckpt_every_n_steps={steps}",
        f"training.batch_size={int(s['batch_size'])}",
        f"training.lr={float(s['lr'])}",
        f"training.train_seed={job.seed}",
        "use_wandb=false",
        f"output_dir={work}",
        "name=run",
        "overwrite=true",
    ]
    s["hydra_overrides"] = overrides
    with initialize_config_module(config_module="state.configs", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    t0 = time.time()
    run_tx_train(cfg)
    train_seconds = time.time() - t0
    run_dir = work / "run"
    ckpt = next(iter(sorted(run_dir.rglob("final.ckpt"))), None)
    if ckpt is None:
        raise FileNotFoundError(f"STATE wrote no final.ckpt under {run_dir}")

    t0 = time.time()
    preds = []
    for i, cond in enumerate(todo):
        source = job.source_cells(train, cond, rng)
        pool = train[job.where(train, cond, job.control)]
        template = ad.concat([pool, source], index_unique=None)
        template.obs_names_make_unique()
        is_pred = np.r_[np.zeros(pool.n_obs, bool), np.ones(source.n_obs, bool)]
        template.obs[job.pert_key] = np.where(is_pred, str(cond["perturbation"]), job.control)
        template.obs[ctx_col] = str(cond.get("context")) if job.context_key else ALL_CONTEXT
        template = ad.AnnData(np.asarray(template.X, np.float32), obs=template.obs[[job.pert_key, ctx_col]].copy())
        template.var_names = [str(g) for g in train.var_names]
        template.obsm["X_hvg"] = template.X.copy()
        path_in, path_out = work / f"template{i}.h5ad", work / f"predicted{i}.h5ad"
        template.write_h5ad(path_in)
        parser = argparse.ArgumentParser()
        add_arguments_infer(parser)
        args = parser.parse_args(
            ["--model-dir", str(run_dir), "--checkpoint", str(ckpt), "--adata", str(path_in),
             "--embed-key", "X_hvg", "--pert-col", job.pert_key, "--celltype-col", ctx_col,
             "--control-pert", job.control, "--output", str(path_out), "--seed", str(job.seed), "--quiet"]
        )  # fmt: skip
        run_tx_infer(args)
        out = ad.read_h5ad(path_out)
        X = np.asarray(out.obsm["X_hvg"])[is_pred]
        preds.append(job.prediction(X, train.var_names, cond))
    job.write(preds, train_seconds, time.time() - t0, ["arc-state", "cell-load", "torch", "lightning", "anndata"])


if __name__ == "__main__":
    main(sys.argv[1])
