"""PerturbDiff against CellFlow, STATE and scGen: the same splits, the same metrics, each peer in its own venv.

This script installs nothing. Each peer lives in a virtual environment of its own (their pins clash with ours and
with each other), made once with one line each (CPU wheels; ``PEERS`` below holds the same lines)::

    python -m venv ~/peers/cellflow && ~/peers/cellflow/bin/pip install "cellflow-tools==0.0.9" "jax[cpu]" requests
    python -m venv ~/peers/scgen && ~/peers/scgen/bin/pip install "pertpy[scgen]==1.0.3" "jax[cpu]" "statsmodels<0.15"
    python -m venv ~/peers/state && ~/peers/state/bin/pip install "arc-state==0.11.1" "torch>=2.4,<2.14"

``--venvs ~/peers`` points at them (``<venvs>/<peer>/bin/python``); PerturbDiff runs with this interpreter. For each
task, fold (the held-out condition(s)) and seed the script writes the fold's training cells once, then a job folder
per method, and runs ``peers_runners/<method>_runner.py`` in a subprocess of the method's venv (``--jobs`` at a
time, ``--threads`` each: every method gets the same CPU). A runner trains on the training cells only, with the
settings of the peer's own tutorial scaled to a 2-core CPU (see each runner's docstring), and writes a prediction
shaped like ``predict_population``'s plus its train time. A finished job (``result.json`` present) is not rerun, so an
interrupted run resumes.

Scoring (this process): ``tl.evaluate`` with realism rows on, PCA (30 PCs, as the issue's table) fitted on the
fold's training cells, against the real held-out cells; beside the peers, the additive baseline (``linear`` for
Norman's combinations) and ``PerturbDiff (guidance 0)``, another sampling of the same trained PerturbDiff. A peer
that cannot predict a condition (an unseen combination, a task without cell types) says so in ``runs.csv`` and in
the summary.

Tasks (the folds of ``benchmarks/accuracy.py``):

- ``kang``: Kang 2018, stimulated cells of one cell type held out (all 7 types), 2,000 HVGs of the training cells;
- ``kang_donors``: the held-out donor task (stimulated cells of a type held out in donor 107 only);
- ``kang_dense``: the dense 300-gene panel (stress);
- ``norman``: Norman 2019 K562, the five held-out doubles (fold ``doubles``);
- ``mcfaline``: McFaline-Figueroa 2023, all perturbed cells of one glioma line held out (stress).

Run (what produced ``benchmarks/results/peers``; add ``--seeds 0,1,2`` and more folds as CPU allows)::

    python benchmarks/peers.py --venvs /work/peers --out benchmarks/results/peers --tasks kang --seeds 0
    python benchmarks/peers.py --venvs /work/peers --out benchmarks/results/peers --summary-only

``--folds kang=CD4T,B`` picks folds; ``--methods perturbdiff,cellflow`` picks methods; ``--settings
'{"cellflow": {"num_iterations": 2000}}'`` overrides a runner's settings (an ablation: use another ``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy

from perturbdiff_scvi import baselines, tl

RUNNERS = Path(__file__).resolve().parent / "peers_runners"
#: Display name, runner, one-line set-up of its venv (``{venv}``: the venv folder), and what it is.
PEERS = {
    "perturbdiff": ("PerturbDiff", None, "this package's venv", "set diffusion, package defaults"),
    "cellflow": (
        "CellFlow",
        "cellflow",
        'python -m venv {venv} && {venv}/bin/pip install "cellflow-tools==0.0.9" "jax[cpu]" requests',
        "OT flow matching on 50 PCs, 5,000 iterations x 256 cells, MLPs 512",
    ),
    "state": (
        "STATE",
        "state",
        'python -m venv {venv} && {venv}/bin/pip install "arc-state==0.11.1" "torch>=2.4,<2.14"',
        "state_sm transition model, energy loss, 2,000 steps, sets of 32",
    ),
    "scgen": (
        "scGen",
        "scgen",
        'python -m venv {venv} && {venv}/bin/pip install "pertpy[scgen]==1.0.3" "jax[cpu]" "statsmodels<0.15"',
        "pertpy tl.Scgen, 100 epochs, early stopping",
    ),
}
N_PCS = 30
#: Columns of the summary tables: (tl.evaluate metric, header, better).
SUMMARY = [
    ("pearson_delta_top100_de", "pd top-100 DE", "max"),
    ("pearson_delta", "pd all", "max"),
    ("e_distance", "E-distance", "min"),
    ("c2st_auroc", "C2ST", "min"),
    ("knn_mixing", "kNN mixing", "max"),
    ("mae", "MAE", "min"),
]
DEFAULT_FOLDS = {"kang": None, "kang_donors": ["CD4 T cells"], "kang_dense": ["CD4T"], "norman": ["doubles"],
                 "mcfaline": ["U87MG"]}  # fmt: skip


@dataclass
class Fold:
    """One split: training cells, real held-out cells per condition, their control cells, and the job keys."""

    task: str
    name: str
    train: ad.AnnData
    real: ad.AnnData
    control: ad.AnnData
    keys: dict
    batch_key: str | None = None
    delimiter: str | None = None
    conditions: list[dict] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return f"{self.task}/{self.name.replace(' ', '_').replace('+', '_')}"


def dense(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.X = np.asarray(out.X.toarray() if hasattr(out.X, "toarray") else out.X, dtype=np.float32)
    out.layers = {}
    return out


def folds(task: str, names: list[str] | None, n_top_genes: int):
    """The folds of ``task`` (all of them where ``names`` is None)."""
    if task in ("kang", "kang_donors", "kang_dense"):
        spec = accuracy.TASKS[task]
        for ct, train, real, control in accuracy.conditions(task, False, n_top_genes):
            if names is not None and ct not in names:
                continue
            cond = {"perturbation": accuracy.PERT, "context": ct, "batch": spec.batch, "n_cells": int(real.n_obs)}
            yield Fold(task, ct, train, real, control, dict(accuracy.KEYS), spec.batch_key, None, [cond])
    elif task in ("norman", "mcfaline"):
        source = accuracy.norman_folds(False) if task == "norman" else accuracy.mcfaline_folds(False)
        keys = accuracy.NORMAN_KEYS if task == "norman" else accuracy.MCFALINE_KEYS
        for name, train, reals, control in source:
            if names is not None and name not in names:
                continue
            context = None if task == "norman" else name
            conds = [
                {"perturbation": p, "context": context, "batch": None, "n_cells": int(r.n_obs)}
                for p, r in reals.items()
            ]
            real = ad.concat(list(reals.values()), index_unique="-")
            delimiter = "+" if task == "norman" else None
            yield Fold(task, name, train, real, control, dict(keys), None, delimiter, conds)
    else:
        raise SystemExit(f"unknown task {task!r}; choose from {list(DEFAULT_FOLDS)}")


def write_jobs(fold: Fold, out: Path, methods, seeds, threads: int, settings: dict) -> list[tuple[str, Path]]:
    """The fold's ``train.h5ad`` and one job folder per (method, seed); returns the jobs still to run."""
    base = out / "jobs" / fold.folder
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "train.h5ad").exists():
        train = dense(fold.train)
        keep = [k for k in (fold.keys["perturbation_key"], fold.keys["context_key"], fold.batch_key) if k]
        train.obs = train.obs[keep].copy()
        train.write_h5ad(base / "train.h5ad")
    todo = []
    for method in methods:
        for seed in seeds:
            folder = base / f"{method}_s{seed}"
            folder.mkdir(exist_ok=True)
            spec = {
                "train": "../train.h5ad",
                "perturbation_key": fold.keys["perturbation_key"],
                "context_key": fold.keys["context_key"],
                "batch_key": fold.batch_key,
                "control_value": accuracy.CONTROL,
                "combination_delimiter": fold.delimiter,
                "seed": int(seed),
                "threads": threads,
                "settings": settings.get(method, {}),
                "conditions": fold.conditions,
            }
            done = (folder / "result.json").exists() and (folder / "job.json").exists()
            if done and json.loads((folder / "job.json").read_text()) == spec:
                continue
            (folder / "result.json").unlink(missing_ok=True)
            (folder / "job.json").write_text(json.dumps(spec, indent=2))
            todo.append((method, folder))
    return todo


