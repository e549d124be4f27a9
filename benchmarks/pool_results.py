"""Pool the ``results.csv`` of several ``accuracy.py`` runs that split one task's held-out conditions.

A task's conditions are sometimes run in parts (``--held-out``), and a run made before a change of default names
the methods differently: in a run made while the default was 50 steps, ``PerturbDiff_steps1`` is today's
``PerturbDiff``, and its ``PerturbDiff_zeroed`` is the 50-step model zeroed (drop it). This script renames methods
run by run, pools the rows, and writes the same seed-spread and stress-target tables as ``accuracy.py``, over every
condition of the pooled runs. Methods not scored on every pooled condition are left out of the tables.

Example (the one-step stress tables of ``benchmarks/README.md``)::

    OLD="PerturbDiff=PerturbDiff_steps50,PerturbDiff_zeroed=,PerturbDiff_steps1=PerturbDiff"
    python benchmarks/pool_results.py --out benchmarks/results/stress_one_step_pooled \\
        --tasks kang_dense,kang_donors --run "benchmarks/results/few_steps_3seeds:$OLD" \\
        --run benchmarks/results/stress_rest_one_step_3seeds

PDS (``discrimination_score_l1``) is left out: it ranks each prediction among the held-out conditions of its own
run, so it does not pool.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy

NOT_POOLED = ("discrimination_score_l1",)


def parse_run(spec: str) -> tuple[Path, dict[str, str]]:
    """``DIR`` or ``DIR:OLD=NEW,OLD=NEW``: a results folder and the method renames applied to its rows
    (``OLD=`` with nothing after it drops the method)."""
    folder, _, renames = spec.partition(":")
    mapping = {}
    for item in filter(None, (r.strip() for r in renames.split(","))):
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise SystemExit(f"--run {spec!r}: a rename is OLD=NEW (or OLD= to drop it), got {item!r}")
        mapping[old] = new
    path = Path(folder) / "results.csv"
    if not path.is_file():
        raise SystemExit(f"--run {spec!r}: {path} does not exist (run accuracy.py --out {folder} first)")
    return path, mapping


def pool(specs: list[str], tasks: list[str] | None) -> pd.DataFrame:
    """The pooled rows; a (seed, task, held-out condition, method) found in two runs is an error."""
    parts = []
    for spec in specs:
        path, mapping = parse_run(spec)
        table = pd.read_csv(path)
        table = table[~table["method"].isin([old for old, new in mapping.items() if not new])]
        table["method"] = table["method"].replace({old: new for old, new in mapping.items() if new})
        table["source"] = str(path.parent)
        parts.append(table)
    results = pd.concat(parts, ignore_index=True)
    if tasks:
        results = results[results["task"].isin(tasks)]
    results = results[~results["metric"].isin(NOT_POOLED)]
    key = ["seed", "task", "held_out", "method", "metric", "perturbation"]
    twice = results[results.duplicated(key, keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise SystemExit(
            f"{first['task']} / {first['held_out']} / {first['method']} (seed {first['seed']}) is in more than one "
            f"run ({', '.join(sorted(twice['source'].unique()))}); rename or drop one with OLD=NEW"
        )
    return results


def complete_methods(results: pd.DataFrame, task: str) -> list[str]:
    """Methods scored on every (seed, condition) of the task: only these are compared."""
    sub = results.loc[results["task"] == task, ["method", "seed", "held_out"]].drop_duplicates()
    cells = sub.groupby("method").size()
    return list(cells.index[cells == len(sub[["seed", "held_out"]].drop_duplicates())])


def summary(results: pd.DataFrame, specs: list[str], argv: list[str]) -> str:
    command = " ".join(["python", "benchmarks/pool_results.py", *(shlex.quote(a) for a in argv)])
    lines = ["# Pooled accuracy results", "", f"Command: `{command}`", ""]
    lines += [f"Runs: {', '.join(f'`{s}`' for s in specs)}. PDS is left out (it ranks within one run).", ""]
    for task in results["task"].unique():
        sub = results[results["task"] == task]
        keep = complete_methods(results, task)
        dropped = sorted(set(sub["method"]) - set(keep))
        sub = sub[sub["method"].isin(keep)]
        seeds = sorted(int(s) for s in sub["seed"].unique())
        n = sub["held_out"].nunique()
        lines += [f"## {task} ({n} held-out conditions x seeds {seeds})", ""]
        if dropped:
            lines += [f"Not on every condition, left out: {', '.join(dropped)}.", ""]
        lines += ["Mean ± sd over seeds of the per-seed means:", "", accuracy.seed_spread_table(sub, task), ""]
        if task in accuracy.STRESS_TASKS:
            lines += [accuracy.stress_check(sub, task), ""]
        per = sub[sub["method"] == "PerturbDiff"].pivot_table(
            index="held_out", columns="metric", values="value", aggfunc="mean"
        )
        cols = [m for m in [*accuracy.STRESS_METRICS, "knn_mixing", "max_over_training"] if m in per.columns]
        if len(per):
            lines += ["PerturbDiff per held-out condition (mean over seeds):", "", accuracy.md(per[cols].round(3)), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="DIR or DIR:OLD=NEW,...; repeat per run")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks to keep (default: all)")
    parser.add_argument("--out", required=True, help="folder for the pooled results.csv and summary.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    results = pool(args.run, tasks)
    if results.empty:
        raise SystemExit(f"no rows of the tasks {tasks} in the runs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.drop(columns="source").to_csv(out / "results.csv", index=False)
    text = summary(results, args.run, argv)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
