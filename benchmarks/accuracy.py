"""Accuracy benchmark: PerturbDiff against simple baselines and a data ceiling on held-out stimulated cells.

Protocol (public API only; one fresh model per held-out condition, package defaults, ``scvi.settings.seed``):

- ``kang`` (``datasets.kang2018()``, IFN-beta control / stimulated, 7 cell types): leave one cell type out.
  For each cell type, training = every cell except the stimulated cells of that type; genes = the 2,000
  highly variable genes of the training cells; PerturbDiff predicts ``n_cells`` = number of real held-out
  cells for ("stimulated", that type).
- ``kang_donors`` (``datasets.kang2018_donors()``, 5 cell types x donors 101 / 107, all 1,267 genes): for each
  cell type, hold out its stimulated cells of donor 107 (``batch_key="donor"``) and predict them with
  ``batches="107"``; the control cells scored against are those of the type in donor 107.
- ``norman`` (``datasets.norman2019()``, its Norman 2019 K562 CRISPRa part, 500 genes; one context), set up with
  ``combination_delimiter="+"`` so that a perturbation is embedded as the sum of its genes. Two folds, one
  model each: ``doubles`` holds out the 5 ``A+B`` doubles whose two singles are measured; ``singles`` holds
  out the 7 single perturbations whose gene also occurs in a measured double (all doubles stay in training).
  Baselines: control, cell_mean, linear (additive in the components: ``delta_A + delta_B``).

Methods, scored side by side with ``tl.evaluate`` (PCA fitted on the training cells, normalised against
``cell_mean``): PerturbDiff (package defaults); PerturbDiff_corrected (``bias_correction=True``); each also
zeroed (values below ``realistic_zero_threshold`` of the training X set to 0, for a realistic DE zero pattern);
the baselines control, cell_mean, additive (+ additive_zeroed), pooled,
linear (all with ``n_cells`` = real cells; ``batch_key="donor"`` on kang_donors); on kang_donors also
same_type_other_donor (the real stimulated cells of the type in donor 101, which the model also sees); and a
ceiling (half of the real held-out cells against the other half, ``baseline=None``). The discrimination scores
(PDS) rank a method's predicted shift among the real shifts of all held-out conditions of the task, over the
genes shared by all of them. Outputs: results.csv, summary.md, metric_bars.png, delta_scatter_<task>.png,
run.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import pickle
import platform
import shlex
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scvi

from perturbdiff_scvi import PerturbDiff, baselines, datasets, tl
from perturbdiff_scvi.metrics import (
    baseline_normalized_score,
    discrimination_score,
    realistic_zero_threshold,
    zero_small_values,
)

logger = logging.getLogger("benchmarks.accuracy")
PERT, CONTROL, KEYS = "stimulated", "control", {"perturbation_key": "condition", "context_key": "cell_type"}
#: Other samplings of the same trained model, scored beside ``PerturbDiff`` (the package defaults) and
#: ``PerturbDiff_zeroed`` (``--variants`` picks some; a ``--predict-kwargs`` option of the same name wins over them).
VARIANTS = {
    "PerturbDiff_guidance1": {"guidance_scale": 1.0},  # the released guidance weight
    "PerturbDiff_corrected": {"bias_correction": True},
    "PerturbDiff_unbounded": {"x0_bound": None},  # the released uncapped sampler
    "PerturbDiff_steps50": {"n_steps": 50},  # the default before 0.1.0 (now n_steps=1)
    "PerturbDiff_steps1": {"n_steps": 1},  # DDIM with 1 / 2 / 5 steps
    "PerturbDiff_steps2": {"n_steps": 2},
    "PerturbDiff_steps5": {"n_steps": 5},
    "PerturbDiff_steps1_guidance0": {"n_steps": 1, "guidance_scale": 0.0},
    "PerturbDiff_transport": {"transport": "quantile"},  # control cells moved onto the generated marginals
    "PerturbDiff_guidance0_transport": {"guidance_scale": 0.0, "transport": "quantile"},
}
#: Variants also scored zeroed (as ``<name>_zeroed``), like ``PerturbDiff`` itself.
ZEROED_VARIANTS = ("PerturbDiff_corrected",)
MODEL_METHODS = ["PerturbDiff", "PerturbDiff_zeroed"]
for _name in VARIANTS:
    MODEL_METHODS += [_name, f"{_name}_zeroed"] if _name in ZEROED_VARIANTS else [_name]
METHODS = [*MODEL_METHODS, "control", "cell_mean", "additive", "additive_zeroed", "pooled"]
METHODS += ["linear", "same_type_other_donor", "ceiling"]
SUMMARY_METRICS = ["pearson_delta", "r2_top100_de", "e_distance", "overlap_at_N", "discrimination_score_l1", "mae"]
#: Distribution-realism metrics of ``tl.evaluate`` (PCA and value range of the training cells) reported beside them.
REALISM_METRICS = ["c2st_auroc", "knn_mixing", "spread_ratio_mean_abs_log", "detected_genes_ratio"]
REALISM_METRICS += ["out_of_range_fraction", "max_over_training"]
NORMAN_KEYS = {"perturbation_key": "perturbation", "context_key": None}
NORMAN_FOLDS = {
    "doubles": ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"],
    "singles": ["KLF1", "MAP2K3", "MAP2K6", "MAPK1", "SGK1", "SLC38A2", "TGFBR2"],
}
DONORS_NOTE = (
    "Baselines exclude the whole (stimulated, cell type) pair, also donor 101's cells that the model sees, and draw "
    "control cells of the type from both donors; same_type_other_donor = donor 101's real stimulated cells of the type."
)
TARGETS = {
    "kang": {
        "pearson_delta": (">=", 0.88),
        "r2_top100_de": (">=", 0.90),
        "e_distance": ("<=", 1.5),
        "overlap_at_N": (">=", 0.42),
    },
    "norman": {"discrimination_score_l1": (">=", 0.80), "pearson_delta": (">=", 0.65)},
}
BASELINES = {
    "control": baselines.control_baseline,
    "cell_mean": baselines.cell_mean_baseline,
    "additive": baselines.additive_shift_baseline,
    "pooled": baselines.pooled_other_contexts_baseline,
    "linear": baselines.linear_baseline,
}


class Task(NamedTuple):
    load: Callable[[], object]  # dataset loader
    batch_key: str | None  # batch column; only the cells of batch `batch` are held out
    batch: str | None
    hvg: bool  # model the HVGs of the training cells (else all genes)
    show: str  # held-out cell type of the delta scatter
    quick: list[str]  # held-out cell types of --quick


def kang_dense_panel(n_genes: int = 300):
    """Stress case: Kang restricted to its ``n_genes`` most expressed genes (mean UMI counts), re-normalised over
    them (``normalize_total(1e4)`` + ``log1p``): a dense panel of high values (about a third non-zero, up to ~8.8),
    unlike the sparse 2,000-HVG Kang space the defaults were tuned on."""
    adata = datasets.kang2018()
    counts = adata.layers["counts"]
    top = np.sort(np.argsort(-np.asarray(counts.mean(axis=0)).ravel(), kind="stable")[:n_genes])
    panel = sc.AnnData(counts[:, top].astype(np.float32), obs=adata.obs[["condition", "cell_type"]].copy())
    panel.var_names = adata.var_names[top]
    panel.layers["counts"] = panel.X.copy()
    sc.pp.normalize_total(panel, target_sum=1e4)
    sc.pp.log1p(panel)
    panel.X = np.asarray(panel.X.toarray() if hasattr(panel.X, "toarray") else panel.X, dtype=np.float32)
    return panel


def mcfaline():
    """Stress case: the McFaline-Figueroa 2023 CRISPRi part of ``norman2019()`` (9 kinase knock-downs with weak
    effects in the glioma lines A172, T98G, U87MG; 500 genes)."""
    adata = datasets.norman2019()
    adata = adata[mask(adata, "dataset", "mcfaline23")].copy()
    for key in ("perturbation", "cell_type"):
        adata.obs[key] = adata.obs[key].astype(str).astype("category")
    return adata


TASKS = {
    "kang": Task(datasets.kang2018, None, None, True, "CD4T", ["CD4T", "B"]),
    "kang_donors": Task(datasets.kang2018_donors, "donor", "107", False, "CD4 T cells", ["CD4 T cells", "B cells"]),
    "kang_dense": Task(kang_dense_panel, None, None, False, "CD4T", ["CD4T", "B"]),
    "norman": Task(datasets.norman2019, None, None, False, "KLF1+MAP2K6", ["doubles"]),
    "mcfaline": Task(mcfaline, None, None, False, "U87MG", ["U87MG"]),
}
#: Stress tasks (data unlike Kang / Norman): PerturbDiff should beat the additive baseline on these metrics.
STRESS_TASKS = ("kang_dense", "kang_donors", "mcfaline")
STRESS_METRICS = {"pearson_delta": 1, "mae": 0, "e_distance": 0, "c2st_auroc": 0}
MCFALINE_KEYS = {"perturbation_key": "perturbation", "context_key": "cell_type"}
NORMAN_BASELINES = ("control", "cell_mean", "linear")


def mask(adata, column, value):
    return (adata.obs[column].astype(str) == str(value)).to_numpy()


def md(frame: pd.DataFrame, index: bool = True) -> str:
    """A markdown table (no tabulate dependency)."""
    frame = frame.reset_index() if index else frame
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def conditions(task: str, quick: bool, n_top_genes: int):
    """Yield (held-out cell type, training AnnData, real held-out cells, matched control cells), genes selected."""
    spec = TASKS[task]
    adata = spec.load()
    types = spec.quick if quick else [str(c) for c in adata.obs["cell_type"].cat.categories]
    for ct in types:
        in_batch = mask(adata, spec.batch_key, spec.batch) if spec.batch_key else np.ones(adata.n_obs, bool)
        in_type = mask(adata, "cell_type", ct) & in_batch
        held = in_type & mask(adata, "condition", PERT)
        train = adata[~held].copy()
        if spec.hvg:
            sc.pp.highly_variable_genes(train, n_top_genes=n_top_genes)
            train = train[:, train.var["highly_variable"].to_numpy()].copy()
        genes = train.var_names
        yield ct, train, adata[held, genes].copy(), adata[in_type & mask(adata, "condition", CONTROL), genes].copy()


def zeroed(pred, threshold):
    out = pred.copy()
    out.X = zero_small_values(out.X, threshold)
    return out


def mean(x) -> np.ndarray:
    return np.asarray(x.mean(axis=0)).ravel()


def model_predictions(model, perturbation, threshold, variants=tuple(VARIANTS), **kwargs) -> dict:
    """PerturbDiff with the package defaults (and zeroed, the same as ``zero_threshold="auto"``), and the
    ``variants`` of :data:`VARIANTS` sampled from the same model (those in :data:`ZEROED_VARIANTS` also zeroed)."""
    preds = {"PerturbDiff": model.predict_population(perturbation, **kwargs)}
    preds["PerturbDiff_zeroed"] = zeroed(preds["PerturbDiff"], threshold)
    for name in variants:
        options = VARIANTS[name]
        if set(options) & set(kwargs):  # e.g. --predict-kwargs '{"x0_bound": null}': the variant is the default
            continue
        preds[name] = model.predict_population(perturbation, **kwargs, **options)
        if name in ZEROED_VARIANTS:
            preds[f"{name}_zeroed"] = zeroed(preds[name], threshold)
    return preds


def run_condition(task, ct, train, real, control, args):
    """Train, predict and evaluate one held-out condition; returns the tidy table, deltas and run facts."""
    spec, t0 = TASKS[task], time.time()
    batch_key, batch = spec.batch_key, spec.batch
    scvi.settings.seed = args.seed
    PerturbDiff.setup_anndata(train, control_value=CONTROL, batch_key=batch_key, **KEYS)
    model = PerturbDiff(train, **args.model_kwargs)
    model.train(max_steps=args.max_steps, enable_progress_bar=False)
    threshold = realistic_zero_threshold(train.X)
    where = {"contexts": ct, "batches": batch, "n_cells": real.n_obs, "seed": args.seed, **args.predict_kwargs}
    preds = model_predictions(model, PERT, threshold, args.variants, **where)
    for name in args.baselines:
        try:
            preds[name] = BASELINES[name](
                train, PERT, ct, control_value=CONTROL, batch_key=batch_key, n_cells=real.n_obs, seed=args.seed, **KEYS
            )
        except Exception as exc:  # noqa: BLE001 - a failing baseline is recorded as missing
            logger.warning("%s / %s: baseline %r missing: %s", task, ct, name, exc)
    if "additive" in preds:
        preds["additive_zeroed"] = zeroed(preds["additive"], threshold)
    if batch_key is not None:  # the real stimulated cells of the same type in the other donor(s)
        other = mask(train, "cell_type", ct) & mask(train, "condition", PERT)
        if other.any():
            preds["same_type_other_donor"] = train[other].copy()
    common = {"pca_reference": train, "seed": args.seed, **KEYS}
    table = tl.evaluate(preds, real, control, baseline="cell_mean" if "cell_mean" in preds else None, **common)
    half, reference = baselines.half_vs_half_ceiling(real, seed=args.seed, **KEYS)
    table = pd.concat([table, tl.evaluate({"ceiling": half}, reference, control, baseline=None, **common)])
    ctrl_mean = mean(control.X)
    deltas = {m: pd.Series(mean(p.X) - ctrl_mean, index=real.var_names) for m, p in preds.items()}
    deltas["ceiling"] = pd.Series(mean(half.X) - ctrl_mean, index=real.var_names)
    real_deltas = {
        "real": pd.Series(mean(real.X) - ctrl_mean, index=real.var_names),
        "ceiling": pd.Series(mean(reference.X) - ctrl_mean, index=real.var_names),
    }
    facts = {"seconds": round(time.time() - t0, 1), "train_steps": int(model.trainer.global_step)}
    facts.update(zero_threshold=threshold, n_real=real.n_obs, n_control=control.n_obs, n_train=train.n_obs)
    facts.update(n_genes=real.n_vars, methods=sorted(preds))
    return table.assign(task=task, held_out=ct), deltas, real_deltas, facts


def norman_folds(quick: bool):
    """Yield (fold, training AnnData, {held-out perturbation: real cells}, control cells) of the Norman K562 part."""
    adata = datasets.norman2019()
    adata = adata[mask(adata, "dataset", "norman19")].copy()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).astype("category")
    control = adata[mask(adata, "perturbation", CONTROL)].copy()
    for fold, held_out in NORMAN_FOLDS.items():
        if quick and fold not in TASKS["norman"].quick:
            continue
        held = adata.obs["perturbation"].astype(str).isin(held_out).to_numpy()
        train = adata[~held].copy()
        train.obs["perturbation"] = train.obs["perturbation"].cat.remove_unused_categories()
        yield fold, train, {p: adata[mask(adata, "perturbation", p)].copy() for p in held_out}, control


def mcfaline_folds(quick: bool):
    """Yield (held-out cell line, training AnnData, {perturbation: real cells of that line}, its control cells).

    Every perturbed cell of the line is held out (its controls stay in training); each knock-down is predicted in
    that line from the two other lines, like a held-out replicate."""
    adata = mcfaline()
    lines = TASKS["mcfaline"].quick if quick else list(adata.obs["cell_type"].cat.categories)
    for line in lines:
        in_line = mask(adata, "cell_type", line)
        held = in_line & ~mask(adata, "perturbation", CONTROL)
        train = adata[~held].copy()
        perts = sorted(set(adata.obs["perturbation"][held].astype(str)))
        reals = {p: adata[in_line & mask(adata, "perturbation", p)].copy() for p in perts}
        yield line, train, reals, adata[in_line & mask(adata, "perturbation", CONTROL)].copy()


def run_norman_fold(fold, train, reals, control, args, task: str = "norman"):
    """One model for all held-out perturbations of a fold; per perturbation the tidy table and deltas.

    ``task="mcfaline"``: the fold is a held-out cell line (``context_key="cell_type"``, no combinations)."""
    t0 = time.time()
    scvi.settings.seed = args.seed
    if task == "norman":  # one context; combinations embedded (and the linear baseline fitted) as sums
        keys, ctx, setup_extra, names = NORMAN_KEYS, None, {"combination_delimiter": "+"}, NORMAN_BASELINES
    else:
        keys, ctx, setup_extra, names = MCFALINE_KEYS, fold, {}, tuple(BASELINES)
    PerturbDiff.setup_anndata(train, control_value=CONTROL, **setup_extra, **keys)
    model = PerturbDiff(train, **args.model_kwargs)
    model.train(max_steps=args.max_steps, enable_progress_bar=False)
    threshold = realistic_zero_threshold(train.X)
    tables, deltas, real_deltas, facts = [], {}, {}, {}
    ctrl_mean = mean(control.X)
    for pert, real in reals.items():
        t1 = time.time()
        where = {} if ctx is None else {"contexts": ctx}
        preds = model_predictions(model, pert, threshold, args.variants, n_cells=real.n_obs, seed=args.seed, **where,
                                  **args.predict_kwargs)  # fmt: skip
        for name in [n for n in names if n in args.baselines]:
            extra = setup_extra if name == "linear" else {}
            try:
                preds[name] = BASELINES[name](
                    train, pert, ctx, control_value=CONTROL, n_cells=real.n_obs, seed=args.seed, **keys, **extra
                )
            except Exception as exc:  # noqa: BLE001 - a failing baseline is recorded as missing
                logger.warning("%s / %s: baseline %r missing: %s", task, pert, name, exc)
        common = {"pca_reference": train, "seed": args.seed, **keys}
        table = tl.evaluate(preds, real, control, baseline="cell_mean" if "cell_mean" in preds else None, **common)
        half, reference = baselines.half_vs_half_ceiling(real, seed=args.seed, **keys)
        table = pd.concat([table, tl.evaluate({"ceiling": half}, reference, control, baseline=None, **common)])
        held_out = pert if task == "norman" else f"{pert}|{fold}"
        tables.append(table.assign(task=task, held_out=held_out, context="k562" if ctx is None else ctx))
        deltas[held_out] = {m: pd.Series(mean(p.X) - ctrl_mean, index=real.var_names) for m, p in preds.items()}
        deltas[held_out]["ceiling"] = pd.Series(mean(half.X) - ctrl_mean, index=real.var_names)
        real_deltas[held_out] = {
            "real": pd.Series(mean(real.X) - ctrl_mean, index=real.var_names),
            "ceiling": pd.Series(mean(reference.X) - ctrl_mean, index=real.var_names),
        }
        facts[held_out] = {"fold": fold, "seconds_predict_and_score": round(time.time() - t1, 1), "n_real": real.n_obs}
        facts[held_out].update(zero_threshold=threshold, n_control=control.n_obs, n_train=train.n_obs)
        facts[held_out].update(n_genes=real.n_vars, methods=sorted(preds), train_steps=int(model.trainer.global_step))
    for f in facts.values():
        f["fold_seconds"] = round(time.time() - t0, 1)
    return tables, deltas, real_deltas, facts


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_job(task, payload, args, seed):
    """One held-out condition (or fold) with one seed; in a worker process when ``--jobs`` > 1."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    if args.jobs > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        quiet_logs()
    if task in ("norman", "mcfaline"):
        return run_norman_fold(*payload, args, task=task)
    return run_condition(task, *payload, args)


