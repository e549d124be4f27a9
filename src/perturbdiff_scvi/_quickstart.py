"""The main job: train on Kang 2018 with stimulated CD4T cells held out, predict them, write figures."""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

HELD_OUT_CONTEXT = "CD4T"
PERTURBATION = "stimulated"


def run_quickstart(
    out_dir: str | Path = "perturbdiff_quickstart",
    *,
    max_steps: int | None = None,
    n_top_genes: int = 2000,
    seed: int = 0,
    progress: bool = True,
    accelerator: str = "auto",
    model_kwargs: dict | None = None,
    predict_kwargs: dict | None = None,
) -> dict:
    """Train PerturbDiff on bundled Kang 2018 PBMC with stimulated CD4T held out and evaluate the prediction.

    Writes ``umap_real_vs_predicted.png`` (:func:`perturbdiff_scvi.pl.umap_overlay`), ``delta_scatter_top100_de.png``
    (:func:`~perturbdiff_scvi.pl.delta_scatter`), ``loss_curve.png``, ``predicted_cd4t_stimulated.h5ad`` and
    ``metrics.json`` into
    ``out_dir`` and returns the metrics. Genes: the ``n_top_genes`` highly variable genes of the training
    cells (the paper models 2,000 HVGs). ``model_kwargs`` / ``predict_kwargs`` go to ``PerturbDiff(...)`` /
    ``predict_population(...)`` (package defaults when ``None``) and are recorded in the metrics.

    Examples
    --------
    >>> from perturbdiff_scvi._quickstart import run_quickstart
    >>> metrics = run_quickstart("qs_out")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import torch

    from . import datasets, pl
    from .metrics import (
        c2st_auroc,
        c2st_ceiling,
        energy_distance,
        fit_pca,
        knn_mixing,
        knn_mixing_ceiling,
        pearson_delta,
        top_de_genes,
    )
    from .model import PerturbDiff

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.kang2018()
    held_out = (adata.obs["cell_type"] == HELD_OUT_CONTEXT) & (adata.obs["condition"] == PERTURBATION)
    train = adata[~held_out.to_numpy()].copy()
    sc.pp.highly_variable_genes(train, n_top_genes=n_top_genes)
    genes = train.var_names[train.var["highly_variable"].to_numpy()]
    train = train[:, genes].copy()
    real = adata[held_out.to_numpy(), genes].copy()
    control = adata[
        ((adata.obs["cell_type"] == HELD_OUT_CONTEXT) & (adata.obs["condition"] == "control")).to_numpy(), genes
    ].copy()

    PerturbDiff.setup_anndata(train, perturbation_key="condition", control_value="control", context_key="cell_type")
    # Seed the calls made here, not the session: torch's RNG (weights, diffusion times, noise, guidance dropout) is
    # forked and restored afterwards; the set sampler and the prediction get the seed as an argument.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        model = PerturbDiff(train, **(model_kwargs or {}))
        logger.info("%s", model)
        t_train = time.time()
        model.train(
            max_steps=max_steps,
            accelerator=accelerator,
            enable_progress_bar=progress,
            datasplitter_kwargs={"seed": seed},
        )
        t_train = time.time() - t_train
    t_pred = time.time()
    pred = model.predict_population(
        PERTURBATION, contexts=HELD_OUT_CONTEXT, n_cells=real.n_obs, seed=seed, **(predict_kwargs or {})
    )
    t_pred = time.time() - t_pred

    de = top_de_genes(real.X, control.X, n=100)
    metrics = {
        "task": f"Kang 2018 PBMC: predict IFN-beta '{PERTURBATION}' {HELD_OUT_CONTEXT} cells, never seen in training",
        "n_genes": int(len(genes)),
        "n_cells": {
            "train": int(train.n_obs),
            "real_stimulated_cd4t": int(real.n_obs),
            "control_cd4t": int(control.n_obs),
            "predicted": int(pred.n_obs),
        },
        "energy_distance_pred_vs_real": energy_distance(pred.X, real.X),
        "energy_distance_control_vs_real": energy_distance(control.X, real.X),
        "pearson_delta_top100_de": pearson_delta(pred.X, real.X, control.X, genes=de),
        "pearson_delta_all_genes": pearson_delta(pred.X, real.X, control.X),
        "max_steps": int(model.trainer.global_step),
        "seed": seed,
        "model_kwargs": _as_json(model_kwargs),
        "predict_kwargs": _as_json(predict_kwargs),
        "seconds": {"train": round(t_train, 1), "predict": round(t_pred, 1)},
        "versions": {p: version(p) for p in ("perturbdiff-scvi", "scvi-tools", "torch", "anndata", "scanpy")},
        "python": platform.python_version(),
        "device": str(model.device),
    }
    # Realism on a PCA of the real training cells (30 PCs): 0.5 / 1 = indistinguishable from / mixed with real cells.
    pca = fit_pca(train.X, n_comps=30, seed=seed)
    realism = {"pca": pca, "n_pcs": 30, "seed": seed}
    metrics["realism"] = {
        "c2st_auroc": c2st_auroc(pred.X, real.X, **realism),
        "c2st_auroc_ceiling": c2st_ceiling(real.X, **realism),
        "c2st_auroc_control": c2st_auroc(control.X, real.X, **realism),
        "knn_mixing": knn_mixing(pred.X, real.X, **realism),
        "knn_mixing_ceiling": knn_mixing_ceiling(real.X, **realism),
    }
    metrics["prediction_closer_than_control"] = (
        metrics["energy_distance_pred_vs_real"] < metrics["energy_distance_control_vs_real"]
    )

    pred.write_h5ad(out / "predicted_cd4t_stimulated.h5ad")
    fig = pl.umap_overlay(real, pred, control=control, seed=seed)
    fig.suptitle(f"{HELD_OUT_CONTEXT}: real vs PerturbDiff")
    fig.savefig(out / "umap_real_vs_predicted.png", dpi=120, bbox_inches="tight")
    ax = pl.delta_scatter(pred, real, control, genes=list(genes[de]), n_label=10)
    ax.figure.savefig(out / "delta_scatter_top100_de.png", dpi=120, bbox_inches="tight")
    ax = pl.loss_curve(model)
    ax.figure.savefig(out / "loss_curve.png", dpi=120, bbox_inches="tight")
    plt.close("all")
    metrics["seconds"]["total"] = round(time.time() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def summarise(metrics: dict) -> str:
    """One readable paragraph of the quickstart result."""
    r = metrics["realism"]
    return (
        f"{metrics['task']}\n"
        f"  energy distance to real stimulated CD4T: prediction {metrics['energy_distance_pred_vs_real']:.3f} vs "
        f"control cells {metrics['energy_distance_control_vs_real']:.3f}\n"
        f"  Pearson of predicted vs real mean shift: top-100 DE genes {metrics['pearson_delta_top100_de']:.3f}, "
        f"all genes {metrics['pearson_delta_all_genes']:.3f}\n"
        f"  realism: C2ST AUROC {r['c2st_auroc']:.3f} (real halves {r['c2st_auroc_ceiling']:.3f}, control cells "
        f"{r['c2st_auroc_control']:.3f}; 0.5 = indistinguishable), kNN mixing {r['knn_mixing']:.3f} (real halves "
        f"{r['knn_mixing_ceiling']:.3f})\n"
        f"  time: train {metrics['seconds']['train']} s, predict {metrics['seconds']['predict']} s, "
        f"total {metrics['seconds']['total']} s"
    )


def metrics_are_sane(metrics: dict) -> bool:
    """The prediction moved toward the truth (what the end-to-end test also asserts)."""
    return bool(
        metrics["prediction_closer_than_control"]
        and metrics["pearson_delta_top100_de"] > 0.5
        and np.isfinite(metrics["energy_distance_pred_vs_real"])
    )


def _as_json(kwargs: dict | None) -> dict:
    """``kwargs`` for ``metrics.json``: option objects (``DiffusionOptions``, ``OutputOptions``, ...) as dicts."""
    import dataclasses

    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in (kwargs or {}).items()}