def run_job(method: str, folder: Path, venvs: Path, timeout: int) -> str:
    python = sys.executable if method == "perturbdiff" else str(venvs / PEERS[method][1] / "bin" / "python")
    if not Path(python).exists():
        setup = PEERS[method][2].format(venv=venvs / PEERS[method][1])
        return f"{method}: no venv at {python}; make it with: {setup}"
    t0 = time.time()
    with open(folder / "log.txt", "w") as log:
        try:
            rc = subprocess.run(
                [python, str(RUNNERS / f"{method}_runner.py"), str(folder)], stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return f"{folder.relative_to(folder.parents[2])}: rc={rc} in {time.time() - t0:.0f} s"


#: The baselines scored beside the methods (never bold): Norman's combinations get ``linear``, the other tasks the
#: additive shift (mean of the other contexts' shifts) and the kernel transfer (those shifts weighted by how close
#: each context's control cells are, ``additive_shift_baseline(average="kernel")``; docs/peers.md).
BASELINES = ("additive", "kernel transfer", "linear")


def baseline(fold: Fold, cond: dict, seed: int, average: str | None = "contexts") -> ad.AnnData:
    """The baseline prediction of ``cond``: on Norman the linear baseline of combinations (``average=None``), else
    ``additive_shift_baseline`` with ``average``."""
    kw = {"control_value": accuracy.CONTROL, "n_cells": cond["n_cells"], "seed": seed, **fold.keys}
    if (fold.task == "norman") != (average is None):
        raise ValueError(f"average must be None on Norman (the linear baseline) and only there; got {average!r}.")
    if fold.task == "norman":
        return baselines.linear_baseline(fold.train, cond["perturbation"], None, combination_delimiter="+", **kw)
    return baselines.additive_shift_baseline(
        fold.train, cond["perturbation"], cond["context"], batch_key=fold.batch_key, average=average, **kw
    )


def score(fold: Fold, out: Path, methods, seeds) -> tuple[pd.DataFrame, list[dict]]:
    """``tl.evaluate`` rows of every finished method (and the baseline) of one fold, and the runs' facts
    (``methods``: those asked for, reported "missing" when they have not finished)."""
    tables, runs = [], []
    base = out / "jobs" / fold.folder
    for seed in seeds:
        preds = {}
        for method in PEERS:  # every method finished on disk, so that a merge by (task, fold, seed) loses none
            folder = base / f"{method}_s{seed}"
            name = PEERS[method][0]
            if not (folder / "result.json").exists():
                if method in methods:
                    missing = {"task": fold.task, "fold": fold.name, "seed": seed, "method": name, "status": "missing"}
                    runs.append(missing)
                continue
            result = json.loads((folder / "result.json").read_text())
            cannot = "; ".join(sorted({c["reason"] for c in result["cannot"]}))
            row = {"task": fold.task, "fold": fold.name, "seed": seed, "method": name}
            row.update(train_seconds=result["train_seconds"], predict_seconds=result["predict_seconds"])
            row.update(status="cannot: " + cannot if cannot else "ok", n_cannot=len(result["cannot"]))
            row["settings"] = json.dumps(result["settings"], default=str)
            runs.append(row)
            if (folder / "pred.h5ad").exists():
                preds[name] = ad.read_h5ad(folder / "pred.h5ad")
            for variant, file in result.get("variants", {}).items():
                preds[variant] = ad.read_h5ad(folder / file)
                runs.append({**row, "method": variant})
        averages = {"additive": "contexts", "kernel transfer": "kernel"}
        for label, average in ({"linear": None} if fold.task == "norman" else averages).items():
            parts = [baseline(fold, c, seed, average) for c in fold.conditions]
            preds[label] = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
        for p in preds.values():  # evaluate matches conditions on these columns
            for key in [k for k in fold.keys.values() if k]:
                p.obs[key] = p.obs[key].astype(str)
        real = fold.real.copy()
        table = tl.evaluate(
            preds, real, fold.control, pca_reference=fold.train, baseline=None, n_pcs=N_PCS, seed=seed, **fold.keys
        )
        tables.append(table.assign(task=fold.task, fold=fold.name, seed=seed))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(), runs


def merge(old: pd.DataFrame, old_runs: pd.DataFrame, new: pd.DataFrame, new_runs: pd.DataFrame):
    """Results and runs of an earlier scoring with this one's replacing them per (task, fold, seed, method): a
    method whose jobs are no longer on disk (or were not asked for) keeps its earlier rows, and a "missing" run
    does not replace a finished one."""
    key = ["task", "fold", "seed", "method"]

    def keys(frame):
        return frame[key].astype(str).apply(tuple, axis=1)

    results = pd.concat([old[~keys(old).isin(set(keys(new)))], new], ignore_index=True)
    found = new_runs[new_runs["status"] != "missing"]
    runs = old_runs[~keys(old_runs).isin(set(keys(found)))]
    missing = new_runs[(new_runs["status"] == "missing") & ~keys(new_runs).isin(set(keys(runs)))]
    return results, pd.concat([runs, found, missing], ignore_index=True)


def md(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in frame.itertuples(index=False)])


