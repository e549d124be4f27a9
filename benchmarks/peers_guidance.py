"""Guidance per held-out cell type: the trained PerturbDiff models of ``benchmarks/peers.py``, sampled again.

On the seven Kang folds ``guidance_scale=0`` beats the default 0.5 on E-distance for the lymphocytes and loses badly
on the monocytes (``results/peers``). This script asks why without training anything: it loads each trained model
that ``peers.py`` left in its job folder (``jobs/kang/<fold>/perturbdiff_s<seed>/model``, written by the runner),
predicts the held-out condition at several guidance scales from the same seed, and scores every prediction with
``tl.evaluate`` as ``peers.py`` does (30 PCs of the fold's training cells). Beside the metrics it writes the
*shift ratio*, ``|mean(pred) - mean(ctrl)| / |mean(real) - mean(ctrl)|`` over the genes (1 = the right size of
response; below 1, a shrunken one), and the cosine between the predicted and the real mean shift.

Run (after ``peers.py`` has trained PerturbDiff on the folds; a few minutes on 2 cores)::

    python benchmarks/peers_guidance.py --jobs benchmarks/results/peers/jobs --scales 0,0.25,0.5,1,auto

(``auto``: ``predict_population(guidance_scale="auto")``, the scale chosen per condition to match the response size
of the perturbation in the training contexts nearest to this one.) ``--shift-pcs 0,50`` samples each scale also
with ``OutputOptions(shift_pcs=50)`` (the mean shift kept on 50 principal axes of the training cells), and
``--pcs-anchors controls,training`` each such variant also with ``pcs_anchor="training"``.

Writes ``benchmarks/results/peers_guidance/{results.csv,summary.md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
from peers_ablations import METRICS  # the metrics (and their headers) of the ablation table

HERE = Path(__file__).resolve().parent


def dense_x(a: ad.AnnData) -> np.ndarray:
    return np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)


def sweep(
    fold: peers.Fold,
    base: Path,
    scales: list[float | str],
    shift_pcs: list[int] = (0,),
    anchors: list[str] = ("controls",),
) -> list[dict]:
    """Rows (fold, seed, scale, metric, value) for every trained PerturbDiff model of ``fold`` (all its
    conditions; the shift ratio and cosine per condition, then averaged); each scale also with
    ``OutputOptions(shift_pcs=k, pcs_anchor=a)`` for every ``k > 0`` of ``shift_pcs`` and ``a`` of ``anchors``."""
    from perturbdiff_scvi import PerturbDiff, tl
    from perturbdiff_scvi.model import OutputOptions

    rows = []
    label = fold.name if fold.task == "kang" else f"{fold.task}/{fold.name}"
    pert_key = fold.keys["perturbation_key"]
    for model_dir in sorted(base.glob("perturbdiff_s*/model")):
        seed = int(model_dir.parent.name.split("_s")[-1])
        train = ad.read_h5ad(base / "train.h5ad")
        model = PerturbDiff.load(str(model_dir), adata=train)
        real = fold.real[:, train.var_names].copy()
        control = fold.control[:, train.var_names]
        preds, shifts = {}, {}
        variants = [(s, k, a) for s in scales for k in shift_pcs for a in (anchors if k else ["controls"])]
        for scale, k, anchor in variants:
            name = f"guidance {scale:g}" if scale != "auto" else "guidance auto"
            name += f", shift on {k} PCs" if k else ""
            name += ", from the training mean" if k and anchor == "training" else ""
            parts = []
            for cond in fold.conditions:
                where = {"n_cells": int(cond["n_cells"]), "seed": seed, "guidance_scale": scale}
                where["output_options"] = OutputOptions(shift_pcs=k, pcs_anchor=anchor) if k else None
                if cond.get("context") is not None:
                    where["contexts"] = str(cond["context"])
                if fold.batch_key and cond.get("batch") is not None:
                    where["batches"] = str(cond["batch"])
                p = model.predict_population(str(cond["perturbation"]), **where)
                for key in [k for k in fold.keys.values() if k]:
                    p.obs[key] = p.obs[key].astype(str)
                parts.append(p)
                truth = real[(real.obs[pert_key].astype(str) == str(cond["perturbation"])).to_numpy()]
                true_shift = dense_x(truth).mean(0) - dense_x(control).mean(0)
                shift = dense_x(p[:, train.var_names]).mean(0) - dense_x(control).mean(0)
                ratio = np.linalg.norm(shift) / np.linalg.norm(true_shift)
                cos = float(shift @ true_shift / (np.linalg.norm(shift) * np.linalg.norm(true_shift)))
                shifts.setdefault(name, []).append((ratio, cos))
            preds[name] = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
        table = tl.evaluate(
            preds, real, control, pca_reference=train, baseline=None, n_pcs=peers.N_PCS, seed=seed, **fold.keys
        )
        table = table[table["metric"].isin(METRICS)]
        for (method, metric), value in table.groupby(["method", "metric"])["value"].mean().items():
            rows.append({"fold": label, "seed": seed, "method": method, "metric": metric, "value": float(value)})
        for name, pairs in shifts.items():
            ratio, cos = np.mean(pairs, axis=0)
            for metric, value in (("shift_ratio", ratio), ("shift_cosine", cos)):
                rows.append({"fold": label, "seed": seed, "method": name, "metric": metric, "value": float(value)})
        print(f"{label} seed {seed}: done", flush=True)
    return rows


def summary(frame: pd.DataFrame, source: str = "results/peers") -> str:
    shown = {**METRICS, "shift_ratio": "shift ratio", "shift_cosine": "shift cosine"}
    per = frame.groupby(["fold", "method", "metric"])["value"].mean().unstack("metric")[list(shown)]
    per = per.rename(columns=shown).round(3).reset_index()
    n_seeds = frame.groupby("fold")["seed"].nunique()
    mean = frame.groupby(["method", "metric", "seed"])["value"].mean().groupby(["method", "metric"]).mean()
    mean = mean.unstack("metric")[list(shown)].rename(columns=shown).round(3).reset_index()
    tasks = sorted({f.split("/")[0] if "/" in f else "kang" for f in frame["fold"]})
    lines = [
        f"# Guidance per held-out condition ({', '.join(tasks)}; trained PerturbDiff models of `{source}`)",
        "",
        "Each trained model sampled again at each guidance scale (same seed); `tl.evaluate` as in "
        "`results/peers/summary.md`. Shift ratio: |mean(pred) - mean(ctrl)| / |mean(real) - mean(ctrl)| over the "
        "genes; shift cosine: between the predicted and the real mean shift. Seeds per fold: "
        + ", ".join(f"{f} {n}" for f, n in n_seeds.items())
        + ".",
        "",
        "## Mean over folds and seeds",
        "",
        peers.md(mean),
        "",
        "## Per fold (seed mean)",
        "",
        peers.md(per),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default=str(HERE / "results" / "peers" / "jobs"))
    parser.add_argument("--scales", default="0,0.25,0.5,1")
    parser.add_argument("--out", default=str(HERE / "results" / "peers_guidance"))
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--tasks", default="kang", help="peers.py tasks whose folds to sweep (default kang)")
    parser.add_argument(
        "--shift-pcs", default="0", help="comma-separated OutputOptions(shift_pcs=k) to sample each scale with "
        "(0: none, the default), e.g. 0,50",
    )  # fmt: skip
    parser.add_argument(
        "--pcs-anchors", default="controls", help="comma-separated OutputOptions(pcs_anchor=...) for each "
        "--shift-pcs k > 0: controls (the default), training",
    )  # fmt: skip
    args = parser.parse_args(argv)
    scales = [s if s == "auto" else float(s) for s in args.scales.split(",")]
    shift_pcs = [int(k) for k in args.shift_pcs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    all_folds = [f for task in args.tasks.split(",") for f in peers.folds(task, None, args.n_top_genes)]
    for fold in all_folds:
        base = Path(args.jobs) / fold.folder
        if not list(base.glob("perturbdiff_s*/model")):
            print(f"{fold.name}: no trained PerturbDiff model under {base}; run peers.py first", flush=True)
            continue
        rows += sweep(fold, base, scales, shift_pcs, args.pcs_anchors.split(","))
    if not rows:
        raise SystemExit(f"no trained PerturbDiff models under {args.jobs}")
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    jobs = Path(args.jobs).resolve()
    text = summary(frame, str(jobs.parent.relative_to(HERE) if jobs.is_relative_to(HERE) else jobs.parent))
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
