"""Diagnosis of distribution realism: which part of training or sampling makes predicted cells unlike real ones.

One model per (case, training variant), package defaults unless the variant says otherwise; every sampling variant
is drawn from the same trained model, so the sampling rows of a case differ only in how they were sampled. Cases:

- ``kang_heldout``: Kang 2018, 2,000 HVGs of the training cells, stimulated CD4T held out (the quickstart task);
- ``kang_seen``: the same genes, trained on every cell, stimulated CD4T predicted (a condition seen in training:
  tells generation quality from generalisation);
- ``dense_heldout``: Kang restricted to its 300 most expressed genes and re-normalised over them (dense, values up
  to ~8.8), stimulated CD4T held out.

Training variants: ``default``; ``input_scale_auto`` (``PerturbDiff(input_scale="auto")``); ``no_self_cond``
(``p_self_cond=0``); ``set_size_32``; ``steps_x2`` (twice the training steps); ``energy_0`` (``energy_weight=0``,
MSE only); ``energy_abar`` (``energy_weighting="abar"``); ``edm`` (``preconditioning="edm"``); ``edm_abar`` (both);
``edm_energy_0`` (``preconditioning="edm"``, ``energy_weight=0``). Sampling variants (50 DDIM
steps, the default until 0.1.0 when these tables were made, unless the variant says otherwise): DDIM 50 / 200 / 5
/ 2 / 1 steps (1 is the default now), DDPM 50 steps, the released truncated DDIM (``start_time=100``), guidance 0
and 1, ``x0_bound="auto"`` (the default since it was measured here) and ``x0_bound=None`` (released, uncapped),
``counts=True`` (with guidance 0.5 and 0); and at the package
defaults (one step): ``one_step``, ``one_step_guidance0``, ``transport`` and ``transport_guidance0``
(``transport="quantile"``).
Scored with ``tl.evaluate`` (PCA of the training cells) against the real held-out cells,
beside the additive baseline, the control cells and the half-vs-half ceiling. The trajectory table records, for the
default sampler on each default model, the maximum of ``x_t`` and of the x0 estimate at each step and their share
above the training maximum of the gene.

Outputs (``--out``): ``diagnosis.csv`` (tidy), ``diagnosis.md`` (tables), ``trajectory.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scvi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CONTROL, KEYS, PERT, kang_dense_panel, mask, md, quiet_logs

from perturbdiff_scvi import PerturbDiff, baselines, datasets, tl
from perturbdiff_scvi.diffusion import RangeMonitor

METRICS = ["pearson_delta", "e_distance", "c2st_auroc", "knn_mixing", "spread_ratio_mean_abs_log"]
METRICS += ["detected_genes_ratio", "max_over_training", "out_of_range_fraction"]
SAMPLING = {
    "ddim50": {"n_steps": 50},
    "ddim200": {"n_steps": 200},
    "ddpm50": {"sampler": "ddpm", "n_steps": 50},
    "ddim1": {"n_steps": 1},  # one jump from pure noise to the clean estimate
    "ddim2": {"n_steps": 2},
    "ddim5": {"n_steps": 5},
    "ddim_truncated": {"sampler": "ddim_truncated", "start_time": 100},
    "guidance0": {"n_steps": 50, "guidance_scale": 0.0},
    "guidance1": {"n_steps": 50, "guidance_scale": 1.0},
    "x0_bound_auto": {"n_steps": 50, "x0_bound": "auto"},
    "x0_bound_none": {"n_steps": 50, "x0_bound": None},  # the released, uncapped sampler
    "counts": {"n_steps": 50, "counts": True},
    "counts_guidance0": {"n_steps": 50, "counts": True, "guidance_scale": 0.0},
    "one_step": {},  # the package defaults (one DDIM step, guidance 0.5)
    "one_step_guidance0": {"guidance_scale": 0.0},
    "transport": {"transport": "quantile"},
    "transport_guidance0": {"transport": "quantile", "guidance_scale": 0.0},
}
TRAINING = {
    "default": {},
    "input_scale_auto": {"input_scale": "auto"},
    "no_self_cond": {"p_self_cond": 0.0},
    "set_size_32": {"set_size": 32},
    "steps_x2": {},
    "energy_0": {"energy_weight": 0.0},
    "energy_abar": {"energy_weighting": "abar"},
    "edm": {"preconditioning": "edm"},
    "edm_abar": {"preconditioning": "edm", "energy_weighting": "abar"},
    "edm_energy_0": {"preconditioning": "edm", "energy_weight": 0.0},
}
HELD_OUT_TYPE = "CD4T"


def case_data(case: str):
    """(training AnnData, real stimulated CD4T cells, CD4T control cells) of a case."""
    if case == "dense_heldout":
        adata = kang_dense_panel()
    else:
        adata = datasets.kang2018()
    in_type = mask(adata, "cell_type", HELD_OUT_TYPE)
    held = in_type & mask(adata, "condition", PERT)
    train = adata[~held].copy() if case != "kang_seen" else adata.copy()
    if case != "dense_heldout":
        hvg = adata[~held].copy()
        sc.pp.highly_variable_genes(hvg, n_top_genes=2000)
        genes = hvg.var_names[hvg.var["highly_variable"].to_numpy()]
        train = train[:, genes].copy()
    genes = train.var_names
    return train, adata[held, genes].copy(), adata[in_type & mask(adata, "condition", CONTROL), genes].copy()


def relabelled(control):
    """The control cells presented as a prediction of the stimulated cells (the "no effect" reference)."""
    out = control.copy()
    out.obs["condition"] = pd.Categorical([PERT] * out.n_obs)
    return out


def train_model(train, variant: str, max_steps: int, seed: int):
    scvi.settings.seed = seed
    PerturbDiff.setup_anndata(train, control_value=CONTROL, **KEYS)
    model = PerturbDiff(train, **TRAINING[variant])
    steps = 2 * max_steps if variant == "steps_x2" else max_steps
    model.train(max_steps=steps, enable_progress_bar=False)
    return model


def trajectory(model, real, seed: int, train) -> pd.DataFrame:
    """Per-step range statistics of the default sampler (see ``RangeMonitor``)."""
    x = train.X
    upper = np.asarray(x.max(axis=0).toarray() if hasattr(x, "toarray") else x.max(axis=0)).ravel()
    monitor = RangeMonitor(upper)
    sample = model.module.sample
    model.module.sample = lambda *a, **k: sample(*a, step_callback=monitor, **k)
    try:
        model.predict_population(PERT, contexts=HELD_OUT_TYPE, n_cells=real.n_obs, seed=seed)
    finally:
        model.module.sample = sample
    return monitor.table()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", default="kang_heldout,kang_seen,dense_heldout")
    parser.add_argument("--training", default="default,input_scale_auto", help=f"of {list(TRAINING)}")
    parser.add_argument("--sampling", default=",".join(SAMPLING), help=f"of {list(SAMPLING)}")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-trajectory", action="store_true", help="skip the per-step range table")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    sampling = {name: SAMPLING[name] for name in args.sampling.split(",")}
    quiet_logs()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, records, trajectories = time.time(), [], []
    for seed, case in ((seed, case) for seed in seeds for case in args.cases.split(",")):
        train, real, control = case_data(case)
        common = {"pca_reference": train, "seed": seed, **KEYS}
        refs = {
            "additive": baselines.additive_shift_baseline(
                train, PERT, HELD_OUT_TYPE, control_value=CONTROL, n_cells=real.n_obs, seed=seed, **KEYS
            )
            if case != "kang_seen"
            else None,
            "control": relabelled(control),
        }
        refs = {k: v for k, v in refs.items() if v is not None}
        half, reference = baselines.half_vs_half_ceiling(real, seed=seed, **KEYS)
        table = tl.evaluate(refs, real, control, baseline=None, **common)
        ceiling = tl.evaluate({"ceiling": half}, reference, control, baseline=None, **common)
        for t in (table, ceiling):
            records.append(t.assign(case=case, training="-", sampling="-", seed=seed))
        for variant in args.training.split(","):
            t0 = time.time()
            model = train_model(train.copy(), variant, args.max_steps, seed)
            t_train = time.time() - t0
            preds = {}
            for name, options in sampling.items():
                preds[name] = model.predict_population(
                    PERT, contexts=HELD_OUT_TYPE, n_cells=real.n_obs, seed=seed, **options
                )
            scores = tl.evaluate(preds, real, control, baseline=None, **common)
            records.append(
                scores.rename(columns={"method": "sampling"}).assign(
                    case=case, training=variant, method="PerturbDiff", seed=seed
                )
            )
            if variant == "default" and not args.no_trajectory:
                trajectories.append(trajectory(model, real, seed, train).assign(case=case))
            t_score = time.time() - t0 - t_train
            print(f"[{case}, seed {seed}] {variant}: trained in {t_train:.0f} s, scored in {t_score:.0f} s")
    results = pd.concat(records, ignore_index=True)
    results["method"] = results["method"].fillna("PerturbDiff")
    results = results[results["metric"].isin(METRICS)]
    results.to_csv(args.out / "diagnosis.csv", index=False)
    traj = pd.concat(trajectories, ignore_index=True) if trajectories else pd.DataFrame()
    traj.to_csv(args.out / "trajectory.csv", index=False)
    lines = [f"# Realism diagnosis\n\nCommand: `{' '.join(sys.argv)}`; seeds {seeds}, {args.max_steps} steps, "
             f"{time.time() - start:.0f} s. Values: mean over seeds (sd over seeds in the second table when "
             "several).\n"]  # fmt: skip
    for case, sub in results.groupby("case", sort=False):
        sub = sub.assign(row=np.where(sub["method"] == "PerturbDiff", sub["training"] + " / " + sub["sampling"],
                                      sub["method"]))  # fmt: skip
        pivot = sub.pivot_table(index="row", columns="metric", values="value", sort=False)
        pivot = pivot.reindex(columns=[m for m in METRICS if m in pivot.columns])
        lines += [f"## {case}", "", md(pivot), ""]
        if len(seeds) > 1:
            spread = sub.pivot_table(index="row", columns="metric", values="value", aggfunc="std", sort=False)
            spread = spread.reindex(columns=pivot.columns)
            lines += [f"sd over seeds {seeds}:", "", md(spread), ""]
    if len(traj):
        for case, sub in traj.groupby("case", sort=False):
            every = sub.iloc[:: max(1, len(sub) // 10)]
            lines += [f"## Trajectory, {case} (default sampler)", "", md(every, index=False), ""]
    (args.out / "diagnosis.md").write_text("\n".join(lines) + "\n")
    (args.out / "run.json").write_text(json.dumps({**vars(args), "seeds": seeds}, default=str, indent=2))
    print(f"done in {time.time() - start:.0f} s; {args.out / 'diagnosis.md'}")


if __name__ == "__main__":
    main()