def summarise(results: pd.DataFrame, runs: pd.DataFrame, out: Path) -> str:
    """Per task: method x metric, mean over conditions then mean ± sd over seeds, train time beside."""
    lines = ["# PerturbDiff against CellFlow, STATE and scGen", ""]
    lines += [
        f"Metrics from `tl.evaluate` (PCA of {N_PCS} PCs fitted on the training cells of each fold; C2ST 0.5 = "
        "indistinguishable from real cells; pd = pearson_delta). Each cell: mean over the fold's conditions, then "
        "over folds, then mean ± sd over seeds; *folds* and *seeds* say what a method was run on (a seed counts "
        "only where it covers all of the method's folds). Train time: seconds per fold, each method in its own "
        "process with the same thread count. **Bold**: best of the methods run on all of the task's folds "
        "(baselines excluded).",
        "",
    ]
    metrics = [m for m, _, _ in SUMMARY]
    for task, frame in results.groupby("task", sort=False):
        sub = frame[frame["metric"].isin(metrics)]
        # a seed counts for a method only where it covers as many folds as the method's best-covered seed, so
        # that a seed run on one fold is not averaged with seeds run on all of them
        n_folds = sub.groupby(["method", "seed"])["fold"].nunique()
        complete = n_folds[n_folds == n_folds.groupby("method").transform("max")].reset_index()[["method", "seed"]]
        sub = sub.merge(complete, on=["method", "seed"])
        fold_means = sub.groupby(["method", "seed", "fold", "metric"])["value"].mean()
        per_seed = fold_means.groupby(["method", "seed", "metric"]).mean().unstack("metric")
        mean, sd = per_seed.groupby("method").mean(), per_seed.groupby("method").std()
        r = runs[(runs["task"] == task) & (runs["status"] != "missing")]
        times = r.merge(complete, on=["method", "seed"]).groupby("method")["train_seconds"].mean()
        cannot = r[r["status"].str.startswith("cannot")].groupby("method")["status"].first()
        n_seeds = per_seed.reset_index().groupby("method")["seed"].nunique()
        folds_ = sorted(frame["fold"].unique())
        order = [
            m for m in ["PerturbDiff", "PerturbDiff (guidance 0)", "CellFlow", "STATE", "scGen"] if m in mean.index
        ]
        order += [m for m in mean.index if m not in order]
        widest = int(n_folds.groupby("method").max().max())  # bold only among the methods run on every fold
        methods_only = [m for m in order if m not in BASELINES and int(n_folds[m].max()) == widest]
        rows = []
        for method in order:
            row = {"method": method, "folds": int(n_folds[method].max()), "seeds": int(n_seeds.get(method, 0))}
            t = times.get(method)
            row["train s"] = "-" if t is None or np.isnan(t) else f"{t:.0f}"
            for metric, header, better in SUMMARY:
                if metric not in mean.columns:
                    continue
                col = mean.loc[methods_only, metric].dropna()
                best = (col.idxmax() if better == "max" else col.idxmin()) if len(col) else None
                value = mean.loc[method, metric]
                text = f"{value:.3f} ± {0.0 if np.isnan(sd.loc[method, metric]) else sd.loc[method, metric]:.3f}"
                row[header] = f"**{text}**" if method == best else text
            rows.append(row)
        for method, status in cannot.items():
            if method not in mean.index:
                rows.append({"method": method, "folds": 0, "seeds": 0, "train s": "-", SUMMARY[0][1]: status})
        lines += [f"## {task} (folds: {', '.join(folds_)})", "", md(pd.DataFrame(rows).fillna("")), ""]
        partial = r[r["status"].str.startswith("cannot") & r["method"].isin(mean.index)]
        for _, p in partial.drop_duplicates("method").iterrows():
            lines.append(f"- {p['method']} predicted only some conditions ({p['n_cannot']} not): {p['status']}")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def figure(results: pd.DataFrame, out: Path) -> None:
    """Bar chart per metric (seed-mean, sd as error bars) of every task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m, _, _ in SUMMARY[:5]]
    tasks = list(results["task"].unique())
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(3.2 * len(metrics), 2.8 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        sub = results[(results["task"] == task) & results["metric"].isin(metrics)]
        per_seed = sub.groupby(["method", "seed", "metric"])["value"].mean().unstack("metric")
        mean, sd = per_seed.groupby("method").mean(), per_seed.groupby("method").std().fillna(0)
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            if metric not in mean.columns:
                ax.axis("off")
                continue
            ax.barh(mean.index, mean[metric], xerr=sd[metric], color="tab:blue")
            ax.set_title(f"{task}: {metric}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--venvs", default=str(Path.home() / "peers"), help="folder with <peer>/bin/python")
    parser.add_argument("--tasks", default="kang")
    parser.add_argument("--folds", nargs="*", default=[], help="task=fold1,fold2 (default: all of kang, one fold else)")
    parser.add_argument("--methods", default=",".join(PEERS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1, help="threads per job")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per job")
    parser.add_argument("--settings", default="{}", help="JSON {method: {setting: value}} for the runners")
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--summary-only", action="store_true", help="summarise results.csv again; run nothing")
    parser.add_argument(
        "--score-only", action="store_true", help="score the finished jobs of these tasks / folds / seeds; run nothing"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in PEERS]:
        parser.error(f"unknown method(s) {unknown}; choose from {list(PEERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    picked = dict(DEFAULT_FOLDS)
    for item in args.folds:
        task, _, names = item.partition("=")
        picked[task] = names.split(",") if names else None
    settings = json.loads(args.settings)
    tasks = args.tasks.split(",")
    if args.summary_only:  # every task / method / seed on disk
        results = pd.read_csv(out / "results.csv")
        runs = pd.read_csv(out / "runs.csv")
    else:
        all_folds = [f for task in tasks for f in folds(task, picked.get(task), args.n_top_genes)]
        todo = [job for f in all_folds for job in write_jobs(f, out, methods, seeds, args.threads, settings)]
        if args.score_only:
            todo = []
        print(f"{len(todo)} jobs to run, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda j: run_job(j[0], j[1], Path(args.venvs), args.timeout), todo):
                print(line, flush=True)
        scored = [score(f, out, methods, seeds) for f in all_folds]
        new = pd.concat([t for t, _ in scored], ignore_index=True)
        new_runs = pd.DataFrame([r for _, rs in scored for r in rs])
        results, runs = new, new_runs
        if (out / "results.csv").exists():  # keep every other (task, fold, seed, method) scored earlier
            results, runs = merge(pd.read_csv(out / "results.csv"), pd.read_csv(out / "runs.csv"), new, new_runs)
        results.to_csv(out / "results.csv", index=False)
        runs.to_csv(out / "runs.csv", index=False)
    print(summarise(results, runs, out))
    figure(results, out)


if __name__ == "__main__":
    main()
