"""Is CellFlow's Kang lead the response of the *nearest* training context? Zero-training transfers, per fold.

On the Kang leave-one-cell-type-out folds CellFlow's largest lead over PerturbDiff is CD14+Mono (pd top-100 0.983
against 0.955). CD14+Mono's response is almost that of FCGR3A+Mono, the other monocytes, which stay in training.
A flow on PCs maps each control cell with its neighbours in cell-state space, so a held-out monocyte inherits the
monocytes' response; the mean response over the other types (the additive baseline) does not. This script measures,
per fold, how much of that a prediction without any training gets: the held-out type's control cells shifted by

- ``additive``: the mean over the other types of each type's shift (``baselines.additive_shift_baseline``);
- ``kernel``: ``additive_shift_baseline(average="kernel")``, the shifts weighted by ``exp(-(d / d_min)^2)``, ``d``
  the distance between the control means of the training type and of the held-out type (the kernel
  ``predict_population(guidance_scale="auto")`` uses for the response *size*), so near types count most;
- ``nearest``: the shift of the training type whose control mean is nearest;

scored with ``tl.evaluate`` exactly as ``peers.py`` scores the methods (same folds, genes, PCA and seeds), and set
beside the committed per-fold seed means of PerturbDiff and CellFlow (``results/peers/results.csv``).

Run::

    python benchmarks/context_transfer.py --out benchmarks/results/context_transfer --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import accuracy
import numpy as np
import pandas as pd
from peers import N_PCS, dense, folds
from peers_ablations import METRICS  # the metrics and labels of the ablation tables

from perturbdiff_scvi import baselines, tl

ROOT = Path(__file__).resolve().parent


def _mean(x) -> np.ndarray:
    return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()


def nearest_shift(train, held_out: str) -> np.ndarray:
    """The mean shift (stimulated - control) of the training type whose control mean is nearest ``held_out``'s."""
    obs = train.obs

    def mean(ct: str, cond: str) -> np.ndarray | None:
        rows = ((obs["cell_type"] == ct) & (obs["condition"] == cond)).to_numpy()
        return _mean(train[rows].X) if rows.any() else None

    here = mean(held_out, accuracy.CONTROL)
    best = None
    for ct in obs["cell_type"].astype(str).unique():
        ctrl, pert = mean(ct, accuracy.CONTROL), mean(ct, accuracy.PERT)
        if ct == held_out or ctrl is None or pert is None:
            continue
        d = float(np.linalg.norm(ctrl - here))
        if best is None or d < best[0]:
            best = (d, pert - ctrl)
    return best[1]


def transfer(train, held_out: str, n_cells: int, seed: int, how: str):
    """The held-out type's control cells (the additive baseline's draw) shifted by the ``how`` response."""
    kw = {"control_value": accuracy.CONTROL, "n_cells": n_cells, "seed": seed, **accuracy.KEYS}
    if how in ("additive", "kernel"):
        return baselines.additive_shift_baseline(
            train, accuracy.PERT, held_out, average="contexts" if how == "additive" else "kernel", **kw
        )
    pred = dense(baselines.control_baseline(train, accuracy.PERT, held_out, **kw))
    pred.X = np.maximum(pred.X + nearest_shift(train, held_out).astype(np.float32), 0)
    return pred


def run(seeds: list[int], n_top_genes: int) -> tuple[pd.DataFrame, dict]:
    rows, weights = [], {}
    for fold in folds("kang", None, n_top_genes):
        cond = fold.conditions[0]
        for seed in seeds:
            preds = {
                how: transfer(fold.train, fold.name, cond["n_cells"], seed, how)
                for how in ("additive", "kernel", "nearest")
            }
            info = preds["kernel"].uns["baseline"]
            weights[fold.name] = dict(zip(info["other_contexts"], map(float, info["weights"]), strict=True))
            for p in preds.values():
                for key in accuracy.KEYS.values():
                    p.obs[key] = p.obs[key].astype(str)
            table = tl.evaluate(
                {k: dense(v) for k, v in preds.items()},
                fold.real.copy(),
                fold.control,
                pca_reference=fold.train,
                baseline=None,
                n_pcs=N_PCS,
                seed=seed,
                **fold.keys,
            )
            rows.append(table.assign(fold=fold.name, seed=seed))
        print(f"  {fold.name}: done", flush=True)
    return pd.concat(rows, ignore_index=True), weights


