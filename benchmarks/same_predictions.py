"""Same seed, same prediction: a fingerprint of ``predict_population`` to check refactors bit for bit.

Trains one small model on the bundled Kang data (500 HVGs of the training cells, stimulated CD4T held out, 150 steps,
one thread, seed 0) and predicts with every prediction option (samplers, guidance, steps, bounds, zeros, bias
correction, transport, counts, user controls). ``--save`` writes the arrays; ``--check`` recomputes them and fails
unless every array is bit-for-bit equal to the saved ones.

Each case is written with the grouped options of ``predict_population`` when the package has them
(``SamplerOptions`` / ``OutputOptions``), else with the keywords of the version before them, so one file compares a
checkout before and after that change.

Run::

    python benchmarks/same_predictions.py --save /tmp/before.npz   # on the old checkout
    python benchmarks/same_predictions.py --check /tmp/before.npz  # on the new one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scanpy as sc
import torch

from perturbdiff_scvi import PerturbDiff, datasets

# name -> keywords of predict_population (the flat form of the version before the grouped options)
CASES = {
    "default": {},
    "guidance0_steps5": {"guidance_scale": 0.0, "n_steps": 5},
    "ddpm_steps3": {"sampler": "ddpm", "n_steps": 3},
    "truncated": {"sampler": "ddim_truncated", "start_time": 20, "guidance_scale": 1.0},
    "no_bound_raw_weights": {"x0_bound": None, "use_ema": False},
    "zeros_bias": {"zero_threshold": "auto", "bias_correction": True},
    "transport_counts": {"transport": "quantile", "counts": True},
    "populations": {"n_populations": 2, "n_cells": 40, "batch_size": 3},
}
SAMPLER_KEYS = ("sampler", "start_time", "batch_size", "use_ema", "progress_bar")
OUTPUT_KEYS = ("x0_bound", "zero_threshold", "bias_correction", "transport", "counts", "counts_layer")


def grouped(kwargs: dict) -> dict:
    """``kwargs`` with the sampler and output options in their option objects, when the package has them."""
    import perturbdiff_scvi.model as model_pkg

    if not hasattr(model_pkg, "SamplerOptions"):
        return kwargs
    out = {k: v for k, v in kwargs.items() if k not in SAMPLER_KEYS + OUTPUT_KEYS}
    sampler = {k: v for k, v in kwargs.items() if k in SAMPLER_KEYS}
    output = {k: v for k, v in kwargs.items() if k in OUTPUT_KEYS}
    if sampler:
        out["sampler_options"] = model_pkg.SamplerOptions(**sampler)
    if output:
        out["output_options"] = model_pkg.OutputOptions(**output)
    return out


def fingerprint() -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    adata = datasets.kang2018()
    held_out = ((adata.obs["cell_type"] == "CD4T") & (adata.obs["condition"] == "stimulated")).to_numpy()
    train = adata[~held_out].copy()
    sc.pp.highly_variable_genes(train, n_top_genes=500)
    train = train[:, train.var["highly_variable"].to_numpy()].copy()
    control = train[(train.obs["cell_type"] == "CD4T").to_numpy() & (train.obs["condition"] == "control").to_numpy()]
    PerturbDiff.setup_anndata(train, perturbation_key="condition", control_value="control", context_key="cell_type")
    torch.manual_seed(0)
    model = PerturbDiff(train)
    model.train(max_steps=150, enable_progress_bar=False, accelerator="cpu", datasplitter_kwargs={"seed": 0})
    out = {}
    for name, kwargs in CASES.items():
        pred = model.predict_population("stimulated", contexts="CD4T", seed=1, **grouped(kwargs))
        out[name] = np.asarray(pred.X)
        if "counts" in pred.layers:
            out[name + "_counts"] = np.asarray(pred.layers["counts"])
    user = model.predict_population("stimulated", contexts="CD4T", seed=2, control_adata=control.copy())
    out["control_adata"] = np.asarray(user.X)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path)
    group.add_argument("--check", type=Path)
    args = parser.parse_args(argv)
    arrays = fingerprint()
    if args.save:
        np.savez_compressed(args.save, **arrays)
        print(f"saved {len(arrays)} arrays to {args.save}")
        return 0
    saved = np.load(args.check)
    bad = [name for name in saved.files if name not in arrays or not np.array_equal(saved[name], arrays[name])]
    for name in saved.files:
        same = name in arrays and np.array_equal(saved[name], arrays[name])
        print(f"{name:24s} {'identical' if same else 'DIFFERENT'}")
    print("all identical" if not bad else f"{len(bad)} differ: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
