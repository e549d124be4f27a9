"""Training and sampling speed of PerturbDiff: s/step, cells/s, FLOPs and achieved FLOP/s (MFU on a GPU).

What is timed
-------------
* **train**: a real ``model.train(max_steps=...)`` (Lightning through scvi-tools) on a synthetic sparse
  log1p AnnData. A callback times each optimiser step from ``on_train_batch_start`` to ``on_train_batch_end``:
  forward, backward, gradient clipping, AdamW and the EMA update (data loading is reported apart, as the wall
  time per step of the whole run). The first ``--warmup`` steps are dropped; the median is reported.
  cells/s counts the cells of the target sets (``sets_per_batch * set_size``; as many control cells ride along).
* **flops**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the module's loss,
  as the expectation over the self-conditioning coin (``(1 - p) F(no pass) + p F(pass)``). Achieved FLOP/s =
  FLOPs / median step time; on a GPU with a known peak, MFU = achieved / peak.
* **sample**: ``predict_population`` wall time for ``n_cells`` cells at several DDIM step counts.
* **compare**: ``--compare-rev REV`` times the same training configuration with the package of a git revision
  (``git archive REV src``) and with the working tree, in fresh processes, interleaved over ``--rounds`` rounds,
  so both see the same machine load. Each round's figure is the mean s/step over the timed steps (both sides draw
  the same self-conditioning coins, so the means compare the same mixture of cheap and dear steps).
* **quickstart**: ``--quickstart`` times ``python -m perturbdiff_scvi quickstart`` end to end.

Examples
--------
::

    .venv/bin/python benchmarks/speed.py --quick                       # a minute: one small point
    .venv/bin/python benchmarks/speed.py --out benchmarks/results/speed/cpu_1thread
    .venv/bin/python benchmarks/speed.py --grid none --compare-rev a655e2c --compare-config paper --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Dense bf16 peak FLOP/s of GPUs we may be lent (vendor data sheets), for MFU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def model_config(name: str, set_size: int) -> dict:
    from perturbdiff_scvi import PAPER_CONFIG

    if name == "paper":
        return {**PAPER_CONFIG, "set_size": set_size}
    if name == "small":
        return {"set_size": set_size}
    raise ValueError(f"unknown model config {name!r}; use 'small' or 'paper'.")


def synthetic_adata(n_genes: int, *, n_cells_per_group: int = 300, seed: int = 0):
    """Sparse log1p data (about 85 % zeros), 4 perturbations + control, 2 contexts."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    perts = ["control", "p1", "p2", "p3", "p4"]
    contexts = ["c1", "c2"]
    rows, obs = [], []
    base = rng.gamma(0.3, 2.0, n_genes)
    for pi, p in enumerate(perts):
        for c in contexts:
            rate = base * np.exp(rng.normal(0, 0.3, n_genes) * (pi > 0))
            counts = rng.poisson(rate, (n_cells_per_group, n_genes))
            lib = np.maximum(counts.sum(1, keepdims=True), 1)
            rows.append(sp.csr_matrix(np.log1p(counts / lib * 1e4).astype(np.float32)))
            obs += [(p, c)] * n_cells_per_group
    obs = pd.DataFrame(obs, columns=["perturbation", "context"], index=[f"cell{i}" for i in range(len(obs))])
    return ad.AnnData(sp.vstack(rows).tocsr(), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_timer():
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Seconds of each optimiser step (forward, backward, clipping, AdamW, EMA)."""

        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def build_model(config: str, set_size: int, n_genes: int):
    from perturbdiff_scvi import PerturbDiff

    adata = synthetic_adata(n_genes)
    PerturbDiff.setup_anndata(adata, perturbation_key="perturbation", control_value="control", context_key="context")
    return PerturbDiff(adata, **model_config(config, set_size))


def time_training(
    config: str,
    set_size: int,
    n_genes: int,
    *,
    steps: int,
    warmup: int,
    sets_per_batch: int,
    accelerator: str,
    precision: str | None,
    compile: bool = False,
) -> dict:
    """Median s/step of a real ``model.train`` (see the module docstring); ``compile``: ``train(compile=True)``."""
    model = build_model(config, set_size, n_genes)
    timer = make_timer()
    kwargs = {"precision": precision} if precision else {}
    if compile:
        kwargs["compile"] = True
    start = time.perf_counter()
    model.train(
        max_steps=steps + warmup,
        sets_per_batch=sets_per_batch,
        accelerator=accelerator,
        devices=1,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **kwargs,
    )
    wall = time.perf_counter() - start
    measured = timer.times[warmup:] or timer.times
    step_s = statistics.median(measured)
    return {
        "config": config,
        "set_size": set_size,
        "n_genes": n_genes,
        "sets_per_batch": sets_per_batch,
        "precision": precision or "32",
        "compile": compile,
        "steps_timed": len(measured),
        "s_per_step": step_s,
        "s_per_step_mean": statistics.fmean(measured),
        "s_per_step_iqr": float(np.subtract(*np.percentile(measured, [75, 25]))),
        "cells_per_s": sets_per_batch * set_size / step_s,
        "wall_s_per_step_incl_data": wall / max(1, len(timer.times)),
        "n_parameters": sum(p.numel() for p in model.module.denoiser.parameters()),
        "_model": model,
    }


def training_flops(model, sets_per_batch: int) -> float:
    """Expected FLOPs of one forward + backward of the training loss (expectation over the self-cond coin)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from perturbdiff_scvi._constants import PDIFF_KEYS

    module = model.module
    device = next(module.parameters()).device
    s, g = module.set_size, module.n_genes
    n = sets_per_batch * 2 * s
    tensors = {
        PDIFF_KEYS.X_KEY: torch.rand(n, g, device=device),
        PDIFF_KEYS.PERT_KEY: torch.ones(n, 1, device=device),
        PDIFF_KEYS.CONTEXT_KEY: torch.zeros(n, 1, device=device),
        PDIFF_KEYS.BATCH_KEY: torch.zeros(n, 1, device=device),
    }
    module.train()
    p = module.p_self_cond
    flops = []
    for coin in (0.0, 1.0):
        module.p_self_cond = coin
        with FlopCounterMode(display=False) as counter:
            _, _, loss_output = module(tensors)
            loss_output.loss.backward()
        flops.append(counter.get_total_flops())
        module.zero_grad(set_to_none=True)
    module.p_self_cond = p
    return (1 - p) * flops[0] + p * flops[1]


def time_sampling(model, steps_list: list[int], n_cells: int) -> list[dict]:
    out = []
    for n_steps in steps_list:
        model.predict_population("p1", contexts="c1", n_cells=n_cells, n_steps=n_steps, seed=0)  # warm-up
        _sync()
        start = time.perf_counter()
        model.predict_population("p1", contexts="c1", n_cells=n_cells, n_steps=n_steps, seed=1)
        _sync()
        wall = time.perf_counter() - start
        out.append(
            {"sampler": "ddim", "n_steps": n_steps, "n_cells": n_cells, "s": wall, "cells_per_s": n_cells / wall}
        )
    return out


def gpu_peak() -> tuple[str | None, float | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    return name, peak


def machine() -> dict:
    import torch

    name, _ = gpu_peak()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": name,
        "versions": {p: version(p) for p in ("torch", "lightning", "scvi-tools", "anndata", "perturbdiff-scvi")},
        "git_revision": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ----------------------------------------------------------------------------------------- revision comparison
def _worker(spec: dict) -> None:
    """Child process: time one training configuration with whatever ``perturbdiff_scvi`` is importable."""
    import torch

    torch.set_num_threads(spec["threads"])
    import perturbdiff_scvi

    row = time_training(**spec["train"])
    row.pop("_model")
    row["package_path"] = str(Path(perturbdiff_scvi.__file__).parent)
    print("SPEED_RESULT " + json.dumps(row), flush=True)


def compare_revision(rev: str, spec: dict, rounds: int) -> dict:
    """Interleaved fresh-process timings of ``rev``'s package and the working tree's, same configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sources = {rev: str(Path(tmp) / "src"), "working tree": str(ROOT / "src")}
        results: dict[str, list[float]] = {k: [] for k in sources}
        medians: dict[str, list[float]] = {k: [] for k in sources}
        for r in range(rounds):
            order = list(sources) if r % 2 == 0 else list(sources)[::-1]
            for label in order:
                env = {**os.environ, "PYTHONPATH": sources[label], "OMP_NUM_THREADS": str(spec["threads"])}
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("SPEED_RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"worker for {label} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(line.removeprefix("SPEED_RESULT "))
                if Path(row["package_path"]).resolve() != (Path(sources[label]) / "perturbdiff_scvi").resolve():
                    raise RuntimeError(f"{label}: imported {row['package_path']}, not {sources[label]}")
                results[label].append(row["s_per_step_mean"])
                medians[label].append(row["s_per_step"])
                mean_s, median_s = row["s_per_step_mean"], row["s_per_step"]
                print(f"  round {r + 1} {label}: mean {mean_s:.4f}, median {median_s:.4f} s/step", flush=True)
    # The mean over the timed steps: a step's cost depends on its self-conditioning coin, and both sides draw the
    # same coins (same seed), so the means compare the same mixture; the median of a mixture jumps between modes.
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "revision": rev,
        "config": spec["train"],
        "rounds": rounds,
        "s_per_step": results,
        "s_per_step_median_of_steps": medians,
        "median_s_per_step": med,
        "speedup_working_tree_vs_rev": med[rev] / med["working tree"],
    }


# ----------------------------------------------------------------------------------------- main
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Speed benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['platform']}, Python {m['python']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"GPU {m['gpu'] or 'none'}; versions {m['versions']}; git {m['git_revision']}"
        f"{' (dirty)' if m['git_dirty'] else ''}.",
        "",
    ]
    if report["train"]:
        lines += [
            "## Training (median s per optimiser step: forward, backward, clipping, AdamW, EMA)",
            "",
            "| model | set size | genes | sets/batch | precision | s/step | cells/s | wall s/step incl. data |"
            " GFLOP/step | achieved GFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["train"]:
            mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "n/a (no GPU)"
            lines.append(
                f"| {r['config']} | {r['set_size']} | {r['n_genes']} | {r['sets_per_batch']} | {r['precision']}"
                f"{', compiled' if r.get('compile') else ''} | {r['s_per_step']:.4f} | {r['cells_per_s']:.0f} | "
                f"{r['wall_s_per_step_incl_data']:.4f} | "
                f"{r['flops'] / 1e9:.1f} | {r['achieved_flops'] / 1e9:.1f} | {mfu} |"
            )
        lines.append("")
    if report["sample"]:
        lines += [
            "## Sampling (`predict_population`, DDIM)",
            "",
            "| model | set size | genes | DDIM steps | cells | s | cells/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["sample"]:
            lines.append(
                f"| {r['config']} | {r['set_size']} | {r['n_genes']} | {r['n_steps']} | {r['n_cells']} | "
                f"{r['s']:.2f} | {r['cells_per_s']:.0f} |"
            )
        lines.append("")
    if report.get("compare"):
        c = report["compare"]
        lines += [
            f"## Working tree vs `{c['revision']}` (fresh processes, interleaved, {c['rounds']} rounds)",
            "",
            f"Configuration: {c['config']}",
            "",
            "| package | mean s/step per round | median of rounds |",
            "|---|---|---|",
        ]
        for k, v in c["s_per_step"].items():
            lines.append(f"| {k} | {', '.join(f'{x:.4f}' for x in v)} | {c['median_s_per_step'][k]:.4f} |")
        lines += ["", f"Speed-up of the working tree: **{c['speedup_working_tree_vs_rev']:.2f}x**", ""]
    if report.get("quickstart_s") is not None:
        lines += [f"## Quickstart\n\n`python -m perturbdiff_scvi quickstart`: {report['quickstart_s']:.0f} s wall.", ""]
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[str, int, int]]:
    if text == "none":
        return []
    if text == "quick":
        return [("small", 32, 500)]
    if text == "full":
        return [(c, s, g) for c in ("small", "paper") for g in (500, 2000) for s in (32, 64, 128, 256)]
    out = []
    for item in text.split(","):
        c, s, g = item.split(":")
        out.append((c, int(s), int(g)))
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--grid", default="full", help="'full', 'quick', 'none' or 'model:set_size:genes,...'")
    parser.add_argument("--quick", action="store_true", help="--grid quick --sample-steps 10 --steps 5")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sets-per-batch", type=int, default=8)
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (GPU; on a CPU it runs too)")
    parser.add_argument("--compile", action="store_true", help="train(compile=True): torch.compile the denoiser")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--sample-steps", default="10,50,100", help="DDIM step counts for the sampling rows")
    parser.add_argument("--sample-cells", type=int, default=256)
    parser.add_argument("--compare-rev", default=None, help="git revision to time against the working tree")
    parser.add_argument("--compare-config", default="paper:256:2000", help="model:set_size:genes for --compare-rev")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quickstart", action="store_true", help="also time the quickstart end to end")
    parser.add_argument("--out", default=None, help="folder for speed.json and speed.md")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return None
    if args.quick:
        args.grid, args.sample_steps, args.steps = "quick", "10", 5

    import torch

    torch.set_num_threads(args.threads)
    report: dict = {"command": " ".join(["benchmarks/speed.py", *(argv or sys.argv[1:])]), "machine": machine()}
    gpu_name, peak = gpu_peak()
    report["train"], report["sample"] = [], []
    sample_steps = [int(x) for x in args.sample_steps.split(",") if x]
    for config, set_size, n_genes in parse_grid(args.grid):
        row = time_training(
            config, set_size, n_genes, steps=args.steps, warmup=args.warmup, sets_per_batch=args.sets_per_batch,
            accelerator=args.accelerator, precision=args.precision, compile=args.compile,
        )  # fmt: skip
        model = row.pop("_model")
        row["flops"] = training_flops(model, args.sets_per_batch)
        row["achieved_flops"] = row["flops"] / row["s_per_step"]
        row["mfu"] = row["achieved_flops"] / peak if peak else None
        print(json.dumps(row), flush=True)
        report["train"].append(row)
        if sample_steps and (n_genes == 2000 or args.grid == "quick"):
            for s in time_sampling(model, sample_steps, args.sample_cells):
                s.update(config=config, set_size=set_size, n_genes=n_genes)
                print(json.dumps(s), flush=True)
                report["sample"].append(s)
    if args.compare_rev:
        config, set_size, n_genes = parse_grid(args.compare_config)[0]
        spec = {
            "threads": args.threads,
            "train": {
                "config": config, "set_size": set_size, "n_genes": n_genes, "steps": args.steps,
                "warmup": args.warmup, "sets_per_batch": args.sets_per_batch, "accelerator": args.accelerator,
                "precision": args.precision,
            },
        }  # fmt: skip
        report["compare"] = compare_revision(args.compare_rev, spec, args.rounds)
    if args.quickstart:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "perturbdiff_scvi", "quickstart", "--out", tmp], check=True)
        report["quickstart_s"] = time.perf_counter() - start
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "speed.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
