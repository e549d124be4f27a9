"""Why does CellFlow beat PerturbDiff on the quickstart split? Ablations of both, through ``peers.py``.

Each ablation is one ``benchmarks/peers.py`` run on the quickstart fold (Kang 2018, stimulated CD4T held out) with
one runner setting changed, written to ``benchmarks/results/peers_ablations/<name>/``; the table puts them beside
the defaults of ``benchmarks/results/peers`` (same fold, same seeds, same scoring). The ablations:

- ``cellflow_iters1250``: CellFlow with a quarter of its iterations (is it faster per CPU-second?);
- ``cellflow_independent``: control and perturbed cells paired at random instead of by entropic OT;
- ``cellflow_no_context``: no context covariate (does the map need more than the source cell's state?);
- ``perturbdiff_no_context_embedding``: ``DiffusionOptions(context_embedding=False)``, the context only through
  the matched control cells, as CellFlow's map sees it;
- ``perturbdiff_control_skip``: ``DiffusionOptions(control_skip=True)``, each cell the change from its paired
  control cell (CellFlow starts each cell at a control cell);
- ``perturbdiff_control_skip_energy_only``: the same with ``mse_weight=0`` (the set energy alone, as STATE);
- ``perturbdiff_bf16``: the defaults trained under ``precision="bf16-mixed"`` (more steps per CPU-second?);
- ``perturbdiff_steps3000``, ``perturbdiff_steps6000``: the defaults trained 2x and 4x as long (1,500 steps is the
  default): what more CPU-minutes buy;
- sample efficiency per CPU-minute (issue 27): ``perturbdiff_no_self_cond`` (``p_self_cond=0``: the one-step
  sampler never feeds an estimate back, so every step trains the path it uses, and a step skips the extra forward
  pass), ``perturbdiff_lr2e-3``, ``perturbdiff_lr3e-3`` (twice and three times the learning rate),
  ``perturbdiff_sets4_steps3000`` (half the sets per step, twice the steps: the same cells seen, twice the updates).

Run (2-core CPU; each ablation is one or three trainings of 3-8 minutes)::

    python benchmarks/peers_ablations.py --venvs /work/peers --seeds 0
    python benchmarks/peers_ablations.py --table-only     # the table of what is on disk
    python benchmarks/peers_ablations.py --venvs /work/peers --seeds 0,1,2 --jobs 2 --fold CD14+Mono \\
        --only perturbdiff_lr2e-3                         # another held-out type: summary_CD14+Mono.md

The table goes to ``benchmarks/results/peers_ablations/summary.md`` (``summary_<fold>.md`` for another fold).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ABLATIONS: dict[str, tuple[str, dict]] = {
    "cellflow_iters1250": ("cellflow", {"num_iterations": 1250}),
    "cellflow_independent": ("cellflow", {"match": "independent"}),
    "cellflow_no_context": ("cellflow", {"use_context": False}),
    "perturbdiff_no_context_embedding": ("perturbdiff", {"options": {"context_embedding": False}}),
    "perturbdiff_control_skip": ("perturbdiff", {"options": {"control_skip": True}}),
    "perturbdiff_control_skip_energy_only": ("perturbdiff", {"options": {"control_skip": True, "mse_weight": 0}}),
    "perturbdiff_bf16": ("perturbdiff", {"precision": "bf16-mixed"}),
    "perturbdiff_steps3000": ("perturbdiff", {"max_steps": 3000}),
    "perturbdiff_steps6000": ("perturbdiff", {"max_steps": 6000}),
    "perturbdiff_no_self_cond": ("perturbdiff", {"options": {"p_self_cond": 0.0}}),
    "perturbdiff_lr2e-3": ("perturbdiff", {"train": {"lr": 2e-3}}),
    "perturbdiff_lr3e-3": ("perturbdiff", {"train": {"lr": 3e-3}}),
    "perturbdiff_sets4_steps3000": ("perturbdiff", {"max_steps": 3000, "train": {"sets_per_batch": 4}}),
}
METRICS = {
    "pearson_delta_top100_de": "pd top-100",
    "pearson_delta": "pd all",
    "e_distance": "E-distance",
    "c2st_auroc": "C2ST",
    "knn_mixing": "kNN mixing",
}
SHOWN = ("PerturbDiff", "PerturbDiff (guidance 0)", "CellFlow")


def rows(label: str, folder: Path, seeds: list[int], fold: str) -> list[dict]:
    """One row per shown method of ``folder``'s Kang ``fold``: seed mean (± sd) of each metric and the train time."""
    if not (folder / "results.csv").exists():
        return []
    res, runs = pd.read_csv(folder / "results.csv"), pd.read_csv(folder / "runs.csv")
    res = res[(res.task == "kang") & (res.fold == fold) & res.seed.isin(seeds)]
    runs = runs[(runs.task == "kang") & (runs.fold == fold) & runs.seed.isin(seeds)]
    out = []
    for method in SHOWN:
        per_seed = res[res.method == method].pivot_table(index="seed", columns="metric", values="value")
        if per_seed.empty:
            continue
        row = {"run": label, "method": method, "seeds": len(per_seed)}
        row["train s"] = f"{runs[runs.method == method].train_seconds.mean():.0f}"
        for key, name in METRICS.items():
            sd = f" ± {per_seed[key].std():.3f}" if len(per_seed) > 1 else ""
            row[name] = f"{per_seed[key].mean():.3f}{sd}"
        out.append(row)
    return out


def table(seeds: list[int], fold: str) -> str:
    found = rows("defaults (`results/peers`)", RESULTS / "peers", seeds, fold)
    for name in ABLATIONS:
        found += rows(name, RESULTS / "peers_ablations" / name, seeds, fold)
    frame = pd.DataFrame(found)
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in frame.itertuples(index=False))
    return (
        f"Kang 2018, stimulated {fold} held out, seeds {','.join(map(str, seeds))}; `tl.evaluate` as in "
        "`results/peers/summary.md`. Train times: ablations ran while other jobs shared the 2 cores, so they "
        "overstate.\n\n" + head + body
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venvs", default=str(Path.home() / "peers"))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=",".join(ABLATIONS), help="comma-separated ablation names")
    parser.add_argument("--fold", default="CD4T", help="the Kang cell type held out (CD4T: the quickstart fold)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (one per seed)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table_only:
        for name in args.only.split(","):
            method, settings = ABLATIONS[name]
            cmd = [sys.executable, str(HERE / "peers.py"), "--venvs", args.venvs, "--tasks", "kang"]
            cmd += ["--folds", f"kang={args.fold}", "--methods", method]
            cmd += ["--seeds", args.seeds, "--jobs", str(args.jobs)]
            cmd += ["--out", str(RESULTS / "peers_ablations" / name), "--settings", json.dumps({method: settings})]
            subprocess.run(cmd, check=True)
    text = table(seeds, args.fold)
    name = "summary.md" if args.fold == "CD4T" else f"summary_{args.fold}.md"
    (RESULTS / "peers_ablations" / name).write_text("# Peers ablations\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