def per_fold(results: pd.DataFrame, committed: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Seed means of ``metric`` per fold and method: the transfers here and the committed methods."""
    here = results[results["metric"] == metric].groupby(["fold", "method"])["value"].mean().unstack()
    peers = committed[(committed["task"] == "kang") & (committed["metric"] == metric)]
    peers = peers[peers["method"].isin(["PerturbDiff", "CellFlow"])]
    peers = peers.groupby(["fold", "method", "seed"])["value"].mean().groupby(["fold", "method"]).mean().unstack()
    table = pd.concat([peers, here[["additive", "kernel", "nearest"]]], axis=1)
    table.loc["mean"] = table.mean()
    return table


def markdown(results: pd.DataFrame, committed: pd.DataFrame, weights: dict, seeds: list[int]) -> str:
    lines = [
        "# Zero-training context transfer on the Kang folds",
        "",
        f"`python benchmarks/context_transfer.py --seeds {','.join(map(str, seeds))}`; `tl.evaluate` as in "
        "`results/peers/summary.md` (30 PCs of each fold's training cells), seed means. PerturbDiff (defaults) and "
        "CellFlow: the committed 3-seed runs of `results/peers/results.csv`. The transfers train nothing: the "
        "held-out type's control cells plus the mean shift of the other types (`additive`), the shifts weighted "
        "by the kernel on control-mean distances (`kernel`), or the nearest type's shift (`nearest`).",
        "",
    ]
    for metric, label in METRICS.items():
        table = per_fold(results, committed, metric)
        cols = list(table.columns)
        lines += [f"## {label}", "", "| fold | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for fold, row in table.iterrows():
            lines.append(f"| {fold} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        lines.append("")
    lines += [
        "## Does a method's per-fold profile follow the kernel transfer?",
        "",
        "Pearson r over the seven folds between a method's per-fold seed mean and the kernel transfer's; last "
        "column: r between CellFlow's lead over PerturbDiff and the kernel transfer's lead over PerturbDiff.",
        "",
        "| metric | r(CellFlow, kernel) | r(PerturbDiff, kernel) | r(CellFlow - PerturbDiff, kernel - PerturbDiff) |",
        "|---|---|---|---|",
    ]
    for metric, label in METRICS.items():
        t = per_fold(results, committed, metric).drop("mean")
        r = [
            np.corrcoef(t["CellFlow"], t["kernel"])[0, 1],
            np.corrcoef(t["PerturbDiff"], t["kernel"])[0, 1],
            np.corrcoef(t["CellFlow"] - t["PerturbDiff"], t["kernel"] - t["PerturbDiff"])[0, 1],
        ]
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in r) + " |")
    lines += ["", "## Kernel weights (share of each training type's shift)", ""]
    for fold, w in weights.items():
        top = sorted(w.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"- {fold}: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "results" / "context_transfer"))
    parser.add_argument("--table-only", action="store_true", help="rewrite summary.md from results.csv")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if args.table_only:
        results, weights = pd.read_csv(out / "results.csv"), json.loads((out / "weights.json").read_text())
    else:
        results, weights = run(seeds, args.n_top_genes)
        out.mkdir(parents=True, exist_ok=True)
        results.to_csv(out / "results.csv", index=False)
        (out / "weights.json").write_text(json.dumps(weights, indent=1))
    committed = pd.read_csv(ROOT / "results" / "peers" / "results.csv")
    text = markdown(results, committed, weights, seeds)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
