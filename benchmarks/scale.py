"""Training beyond memory: a synthetic on-disk dataset of 1,000,000 cells x 2,000 genes, trained backed.

1. Writes (once; reused when present) a sparse log1p h5ad of ``--cells`` x ``--genes`` (about 92 % zeros, as
   2,000 HVGs of droplet data), ``--perturbations`` perturbations x ``--contexts`` contexts x 2 batches,
   a control share of 10 %. X is written in chunks (anndata's ``sparse_dataset(...).append``), never whole in
   memory.
2. In a fresh process each (so peak RSS is the run's own): trains ``--steps`` optimiser steps of the default
   model from ``anndata.read_h5ad(path, backed="r")`` and, for comparison, from an in-memory subset of
   ``--subset`` cells; then predicts one population conditioned on control cells read from the file.
3. Reports peak RSS (``ru_maxrss``), steps/s and cells/s, and the backed/in-memory throughput ratio.
   Targets: peak RSS <= 4 GB backed; throughput >= 0.5x in-memory.

Example::

    .venv/bin/python benchmarks/scale.py --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DENSITY = 0.08


def write_dataset(path: Path, n_cells: int, n_genes: int, n_perts: int, n_contexts: int, seed: int = 0) -> None:
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    try:
        from anndata.io import sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    perts = np.array(["control"] + [f"P{i}" for i in range(n_perts)])
    p = np.r_[0.1, np.full(n_perts, 0.9 / n_perts)]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(perts[rng.choice(len(perts), n_cells, p=p)], categories=perts),
            "context": pd.Categorical(rng.integers(0, n_contexts, n_cells).astype(str)),
            "batch": pd.Categorical(rng.integers(0, 2, n_cells).astype(str)),
        },
        index=pd.RangeIndex(n_cells).astype(str),
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    effects = rng.normal(0, 0.5, (len(perts), n_genes)) * (rng.random((len(perts), n_genes)) < 0.05)
    effects[0] = 0
    pert_code = obs["perturbation"].cat.codes.to_numpy()

    def chunk(start: int, stop: int):
        n = stop - start
        nnz_per_row = rng.binomial(n_genes, DENSITY, n)
        indptr = np.r_[0, np.cumsum(nnz_per_row)]
        cols = np.concatenate([np.sort(rng.choice(n_genes, k, replace=False)) for k in nnz_per_row])
        rows = np.repeat(np.arange(n), nnz_per_row)
        vals = np.log1p(rng.gamma(1.5, 1.0, len(cols)) * np.exp(effects[pert_code[start:stop][rows], cols]))
        return sp.csr_matrix((vals.astype(np.float32), cols.astype(np.int32), indptr), shape=(n, n_genes))

    step = 50_000
    first = min(step, n_cells)
    ad.AnnData(chunk(0, first), obs=obs.iloc[:first], var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        x = sparse_dataset(f["X"])
        for start in range(first, n_cells, step):
            x.append(chunk(start, min(start + step, n_cells)))
        del f["obs"]
        write_elem(f, "obs", obs)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def run(mode: str, path: str, steps: int, subset: int, threads: int) -> dict:
    """Child process: train (and predict) backed or in memory; report RSS and throughput."""
    import anndata as ad
    import torch

    torch.set_num_threads(threads)
    from perturbdiff_scvi import PerturbDiff

    start = time.perf_counter()
    if mode == "backed":
        adata = ad.read_h5ad(path, backed="r")
    else:
        backed = ad.read_h5ad(path, backed="r")
        rows = np.sort(np.random.default_rng(0).choice(backed.n_obs, subset, replace=False))
        adata = backed[rows].to_memory()
        backed.file.close()
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_gb()
    PerturbDiff.setup_anndata(adata, perturbation_key="perturbation", control_value="control",
                              context_key="context", batch_key="batch")  # fmt: skip
    model = PerturbDiff(adata)
    sets_per_batch = 8
    start = time.perf_counter()
    model.train(max_steps=steps, sets_per_batch=sets_per_batch, accelerator="cpu", enable_progress_bar=False,
                validation_size=0.0, logger=False, enable_checkpointing=False)  # fmt: skip
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = model.predict_population("P1", contexts="0", batches="0", n_cells=256, seed=0)
    predict_s = time.perf_counter() - start
    return {
        "mode": mode,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "x_on_disk": bool(getattr(adata, "isbacked", False)),
        "load_s": load_s,
        "peak_rss_gb_after_load": rss_loaded,
        "train_s": train_s,
        "steps": steps,
        "steps_per_s": steps / train_s,
        "cells_per_s": steps * sets_per_batch * model.module.set_size / train_s,
        "predict_256_cells_s": predict_s,
        "pred_finite": bool(np.isfinite(pred.X).all()),
        "peak_rss_gb": peak_rss_gb(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=200)
    parser.add_argument("--contexts", type=int, default=10)
    parser.add_argument("--subset", type=int, default=100_000, help="cells of the in-memory comparison run")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="/tmp/perturbdiff_scale.h5ad", help="where the synthetic h5ad is kept")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print("SCALE_RESULT " + json.dumps(run(args.child, args.data, args.steps, args.subset, args.threads)))
        return None
    path = Path(args.data)
    write_s = None
    if not path.exists():
        start = time.perf_counter()
        write_dataset(path, args.cells, args.genes, args.perturbations, args.contexts)
        write_s = time.perf_counter() - start
    rows = []
    for mode in ("backed", "memory"):
        cmd = [sys.executable, __file__, "--child", mode, "--data", str(path), "--steps", str(args.steps),
               "--subset", str(args.subset), "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SCALE_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(line.removeprefix("SCALE_RESULT ")))
        print(rows[-1], flush=True)
    backed, memory = rows
    ratio = backed["steps_per_s"] / memory["steps_per_s"]
    lines = [
        "# Scale benchmark (training from a backed h5ad)",
        "",
        f"Command: `benchmarks/scale.py {' '.join(argv or sys.argv[1:])}`; {platform.platform()}, "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s); file {path.stat().st_size / 1e9:.2f} GB"
        + (f", written in {write_s:.0f} s" if write_s else "")
        + ".",
        "",
        "| run | cells | X on disk | peak RSS (GB) | load s | steps/s | cells/s | predict 256 cells s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['n_cells']:,} | {r['x_on_disk']} | {r['peak_rss_gb']:.2f} | {r['load_s']:.1f} | "
            f"{r['steps_per_s']:.2f} | {r['cells_per_s']:.0f} | {r['predict_256_cells_s']:.1f} |"
        )
    lines += [
        "",
        f"Backed / in-memory throughput: **{ratio:.2f}x** (target >= 0.5x); backed peak RSS "
        f"**{backed['peak_rss_gb']:.2f} GB** (target <= 4 GB).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.md").write_text(text + "\n")
        (out / "scale.json").write_text(json.dumps({"rows": rows, "ratio": ratio, "write_s": write_s}, indent=1))
    return rows


if __name__ == "__main__":
    main()