#: The arguments a finished job's saved result depends on; ``--resume`` reuses it only when they match.
JOB_ARGS = ("max_steps", "quick", "model_kwargs", "predict_kwargs", "variants", "baselines")


def job_file(out: Path, seed: int, task: str, payload) -> Path:
    name = "".join(c if c.isalnum() else "_" for c in str(payload[0]))
    return out / "jobs" / f"seed{seed}_{task}_{name}.pkl"


def job_args(args) -> dict:
    return {k: getattr(args, k) for k in JOB_ARGS}


def load_job(path: Path, args):
    """A saved job result when ``--resume`` is on and it was made with the same JOB_ARGS, else ``None``."""
    if not (args.resume and path.exists()):
        return None
    with path.open("rb") as fh:
        saved = pickle.load(fh)
    if saved["args"] != job_args(args):
        logger.warning("%s was made with other options %s: rerunning it", path.name, saved["args"])
        return None
    return saved["result"]


def save_job(path: Path, args, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump({"args": job_args(args), "result": result}, fh)
    tmp.replace(path)


def run_all(jobs, args, seeds) -> dict:
    """``{seed: results of run_job for every (task, payload), in order}``; ``args.jobs`` conditions at a time.

    Each finished job is saved under ``<out>/jobs/`` as it completes, so that an interrupted run loses only the
    jobs in flight; ``--resume`` reuses the saved ones."""
    todo = [(seed, task, payload) for seed in seeds for task, payload in jobs]
    paths = [job_file(args.out, seed, task, payload) for seed, task, payload in todo]
    done = [load_job(path, args) for path in paths]
    missing = [i for i, d in enumerate(done) if d is None]
    if len(missing) < len(todo):
        print(f"resumed {len(todo) - len(missing)} of {len(todo)} jobs from {args.out / 'jobs'}", flush=True)
    if args.jobs <= 1:
        for i in missing:
            seed, task, payload = todo[i]
            done[i] = run_job(task, payload, args, seed)
            save_job(paths[i], args, done[i])
    else:
        context = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {pool.submit(run_job, todo[i][1], todo[i][2], args, todo[i][0]): i for i in missing}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                done[i] = future.result()
                save_job(paths[i], args, done[i])
    return {seed: done[i * len(jobs) : (i + 1) * len(jobs)] for i, seed in enumerate(seeds)}


def discrimination(task, deltas, real_deltas):
    """PDS of each method across the held-out conditions of a task, on the genes shared by all of them."""
    if len(real_deltas) < 2:
        return pd.DataFrame()
    genes = sorted(set.intersection(*(set(d["real"].index) for d in real_deltas.values())))
    records = []
    methods = {m for d in deltas.values() for m in d}
    for method in sorted(methods):
        pred = {ct: d[method][genes].to_numpy() for ct, d in deltas.items() if method in d}
        ref = "ceiling" if method == "ceiling" else "real"
        real = {ct: d[ref][genes].to_numpy() for ct, d in real_deltas.items()}
        for metric in ("l1", "l2", "cosine"):
            for ct, v in discrimination_score(pred, real, metric=metric).items():
                if task == "norman":
                    pert, ctx = ct, "k562"
                elif task == "mcfaline":
                    pert, ctx = ct.split("|", 1)
                else:
                    pert, ctx = PERT, ct
                records.append((task, ct, method, pert, ctx, f"discrimination_score_{metric}", float(v)))
    out = pd.DataFrame(records, columns=["task", "held_out", "method", "perturbation", "context", "metric", "value"])
    base = out[out["method"] == "cell_mean"].set_index(["held_out", "metric"])["value"]
    b = out.set_index(["held_out", "metric"]).index.map(base.get).to_numpy(dtype=float)
    out["normalized_score"] = np.where(
        out["method"].isin(["cell_mean", "ceiling"]),
        np.nan,
        baseline_normalized_score(out["value"].to_numpy(), b, best=1),
    )
    return out


def md_table(frame: pd.DataFrame, index_name: str) -> str:
    cols = list(frame.columns)
    lines = [f"| {index_name} | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
    for idx, row in frame.iterrows():
        cells = ["" if pd.isna(v) else str(int(v)) if c == "n_held_out" else f"{v:.3f}" for c, v in row.items()]
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_means(results: pd.DataFrame, task: str, metrics: list[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Mean over held-out conditions (and seeds: the mean of the per-seed means, as every seed has the same
    conditions)."""
    sub = results[(results["task"] == task) & results["metric"].isin(metrics)]
    table = sub.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
    table = table.reindex(columns=[m for m in metrics if m in table.columns])
    table["n_held_out"] = sub.groupby("method")["held_out"].nunique()
    return ordered(table)


def per_seed_means(results: pd.DataFrame, task: str, metrics: list[str]) -> pd.DataFrame:
    sub = results[(results["task"] == task) & results["metric"].isin(metrics)]
    return sub.groupby(["seed", "method", "metric"])["value"].mean().unstack("metric")


def seed_spread_table(results: pd.DataFrame, task: str) -> str:
    """``mean ± sd`` over seeds of each method's per-seed mean, for the summary and realism metrics."""
    per_seed = per_seed_means(results, task, SUMMARY_METRICS + REALISM_METRICS)
    mean, sd = per_seed.groupby("method").mean(), per_seed.groupby("method").std(ddof=1)
    cols = [m for m in SUMMARY_METRICS + REALISM_METRICS if m in mean.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method in [m for m in METHODS if m in mean.index]:
        cells = [f"{mean.loc[method, c]:.3f} ± {sd.loc[method, c]:.3f}" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stress_check(results: pd.DataFrame, task: str) -> str:
    """The stress-task targets: PerturbDiff beats the additive baseline on each of STRESS_METRICS (per-seed means,
    compared seed by seed) and no predicted value exceeds 1.5x the training maximum of its gene."""
    per_seed = per_seed_means(results, task, [*STRESS_METRICS, "max_over_training"])
    lines = [f"Stress targets ({task}; per seed, PerturbDiff vs additive):", ""]
    lines += ["| metric | better | seeds won | PerturbDiff | additive |", "|---|---|---|---|---|"]
    for metric, best in STRESS_METRICS.items():
        if metric not in per_seed.columns:
            continue
        ours = (
            per_seed.xs("PerturbDiff", level="method")[metric]
            if "PerturbDiff" in per_seed.index.get_level_values(1)
            else None
        )
        base = (
            per_seed.xs("additive", level="method")[metric]
            if "additive" in per_seed.index.get_level_values(1)
            else None
        )
        if ours is None or base is None:
            continue
        won = int(((ours > base) if best == 1 else (ours < base)).sum())
        better = "higher" if best == 1 else "lower"
        lines.append(f"| {metric} | {better} | {won}/{len(ours)} | {ours.mean():.3f} | {base.mean():.3f} |")
    for method in ("PerturbDiff", "PerturbDiff_unbounded"):
        if "max_over_training" in per_seed.columns and method in per_seed.index.get_level_values(1):
            worst = float(per_seed.xs(method, level="method")["max_over_training"].max())
            verdict = "REACHED" if worst <= 1.5 + 1e-6 else "NOT REACHED"
            lines += [
                "",
                f"{method}: largest predicted value over the gene's training maximum {worst:.2f} (target <= 1.5: "
                f"{verdict}).",
            ]
    return "\n".join(lines)


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order of METHODS (model first, ceiling last)."""
    return table.reindex([m for m in METHODS if m in table.index])


def write_summary(out: Path, results: pd.DataFrame, run: dict, quick: bool) -> None:
    quick_note = (
        "**QUICK RUN, not a result** (2 held-out types per task, 30 steps, 300 HVGs on kang; smoke test only).\n\n"
    )
    header = f"""{quick_note if quick else ""}# PerturbDiff accuracy benchmark

Command: `{run["command"]}`

Seeds {run["seeds"]}, max_steps {run["max_steps"] or "package default"}, {run["cpu_count"]} CPUs, total \
{run["seconds"]["total"]} s. Values are means over held-out conditions (n_held_out: conditions with a value).
PerturbDiff: package defaults (guidance_scale 0.5, 1 DDIM step). PerturbDiff_guidance1: the same model sampled
with the released guidance_scale=1. PerturbDiff_corrected: the same model with
`predict_population(bias_correction=True)` (an option, not the released method: subtracts the per-gene mean error
of regenerated controls).
PerturbDiff (default `x0_bound="auto"`): each step's clean estimate capped at 1.5x the gene's training maximum;
PerturbDiff_unbounded: the same model with the released uncapped sampler (`predict_population(x0_bound=None)`).
PerturbDiff_steps50: the same model with 50 DDIM steps (the earlier default; the default is now 1 step).
PerturbDiff_steps1 / _steps2 / _steps5: DDIM over 1 / 2 / 5 steps (results made before the change of default: there
PerturbDiff is 50 steps);
PerturbDiff_steps1_guidance0: one step without guidance.
PerturbDiff_transport / _guidance0_transport: the same samples (guidance 0.5 / 0) returned as distinct control
cells of the population's context moved gene by gene onto the generated per-gene distributions
(`predict_population(transport="quantile")`).
*_zeroed / additive_zeroed: values below the 1 % quantile of the non-zero training values set to 0, as
`predict_population(zero_threshold="auto")` does (thresholds in run.json). PDS (discrimination_score_l1) ranks
each predicted shift among the real shifts of the task's held-out conditions. The ceiling scores half of the real
held-out cells against the other half. Seconds per task: summed over its conditions (`--jobs` runs several at once).
"""
    lines = [header]
    if run.get("held_out"):
        lines += [f"**Subset run** (`--held-out {','.join(run['held_out'])}`): means over these conditions only, not "
                  "over the whole task; the targets below are checked on the subset.\n"]  # fmt: skip
    seeds = sorted(int(s) for s in results["seed"].unique())
    for task in results["task"].unique():
        lines += [f"## {task}", "", md_table(method_means(results, task), "method"), ""]
        realism = method_means(results, task, REALISM_METRICS)
        if len(realism.columns) > 1:
            lines += ["Realism and value range:", "", md_table(realism, "method"), ""]
        if len(seeds) > 1:
            lines += [f"Mean ± standard deviation over seeds {seeds} of the per-seed means:", ""]
            lines += [seed_spread_table(results, task), ""]
        if task in STRESS_TASKS:
            lines += [stress_check(results, task), ""]
        if task == "kang_donors":
            lines += [DONORS_NOTE, ""]
        for ct in results.loc[results["task"] == task, "held_out"].unique():
            sub = results[(results["task"] == task) & (results["held_out"] == ct)]
            per = sub[sub["metric"].isin(SUMMARY_METRICS)].pivot_table(index="method", columns="metric", values="value")
            per = ordered(per.reindex(columns=[m for m in SUMMARY_METRICS if m in per.columns]))
            lines += [
                f"### {task}: held out {ct} ({run['conditions'][task][ct]['n_real']} real cells)",
                "",
                md_table(per, "method"),
                "",
            ]
    lines += ["## Targets\n"]
    for task in [t for t in TARGETS if t in set(results["task"])]:
        means = method_means(results, task)
        methods = [m for m in MODEL_METHODS if m in means.index]
        lines += [
            f"{task}, mean over held-out conditions" + (" (QUICK RUN: not meaningful)" if quick else "") + ":",
            "",
            "| metric | target | " + " | ".join(f"{m} | " for m in methods) + " |",
            "|---|---|" + "---|---|" * len(methods),
        ]
        for metric, (op, target) in TARGETS[task].items():
            cells = []
            for method in methods:
                v = means.loc[method, metric] if method in means.index and metric in means.columns else np.nan
                ok = np.isfinite(v) and (v >= target if op == ">=" else v <= target)
                cells += [f"{v:.3f}", "REACHED" if ok else "NOT REACHED"]
            lines.append(f"| {metric} | {op} {target} | " + " | ".join(cells) + " |")
        lines.append("")
    if not set(TARGETS) & set(results["task"]):
        lines.append("Neither kang nor norman run: targets not checked.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def figures(out: Path, results: pd.DataFrame, scatter: dict) -> None:
    tasks = list(results["task"].unique())
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, metric in zip(axes.ravel(), SUMMARY_METRICS, strict=True):
        sub = results[results["metric"] == metric].groupby(["method", "task"])["value"].mean().unstack("task")
        ax.set_title(metric)
        if sub.empty:  # e.g. PDS of a run with one held-out condition per task: nothing to rank against
            ax.text(0.5, 0.5, "no values in this run", ha="center", va="center", transform=ax.transAxes)
            continue
        ordered(sub.reindex(columns=tasks)).plot.bar(ax=ax, legend=metric == SUMMARY_METRICS[0], width=0.8)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Mean over held-out conditions, per method")
    fig.tight_layout()
    fig.savefig(out / "metric_bars.png", dpi=110)
    plt.close(fig)
    for task, (ct, pred, real) in scatter.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(real, pred, s=5, alpha=0.5)
        lim = [min(real.min(), pred.min()), max(real.max(), pred.max())]
        ax.plot(lim, lim, color="grey", lw=0.8)
        r = np.corrcoef(real, pred)[0, 1]
        ax.set(xlabel="real mean shift (stimulated - control)", ylabel="PerturbDiff predicted mean shift")
        ax.set_title(f"{task}: held out {ct} (Pearson {r:.3f})")
        fig.tight_layout()
        fig.savefig(out / f"delta_scatter_{task}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", default="kang,kang_donors,norman")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the package's)")
    parser.add_argument("--seed", type=int, default=0, help="one seed (default 0); see --seeds")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: every model is trained once per seed and "
        "the summary reports the mean and standard deviation over seeds of the per-seed means",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 held-out types, 30 steps, 300 HVGs")
    parser.add_argument(
        "--jobs", type=int, default=1, help="conditions trained at once, each on cpu_count / jobs threads (default 1)"
    )
    parser.add_argument(
        "--model-kwargs", type=json.loads, default={}, help='options of PerturbDiff(...) as JSON, e.g. '
        '\'{"preconditioning": "edm", "energy_weight": 0}\' (default: the package defaults)',
    )  # fmt: skip
    parser.add_argument(
        "--predict-kwargs", type=json.loads, default={},
        help='options of every predict_population call as JSON, e.g. \'{"counts": true}\'',
    )  # fmt: skip
    parser.add_argument(
        "--held-out", default=None, help="comma-separated held-out conditions to run (cell types; for norman its "
        "folds doubles / singles; for mcfaline cell lines), e.g. CD4T,B,doubles (default: all of each task)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated other samplings of each trained model to "
        f"score (default all of {list(VARIANTS)}; '' for none)",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help=f"comma-separated baselines to score (default all of "
        f"{list(BASELINES)}; additive_zeroed comes with additive)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished jobs saved under <out>/jobs/ by an earlier run "
        "with the same --max-steps, --quick, --model-kwargs, --predict-kwargs, --variants and --baselines (each job "
        "is saved as it finishes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if unknown := [t for t in tasks if t not in TASKS]:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    try:
        seeds = [args.seed] if args.seeds is None else [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must name distinct seeds, got {args.seeds!r}")
    for option, known in (("variants", VARIANTS), ("baselines", BASELINES)):
        chosen = [v.strip() for v in getattr(args, option).split(",") if v.strip()]
        if unknown := [v for v in chosen if v not in known]:
            parser.error(f"unknown --{option} {unknown}; choose from {list(known)}")
        setattr(args, option, chosen)
    if args.quick and args.max_steps is None:
        args.max_steps = 30
    n_top_genes = 300 if args.quick else 2000
    quiet_logs()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run = {"command": shlex.join([sys.executable, *sys.argv]), "seed": seeds[0], "seeds": seeds}
    run["max_steps"] = args.max_steps
    run.update(model_kwargs=args.model_kwargs, predict_kwargs=args.predict_kwargs)
    run.update(variants=args.variants, baselines=args.baselines)
    run.update(quick=args.quick, tasks=tasks, n_top_genes_kang=n_top_genes, cpu_count=os.cpu_count(), jobs=args.jobs)
    run["versions"] = {p: version(p) for p in ("perturbdiff-scvi", "scvi-tools", "torch", "anndata", "scanpy")}
    run["versions"]["python"] = platform.python_version()
    run.update(platform=platform.platform(), conditions={}, seconds={})
    jobs = []
    for task in tasks:
        if task == "norman":
            jobs += [(task, payload) for payload in norman_folds(args.quick)]
        elif task == "mcfaline":
            jobs += [(task, payload) for payload in mcfaline_folds(args.quick)]
        else:
            jobs += [(task, payload) for payload in conditions(task, args.quick, n_top_genes)]
    if args.held_out is not None:
        keep = {v.strip() for v in args.held_out.split(",") if v.strip()}
        jobs = [(task, payload) for task, payload in jobs if str(payload[0]) in keep]
        if not jobs:
            parser.error(f"--held-out {args.held_out!r} matches no held-out condition of the tasks {tasks}")
        run["held_out"] = sorted(keep)
        tasks = run["tasks"] = [t for t in tasks if any(task == t for task, _ in jobs)]
    outputs_by_seed = run_all(jobs, args, seeds)
    tables, scatter = [], {}
    run["conditions_by_seed"] = {}
    for seed, outputs in outputs_by_seed.items():
        conditions_of = run["conditions_by_seed"][str(seed)] = {}
        seed_tables = []
        for task in tasks:
            deltas, real_deltas = {}, {}
            conditions_of[task] = {}
            for (job_task, payload), out in zip(jobs, outputs, strict=True):
                if job_task != task:
                    continue
                if task in ("norman", "mcfaline"):
                    fold_tables, fold_deltas, fold_real, facts = out
                    seed_tables += fold_tables
                    deltas.update(fold_deltas)
                    real_deltas.update(fold_real)
                    conditions_of[task].update(facts)
                    secs = next(iter(facts.values()))["fold_seconds"]
                    fold, _, reals, _ = payload
                    print(f"[{task}] fold {fold}: held out {list(reals)}, {secs:.1f} s", flush=True)
                    continue
                ct = payload[0]
                table, deltas[ct], real_deltas[ct], facts = out
                seed_tables.append(table)
                conditions_of[task][ct] = facts
                n, steps, secs = facts["n_real"], facts["train_steps"], facts["seconds"]
                print(f"[{task}] held out {ct}: {n} real cells, {steps} training steps, {secs:.1f} s", flush=True)
            seed_tables.append(discrimination(task, deltas, real_deltas))
            show = TASKS[task].show if TASKS[task].show in deltas else next(iter(deltas))
            if seed == seeds[0]:
                scatter[task] = (show, deltas[show]["PerturbDiff"].to_numpy(), real_deltas[show]["real"].to_numpy())
            # Summed over the task's conditions (they may have run in parallel with other tasks' conditions).
            facts = conditions_of[task].values()
            if task in ("norman", "mcfaline"):
                run["seconds"][f"{task}_seed{seed}"] = round(
                    sum({f["fold"]: f["fold_seconds"] for f in facts}.values()), 1
                )
            else:
                run["seconds"][f"{task}_seed{seed}"] = round(sum(f["seconds"] for f in facts), 1)
        tables += [t.assign(seed=seed) for t in seed_tables if len(t)]
    run["conditions"] = run["conditions_by_seed"][str(seeds[0])]
    for task in tasks:
        run["seconds"][task] = round(sum(v for k, v in run["seconds"].items() if k.startswith(f"{task}_seed")), 1)
    results = pd.concat([t for t in tables if len(t)], ignore_index=True)
    cols = ["seed", "task", "held_out", "method", "perturbation", "context", "metric", "value", "normalized_score"]
    results = results[cols].sort_values(["seed", "task", "held_out", "method", "metric"], kind="stable")
    results.to_csv(args.out / "results.csv", index=False)
    figures(args.out, results, scatter)
    run["seconds"]["total"] = round(time.time() - start, 1)
    write_summary(args.out, results, run, args.quick)
    (args.out / "run.json").write_text(json.dumps(run, indent=2, default=float))
    print(f"done in {run['seconds']['total']} s; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
