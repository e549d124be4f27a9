"""CellFlow runner (``cellflow-tools``): OT flow matching on PCs of the training cells, decoded back to genes.

Run by ``benchmarks/peers.py`` as ``<cellflow venv>/bin/python cellflow_runner.py JOB_FOLDER`` (see ``_common.py``
for the folder's layout). Follows CellFlow's PBMC cytokine tutorial (``docs/notebooks/100_pbmc.ipynb``: a perturbation
plus a sample covariate, the sample covariate also a split covariate so that each context has its own control
population), scaled to a 2-core CPU:

- ``cfpp.centered_pca`` of the training cells (``n_pcs``, tutorial 100; here 50), ``sample_rep="X_pca"``;
- perturbation tokens one-hot (control = zeros, as the combosciplex tutorial does for a missing drug), up to
  ``max_combination_length`` of them per cell (``combination_delimiter``), pooled with ``attention_token``;
  context (and batch) one-hot sample covariates, also ``split_covariates``;
- ``solver="otfm"``, ``match_linear(epsilon=0.5, tau_a=tau_b=1)``, ``constant_noise=0.5``,
  ``condition_embedding_dim=256``, ``cond_output_dropout=0.9``, the tutorial's
  ``optax.MultiSteps(optax.adam(5e-5), 20)``; MLP widths scaled from 1024-4096 to ``width`` (512);
- ``train(num_iterations, batch_size)`` (tutorial 500,000 x 1,024; here 5,000 x 256 by default);
- control populations without any perturbed cell in training (the held-out context's controls) are left out of
  the fit (CellFlow refuses a source population without a target) but are the sources at prediction;
- prediction: the condition's control cells (resampled to ``n_cells``) pushed forward, decoded with the
  training PCA (``reconstruct_pca``: ``X_pca @ PCs.T + mean``), as the tutorial evaluates them.

A perturbation token or a context never seen in training has no one-hot: such a condition is reported as
"cannot".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Job, pin_threads

DEFAULTS = {
    "num_iterations": 5000,
    "batch_size": 256,
    "n_pcs": 50,
    "width": 512,
    "learning_rate": 5e-5,
    "grad_accumulation": 20,
    "constant_noise": 0.5,
    "match_epsilon": 0.5,
    "condition_embedding_dim": 256,
    "cond_output_dropout": 0.9,
    # ablations (not the tutorial's): "independent" pairs control and perturbed cells at random instead of by OT;
    # use_context=False drops the context (and batch) covariates, so the map sees only the source cell's state
    "match": "ot",
    "use_context": True,
}


def main(folder: str) -> None:
    job = Job(folder)
    pin_threads(job.threads)
    import functools

    import jax.numpy as jnp
    import numpy as np
    import optax
    import pandas as pd
    from cellflow.model import CellFlow
    from cellflow.preprocessing import centered_pca
    from cellflow.utils import match_linear

    s = job.settings = {**DEFAULTS, **job.settings}
    rng = np.random.default_rng(job.seed)
    train = job.read_train()
    control = job.control
    pert = train.obs[job.pert_key].astype(str)
    train.obs["is_control"] = (pert == control).to_numpy()

    # perturbation tokens: up to max_len columns, padded with the control value (zero embedding)
    tokens = [job.components(p) if p != control else [] for p in pert]
    wanted = [job.components(c["perturbation"]) for c in job.conditions]
    max_len = max(1, max(len(t) for t in tokens + wanted))
    pert_cols = [f"_cf_pert_{i}" for i in range(max_len)]
    seen = sorted({tok for t in tokens for tok in t})
    for i, col in enumerate(pert_cols):  # every token a category of every column: a double's second token
        # never sits in column 1 of the training singles, yet must be predicted there
        values = [t[i] if i < len(t) else control for t in tokens]
        train.obs[col] = pd.Categorical(values, categories=sorted({*seen, control}))
    eye = np.eye(len(seen), dtype=np.float32)
    train.uns["pert_onehot"] = {tok: eye[i] for i, tok in enumerate(seen)}
    train.uns["pert_onehot"][control] = np.zeros(len(seen), dtype=np.float32)

    sample_covs, sample_reps = [], {}
    for key in [k for k in (job.context_key, job.batch_key) if k and s["use_context"]]:
        values = sorted(train.obs[key].astype(str).unique())
        eye = np.eye(len(values), dtype=np.float32)
        train.uns[f"{key}_onehot"] = {v: eye[i] for i, v in enumerate(values)}
        sample_covs.append(key)
        sample_reps[key] = f"{key}_onehot"

    def why_not(cond: dict) -> str | None:
        unseen = [t for t in job.components(cond["perturbation"]) if t not in train.uns["pert_onehot"]]
        if unseen:
            return f"perturbation(s) {unseen} never seen in training (one-hot has no vector)"
        known = train.uns.get(f"{job.context_key}_onehot", {})
        if job.context_key and s["use_context"] and str(cond.get("context")) not in known:
            return f"context {cond.get('context')!r} never seen in training"
        return None

    todo = [(cond, job.components(cond["perturbation"])) for cond in job.predictable(train, why_not)]

    centered_pca(train, n_comps=int(s["n_pcs"]), keep_centered_data=False)
    # CellFlow refuses a control population (split-covariate group) without perturbed cells, such as the held-out
    # context's controls: they are left out of its training data and are the sources at prediction only.
    groups = train.obs[sample_covs].astype(str).agg("|".join, axis=1) if sample_covs else pd.Series("", train.obs_names)
    with_target = set(groups[~train.obs["is_control"].to_numpy()])
    fit = train[groups.isin(with_target).to_numpy()].copy()
    s["n_cells_fitted"] = int(fit.n_obs)
    width = int(s["width"])
    if s["match"] == "ot":
        match_fn = functools.partial(match_linear, epsilon=float(s["match_epsilon"]), tau_a=1.0, tau_b=1.0)
    elif s["match"] == "independent":  # the uniform coupling: pairs drawn at random, as PerturbDiff's sets are

        def match_fn(src, tgt):
            return jnp.full((src.shape[0], tgt.shape[0]), 1.0 / (src.shape[0] * tgt.shape[0]))

    else:
        raise ValueError(f"settings['match'] must be 'ot' or 'independent', not {s['match']!r}")
    cf = CellFlow(fit, solver="otfm")
    cf.prepare_data(
        sample_rep="X_pca",
        control_key="is_control",
        perturbation_covariates={"perturbation": tuple(pert_cols)},
        perturbation_covariate_reps={"perturbation": "pert_onehot"},
        sample_covariates=sample_covs or None,
        sample_covariate_reps=sample_reps or None,
        split_covariates=sample_covs or None,
        max_combination_length=max_len,
        null_value=0.0,
    )
    layers_before_pool = {"perturbation": {"layer_type": "mlp", "dims": [width, width], "dropout_rate": 0.5}}
    for key in sample_covs:  # the tutorial's donor MLP is [256, 256]
        layers_before_pool[key] = {"layer_type": "mlp", "dims": [min(256, width)] * 2, "dropout_rate": 0.0}
    cf.prepare_model(
        condition_mode="deterministic",
        regularization=0.0,
        pooling="attention_token",
        layers_before_pool=layers_before_pool,
        layers_after_pool={"layer_type": "mlp", "dims": [width, width], "dropout_rate": 0.0},
        condition_embedding_dim=int(s["condition_embedding_dim"]),
        cond_output_dropout=float(s["cond_output_dropout"]),
        time_freqs=1024,
        time_encoder_dims=[width] * 3,
        hidden_dims=[width] * 3,
        decoder_dims=[width] * 3,
        conditioning="concatenation",
        probability_path={"constant_noise": float(s["constant_noise"])},
        match_fn=match_fn,
        optimizer=optax.MultiSteps(optax.adam(float(s["learning_rate"])), int(s["grad_accumulation"])),
        seed=job.seed,
    )
    t0 = time.time()
    n_iter = int(s["num_iterations"])
    cf.train(num_iterations=n_iter, batch_size=int(s["batch_size"]), valid_freq=n_iter + 1)
    train_seconds = time.time() - t0

    t0 = time.time()
    pcs = np.asarray(train.varm["PCs"], dtype=np.float64)
    means = np.asarray(train.varm["X_mean"], dtype=np.float64).ravel()
    preds = []
    for i, (cond, toks) in enumerate(todo):
        source = job.source_cells(train, cond, rng)
        row = {col: (toks[j] if j < len(toks) else control) for j, col in enumerate(pert_cols)}
        for key in sample_covs:
            row[key] = str(cond.get("context") if key == job.context_key else cond.get("batch"))
        row["condition_id"], row["is_control"] = f"c{i}", False
        covariates = pd.DataFrame([row])
        for col in [*pert_cols, *sample_covs]:
            categories = train.obs[col].astype("category").cat.categories
            covariates[col] = pd.Categorical(covariates[col], categories=categories)
        out = cf.predict(source, covariate_data=covariates, sample_rep="X_pca", condition_id_key="condition_id")
        X_pca = np.asarray(np.squeeze(np.asarray(out[f"c{i}"])), dtype=np.float64).reshape(source.n_obs, -1)
        preds.append(job.prediction(X_pca @ pcs.T + means, train.var_names, cond))
    job.write(preds, train_seconds, time.time() - t0, ["cellflow-tools", "jax", "flax", "ott-jax", "optax", "anndata"])


if __name__ == "__main__":
    main(sys.argv[1])
