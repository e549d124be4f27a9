"""Calibration benchmark: do PerturbDiff's sampled populations cover held-out real donors' log fold changes?

Protocol (public API only; package model defaults; ``scvi.settings.seed`` = the seed):

- data: ``datasets.kang2018_donors()`` (muscat's Kang 2018 PBMC: 5 cell types x donors 101 / 107 x control /
  IFN-beta stimulated, at most 100 cells per cell type and sample);
- held out: the stimulated cells of ``--held-out`` cell types (default CD4 T cells and CD14+ Monocytes, the two
  types with 100 cells in every sample) in *both* donors; each (cell type, donor) is one real population;
- training: every other cell, on the ``--n-hvg`` highly variable genes of the training cells, set up with
  ``context_key="cell_type"`` and ``batch_key="donor"``;
- prediction: for each held-out (cell type, donor), ``--n-populations`` populations of as many cells as the real
  donor has, each conditioned on that donor's own control cells of the type (``batches=donor``);
- scoring: ``tl.calibration(..., group_key="donor")`` at levels 0.5 / 0.8 / 0.9 / 0.95: each donor's pseudobulk
  log2 fold change against its own control cells, ``log2((mean expm1 x + 0.1) / (mean expm1 c + 0.1))``, checked
  against the central interval of the sampled populations' log fold changes (same control); coverage and rank
  histograms pooled over (cell type, donor, gene);
- conformal intervals: a second model per seed is trained without the stimulated cells of ``--calibrate-on``
  (default B cells, CD8 T cells, FCGR3A+ Monocytes; never a target type) and predicts those the same way;
  ``tl.conformal_intervals`` learns the model's error on them, and the targets are checked with
  ``tl.calibration(..., conformal=ci)`` (variant ``conformal``); ``conformal_reverse`` swaps the roles.

Goal (issue "Many plausible populations with calibrated uncertainty"): nominal 80 % intervals cover 70-90 % of the
real per-donor log fold changes. The same predictions are also scored with the training data's zero pattern
(``zero_small_values`` at ``realistic_zero_threshold``, as ``zero_threshold="auto"``) as a diagnostic. Outputs in
``--out``: coverage.csv, groups.csv, rank_histogram.csv, per_gene.csv.gz, conformal.csv, offset_sweep.csv,
rank_histogram.png, summary.md, run.json.

Run (two models per seed, each a few minutes on one CPU thread at 1,500 steps; ``--jobs 2`` trains two at once):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration.py --seeds 0,1,2 --threads 1 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import platform
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import mask, md, quiet_logs

from perturbdiff_scvi import PerturbDiff, datasets, tl
from perturbdiff_scvi.metrics import realistic_zero_threshold, zero_small_values

logger = logging.getLogger("calibration")
KEYS = {"perturbation_key": "condition", "context_key": "cell_type"}
CONTROL, PERT, DONOR = "control", "stimulated", "donor"
LEVELS = (0.5, 0.8, 0.9, 0.95)
PSEUDOCOUNT = 0.1  # tl.calibration's default
GOAL = (0.8, 0.7, 0.9)  # nominal level, lower and upper bound of the target coverage
#: Offsets of the conformal score tried, in multiples of the median sampled sd (1000: about one width per gene).
OFFSET_SWEEP = (0.0, 1.0, 2.0, 4.0, 1000.0)


def split(held_out: list[str], n_hvg: int, donors: list[str]):
    """Training AnnData (on its HVGs), real held-out stimulated cells and the control cells of those types.

    Held out: the stimulated cells of the ``held_out`` types in ``donors`` (the other donors' stay in training)."""
    adata = datasets.kang2018_donors()
    in_types = adata.obs["cell_type"].astype(str).isin(held_out).to_numpy()
    in_donors = adata.obs[DONOR].astype(str).isin(donors).to_numpy()
    held = in_types & in_donors & mask(adata, "condition", PERT)
    train = adata[~held].copy()
    sc.pp.highly_variable_genes(train, n_top_genes=n_hvg)
    genes = train.var_names[train.var["highly_variable"].to_numpy()]
    train = train[:, genes].copy()
    control = in_types & in_donors & mask(adata, "condition", CONTROL)
    return train, adata[held, genes].copy(), adata[control, genes].copy()


def train_and_predict(seed: int, held_out: list[str], args) -> dict:
    """Train one model without ``held_out``'s stimulated cells and predict every held-out (cell type, donor).

    Runs in a worker process when ``--jobs`` > 1. Returns the split, the predictions as sampled and zeroed
    (values below ``realistic_zero_threshold(train.X)`` set to 0, as ``zero_threshold="auto"``) and timings."""
    torch.set_num_threads(args.threads)
    quiet_logs()
    t0 = time.time()
    train, real, control = split(held_out, args.n_hvg, args.donors)
    scvi.settings.seed = seed
    PerturbDiff.setup_anndata(train, control_value=CONTROL, batch_key=DONOR, **KEYS)
    model = PerturbDiff(train)
    model.train(max_steps=args.max_steps, enable_progress_bar=False)
    t_train = time.time() - t0
    sizes = real.obs.groupby(["cell_type", DONOR], observed=True).size()
    common = {"n_populations": args.n_populations, "seed": seed, "progress_bar": False}
    if sizes.nunique() == 1:  # one call for every (cell type, donor): fewer, fuller forward passes
        types, donors = (sorted({str(k[i]) for k in sizes.index}) for i in (0, 1))
        pred = model.predict_population(PERT, contexts=types, batches=donors, n_cells=int(sizes.iloc[0]), **common)
    else:
        rng = np.random.default_rng(seed)  # one seed per call: the same seed would reuse the same noise
        parts = [
            model.predict_population(
                PERT, contexts=ct, batches=str(donor), n_cells=int(n), **{**common, "seed": int(rng.integers(2**31))}
            )
            for (ct, donor), n in sizes.items()
        ]
        pred = ad.concat(parts, index_unique="-")
    zeroed = pred.copy()
    zeroed.X = zero_small_values(zeroed.X, realistic_zero_threshold(train.X))
    facts = {
        "held_out": held_out,
        "train_seconds": round(t_train, 1),
        "seconds": round(time.time() - t0, 1),
        "train_steps": int(model.trainer.global_step),
    }
    return {"real": real, "control": control, "preds": {"default": pred, "zeroed": zeroed}, "facts": facts}


def run_all(args) -> dict:
    """``{(seed, fold): train_and_predict(...)}`` for the target fold and, unless disabled, the calibration fold."""
    folds = {"target": args.held_out, **({"calibration": args.calibrate_on} if args.calibrate_on else {})}
    todo = [(seed, fold) for seed in args.seeds for fold in folds]
    if args.jobs <= 1:
        return {(seed, fold): train_and_predict(seed, folds[fold], args) for seed, fold in todo}
    context = multiprocessing.get_context("spawn")  # no fork after torch has started its threads
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {(seed, fold): pool.submit(train_and_predict, seed, folds[fold], args) for seed, fold in todo}
        return {key: future.result() for key, future in futures.items()}


def score_seed(seed: int, runs: dict) -> tuple[dict[str, tl.CalibrationResult], list[dict], list[dict]]:
    """Calibration of one seed's target predictions: sampled, zeroed and, with a calibration fold, conformal.

    Returns the results by variant, the learnt multipliers per conformal variant and the offset sweep's coverage.

    ``conformal``: the target fold checked against intervals learnt (``tl.conformal_intervals``) on the
    calibration fold's held-out cell types; ``conformal_reverse``: the other way round (calibration-fold types
    checked with intervals learnt on the target types), a second, independent test of the same method."""
    target = runs[(seed, "target")]

    def check(run, pred, **kwargs):
        return tl.calibration(
            pred, run["real"], run["control"], group_key=DONOR, levels=LEVELS, seed=seed, **KEYS, **kwargs
        )

    results = {name: check(target, pred) for name, pred in target["preds"].items()}
    learnt, sweep = {}, []
    if (seed, "calibration") in runs:
        other = runs[(seed, "calibration")]
        results["calibration_fold"] = check(other, other["preds"]["default"])
        # (variant, where q_L is learnt, the fold checked, that fold's sampled result)
        for variant, source, run, sampled in (
            ("conformal", results["calibration_fold"], target, results["default"]),
            ("conformal_reverse", results["default"], other, results["calibration_fold"]),
        ):
            ci = tl.conformal_intervals(source)
            results[variant] = check(run, run["preds"]["default"], conformal=ci)
            learnt[variant] = {"seed": seed, "variant": variant, "offset": ci.offset, "n_groups": ci.n_groups}
            learnt[variant].update({f"q_{round(lv * 100)}": ci.quantile(lv) for lv in LEVELS})
            # the sweep only moves the intervals: score them on the LFCs already computed for the checked fold
            median_sd = float(np.nanmedian(source.per_gene["lfc_sd"]))
            real, mean, sd = (sampled.per_gene[c].to_numpy() for c in ("real_lfc", "lfc_mean", "lfc_sd"))
            for factor in OFFSET_SWEEP:
                swept = tl.conformal_intervals(source, offset=factor * median_sd)
                row = {"seed": seed, "variant": variant, "offset_factor": factor}
                for lv in LEVELS:
                    lo, hi = swept.interval(mean, sd, lv)
                    row[f"coverage_{round(lv * 100)}"] = float(((real >= lo) & (real <= hi)).mean())
                sweep.append(row)
    return results, list(learnt.values()), sweep


def data_reference(real, control) -> pd.DataFrame:
    """Model-free scales of the real per-donor LFCs: cell-sampling noise (bootstrap) and donor-to-donor spread."""
    rng = np.random.default_rng(0)
    rows, lfcs = [], {}
    for (ct, donor), obs in real.obs.groupby(["cell_type", DONOR], observed=True):
        x = real[obs.index].X.toarray()
        c = control[mask(control, "cell_type", ct) & mask(control, DONOR, donor)].X.toarray()
        ref = np.expm1(c).mean(0)
        lfc = lambda cells, ref=ref: np.log2((np.expm1(cells).mean(0) + PSEUDOCOUNT) / (ref + PSEUDOCOUNT))
        lfcs[(ct, str(donor))] = lfc(x)
        boot = np.stack([lfc(x[rng.integers(0, len(x), len(x))]) for _ in range(200)])
        rows.append({"context": ct, "group": str(donor), "mean_abs_lfc": float(np.abs(lfcs[(ct, str(donor))]).mean()),
                     "bootstrap_sd": float(boot.std(0, ddof=1).mean())})  # fmt: skip
    table = pd.DataFrame(rows)
    for ct in table["context"].unique():
        values = [v for (c, _), v in lfcs.items() if c == ct]
        if len(values) == 2:  # sd of one donor around the two-donor mean
            table.loc[table["context"] == ct, "donor_sd"] = float(np.std(values[0] - values[1], ddof=1) / np.sqrt(2))
    return table


def inflation_needed(per_gene: pd.DataFrame, level: float = 0.8) -> float:
    """Factor on the sampled spread that would make ``|z|`` fall inside a normal ``level`` interval that often."""
    from scipy.stats import norm

    z = per_gene["z"].to_numpy()
    z = np.abs(z[np.isfinite(z)])
    return float(np.quantile(z, level) / norm.ppf((1 + level) / 2))


def recentred_coverage(per_gene: pd.DataFrame, level_tag: str = "80") -> float:
    """80 % coverage once each group's mean error is subtracted from its real values."""
    inside = []
    for _, part in per_gene.groupby(["context", "group"]):
        shift = (part["real_lfc"] - part["lfc_mean"]).mean()
        real = part["real_lfc"] - shift
        inside.append((real >= part[f"lfc_lower_{level_tag}"]) & (real <= part[f"lfc_upper_{level_tag}"]))
    return float(pd.concat(inside).mean())


def diagnostics(per_gene: pd.DataFrame) -> dict[str, float]:
    err = per_gene["real_lfc"] - per_gene["lfc_mean"]
    bias = per_gene.assign(err=err).groupby(["context", "group"])["err"].transform("mean")
    return {
        "bias_share": float((bias**2).mean() / (err**2).mean()),
        "inflation_80": inflation_needed(per_gene),
        "coverage_80_recentred": recentred_coverage(per_gene),
    }


def control_expression(per_gene: pd.DataFrame, control) -> np.ndarray:
    """Mean log1p expression of each row's gene in its donor's control cells of the type."""
    out = np.empty(len(per_gene))
    for (ct, donor), idx in per_gene.groupby(["context", "group"]).groups.items():
        c = control[mask(control, "cell_type", ct) & mask(control, DONOR, donor)]
        means = pd.Series(np.asarray(c.X.mean(0)).ravel(), index=c.var_names)
        out[per_gene.index.get_indexer(idx)] = means.loc[per_gene.loc[idx, "gene"]].to_numpy()
    return out


def pivot_coverage(coverage: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    pivot = coverage.pivot_table(index="nominal", columns="seed", values="empirical")
    pivot.columns = [f"seed {s}" for s in pivot.columns]
    pivot["mean"] = pivot.iloc[:, : len(seeds)].mean(axis=1)
    pivot["sd"] = pivot.iloc[:, : len(seeds)].std(axis=1, ddof=1) if len(seeds) > 1 else np.nan
    return pivot


def summary_md(coverage, groups, extra, strata, reference, args, facts) -> str:
    main = pivot_coverage(coverage[coverage["variant"] == "default"], args.seeds)
    zeroed = pivot_coverage(coverage[coverage["variant"] == "zeroed"], args.seeds)
    level, lo, hi = GOAL
    got = main.loc[level, "mean"]
    verdict = "MET" if lo <= got <= hi else "NOT MET"
    lines = [
        "# Calibration of sampled populations (Kang 2018 donors)",
        "",
        f"Command: `{args.command}`",
        "",
        f"Held out: stimulated {', '.join(args.held_out)} cells of donors {', '.join(args.donors)}; {args.n_hvg} HVGs; "
        f"{args.max_steps} training steps; K = {args.n_populations} populations per (cell type, donor), each "
        "conditioned on that donor's own control cells; log2 fold change "
        "`log2((mean expm1 x + 0.1) / (mean expm1 c + 0.1))` against the donor's own control cells; "
        f"{int(coverage['n'].iloc[0])} (cell type, donor, gene) pairs per seed.",
        "",
        "## Coverage (empirical share of real per-donor LFCs inside the predicted central interval)",
        "",
        "Package defaults (`predict_population` as is):",
        "",
        md(main),
        "",
        f"Goal: nominal {level:.0%} intervals cover {lo:.0%}-{hi:.0%}. Measured: {got:.1%} (mean over seeds): "
        f"**{verdict}**. The largest attainable coverage with K = {args.n_populations} is "
        f"{(args.n_populations - 1) / (args.n_populations + 1):.3f} (the interval [min, max]).",
        "",
        "Same predictions with the training data's zero pattern (values below `realistic_zero_threshold(train.X)` set",
        'to 0, as `zero_threshold="auto"`; a diagnostic, not the default):',
        "",
        md(zeroed),
        "",
        "## Diagnosis",
        "",
        "Per seed and held-out group (defaults): `bias` = mean(real - predicted mean LFC), `rmse` of the same,",
        "`mean_sd` = mean spread (sd) of the sampled LFCs, `z = (real - mean) / sd` (calibrated: `z_mean` about 0,",
        "`z_sd` about 1).",
        "",
        md(groups, index=False),
        "",
        md(extra, index=False),
        "",
        "`bias_share` = bias^2 / rmse^2 (share of the squared error that a constant per-group shift explains);",
        "`inflation_80` = the factor by which the sampled spread would have to grow for 80 % of |z| to fall",
        "inside a normal 80 % interval (1 = calibrated); `coverage_80_recentred` = 80 % coverage after removing",
        "each group's constant bias (what a correct mean level with the same spreads would reach).",
        "",
        "80 % coverage and error by expression of the gene in the donor's control cells (tertiles of mean log1p;",
        "all seeds pooled):",
        "",
        md(strata, index=False),
        "",
        "Model-free scales of the real per-donor LFCs: `bootstrap_sd` = mean over genes of the sd of the LFC when",
        "the donor's 100 stimulated cells are resampled (cell-sampling noise); `donor_sd` = sd over genes of the",
        "difference of the two donors' LFCs / sqrt(2) (donor-to-donor spread plus that noise):",
        "",
        md(reference, index=False),
        "",
        f"Run time: {facts['total_seconds']:.0f} s in total.",
    ]
    return "\n".join(lines) + "\n"


def conformal_md(coverage, groups, learnt, sweep, args) -> str:
    """The section on ``tl.conformal_intervals``: coverage of the target types with intervals learnt elsewhere."""
    level, lo, hi = GOAL
    main = pivot_coverage(coverage[coverage["variant"] == "conformal"], args.seeds)
    reverse = pivot_coverage(coverage[coverage["variant"] == "conformal_reverse"], args.seeds)
    fold = pivot_coverage(coverage[coverage["variant"] == "calibration_fold"], args.seeds)
    got = main.loc[level, "mean"]
    verdict = "MET" if lo <= got <= hi else "NOT MET"
    targets, others = ", ".join(args.held_out), ", ".join(args.calibrate_on)
    lines = [
        "",
        "## Conformal intervals (`tl.conformal_intervals`)",
        "",
        f"A second model per seed is trained without the stimulated {others} cells (donors {', '.join(args.donors)})",
        "and predicts them the same way; `tl.conformal_intervals(tl.calibration(...))` on those held-out types learns",
        'how far the real LFCs fall from the sampled mean, in units of the sampled sd plus an offset (`offset="auto"`:',
        "4x the median sampled sd).",
        f"The target types ({targets}) are then checked with intervals `mean -/+ q_L (sd + offset)`",
        "(`tl.calibration(..., conformal=ci)`); no target cell is used to learn them.",
        "",
        md(main),
        "",
        f"Goal: nominal {level:.0%} intervals cover {lo:.0%}-{hi:.0%}. Measured with conformal intervals: {got:.1%} "
        f"(mean over seeds): **{verdict}**.",
        "",
        "Per target group (and, `conformal_reverse`, the calibration types checked with intervals learnt on the",
        "target types, a second test of the same method):",
        "",
        md(groups, index=False),
        "",
        "`conformal_reverse` coverage (calibration types, intervals learnt on the target types):",
        "",
        md(reverse),
        "",
        "The calibration types' own sampled intervals (no conformal step), for comparison:",
        "",
        md(fold),
        "",
        "Learnt multipliers `q_L` and offsets (log2 units):",
        "",
        md(learnt, index=False),
        "",
        'Offset of the score, in multiples of the median sampled sd of the calibration pairs (default `"auto"` =',
        "4; 0 = `|z|`; 1000 = about one width for every gene): 80 % coverage, mean over seeds:",
        "",
        md(sweep.pivot_table(index="offset_factor", columns="variant", values="coverage_80")),
    ]
    return "\n".join(lines) + "\n"


def strata_table(per_gene: pd.DataFrame) -> pd.DataFrame:
    part = per_gene[per_gene["variant"] == "default"].copy()
    part["control_tertile"] = pd.qcut(part["control_expr"], 3, labels=["low", "mid", "high"])
    err = part["real_lfc"] - part["lfc_mean"]
    return (
        part.assign(err=err, err2=err**2)
        .groupby("control_tertile", observed=True)
        .agg(
            n=("gene", "size"),
            coverage_80=("inside_80", "mean"),
            bias=("err", "mean"),
            rmse=("err2", lambda v: float(np.sqrt(v.mean()))),
            mean_sd=("lfc_sd", "mean"),
            mean_real_lfc=("real_lfc", "mean"),
            mean_pred_lfc=("lfc_mean", "mean"),
        )
        .reset_index()
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--n-populations", type=int, default=20)
    parser.add_argument("--n-hvg", type=int, default=500)
    parser.add_argument("--held-out", default="CD4 T cells,CD14+ Monocytes")
    parser.add_argument(
        "--calibrate-on",
        default="B cells,CD8 T cells,FCGR3A+ Monocytes",
        help="cell types held out of a second model per seed, on which tl.conformal_intervals learns the model's "
        "error ('' = no conformal intervals)",
    )
    parser.add_argument(
        "--donors",
        default="101,107",
        help="donors whose stimulated cells of the held-out types are held out (the others' stay in training)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once, each on --threads threads")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.held_out = [s.strip() for s in args.held_out.split(",")]
    args.calibrate_on = [s.strip() for s in args.calibrate_on.split(",") if s.strip()]
    args.donors = [s.strip() for s in args.donors.split(",")]
    if set(args.held_out) & set(args.calibrate_on):
        parser.error("--held-out and --calibrate-on must not share a cell type: calibrate on other contexts")
    args.command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/calibration.py", *(argv or sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = run_all(args)
    real, control = runs[(args.seeds[0], "target")]["real"], runs[(args.seeds[0], "target")]["control"]
    tables: dict[str, list] = {"coverage": [], "groups": [], "rank_histogram": [], "per_gene": []}
    extra, conformal_rows, sweep_rows, facts = [], [], [], {"seeds": {}}
    for seed in args.seeds:
        results, learnt, sweep = score_seed(seed, runs)
        conformal_rows += learnt
        sweep_rows += sweep
        facts["seeds"][seed] = {fold: run["facts"] for (s, fold), run in runs.items() if s == seed}
        logger.info("seed %d: %s\n%s", seed, facts["seeds"][seed], results["default"].coverage.to_string())
        for variant, result in results.items():
            tag = {"seed": seed, "variant": variant}
            fold = "calibration" if variant in ("conformal_reverse", "calibration_fold") else "target"
            for name in tables:
                tables[name].append(getattr(result, name).assign(**tag))
            tables["per_gene"][-1]["control_expr"] = control_expression(result.per_gene, runs[(seed, fold)]["control"])
            if variant in ("default", "zeroed"):
                extra.append({**tag, **diagnostics(result.per_gene)})
    facts["total_seconds"] = round(time.time() - t0, 1)
    coverage, groups, hists, per_gene = (pd.concat(tables[n], ignore_index=True) for n in tables)
    cols = ["variant", "seed", "level", "nominal", "empirical", "n", "se", "max_attainable", "intervals"]
    coverage[cols].to_csv(args.out / "coverage.csv", index=False)
    groups.to_csv(args.out / "groups.csv", index=False)
    hists.to_csv(args.out / "rank_histogram.csv", index=False)
    per_gene.to_csv(args.out / "per_gene.csv.gz", index=False, float_format="%.4g")
    group_cols = ["seed", "context", "group", "coverage_80", "bias", "rmse", "mean_sd", "z_mean", "z_sd"]
    default_groups = groups.loc[groups["variant"] == "default", group_cols]
    conformal_groups = groups.loc[groups["variant"].isin(["conformal", "conformal_reverse"]), ["variant", *group_cols]]
    target_rows = per_gene["variant"].isin(["default", "zeroed"])
    text = summary_md(
        coverage, default_groups, pd.DataFrame(extra), strata_table(per_gene[target_rows]),
        data_reference(real, control), args, facts,
    )  # fmt: skip
    if conformal_rows:
        pd.DataFrame(conformal_rows).to_csv(args.out / "conformal.csv", index=False)
        pd.DataFrame(sweep_rows).to_csv(args.out / "offset_sweep.csv", index=False)
        text += conformal_md(coverage, conformal_groups, pd.DataFrame(conformal_rows), pd.DataFrame(sweep_rows), args)
    (args.out / "summary.md").write_text(text)
    pooled = hists[hists["variant"] == "default"].groupby("rank")["count"].sum()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(pooled.index, pooled / pooled.sum(), color="tab:blue")
    ax.axhline(1 / (args.n_populations + 1), color="0.3", ls="--", lw=0.8, label="calibrated")
    ax.set_xlabel(f"rank of the real LFC among K = {args.n_populations} sampled")
    ax.set_ylabel("frequency")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(args.out / "rank_histogram.png", dpi=120)
    run = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "facts": facts,
        "versions": {p: version(p) for p in ("perturbdiff-scvi", "scvi-tools", "torch", "anndata", "scanpy")},
        "python": platform.python_version(),
    }
    (args.out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
