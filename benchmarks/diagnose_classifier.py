"""What the classifier two-sample test sees: which principal axes separate predicted from real cells, and count noise.

For each case and seed, one default model (``diagnose_realism.py``'s cases: stimulated CD4T held out of Kang 2018,
2,000 HVGs, or of its dense 300-gene panel) is trained. The rows scored against the real held-out cells are:

- ``pred (guidance g)`` and ``transport (guidance g)``: ``predict_population`` with one step, guidance 0.5 and 0,
  without and with ``transport="quantile"``;
- the two oracle repairs of ``diagnose_texture.py`` that use the real cells' per-gene distributions:
  ``pred, real marginals`` and ``control, real marginals`` (guidance 0.5);
- ``real half A, counts resampled`` (oracle): the counts of every cell of a random half A of the real cells drawn
  again, ``Multinomial(L_i, expm1(x_i) / sum expm1(x_i))`` with its own library size ``L_i`` over the model's
  genes (``sample_counts`` of ``counts=True``), and re-normalised: real cells with a second layer of count noise;
- ``real half A mean, counts`` (oracle): every cell of half A given the mean expression of half A, then counts
  drawn with the library sizes of half A: count noise and library size are the only variation.

These two rows, like the ceiling (half A as it is), are scored against the other half B, so that no scored cell
has a noisy twin among the cells it is compared with (a classifier trained on one twin predicts the other's label
wrongly, which pushes the out-of-fold AUROC below 0.5).

Each row is scored by the random-forest C2ST of ``metrics.c2st_auroc`` (100 trees, 5 folds, balanced sets) on
subsets of the 30 principal axes of the training cells (1-2, 1-5, 1-10, 11-30, 21-30, 1-30), and by the largest
single-axis AUROC (``max(AUROC, 1 - AUROC)`` of the raw coordinate).

Outputs (``--out``): ``classifier.csv``, ``classifier.md``, ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import PERT, md, quiet_logs
from diagnose_realism import HELD_OUT_TYPE, case_data, train_model
from diagnose_texture import dense, repairs

from perturbdiff_scvi.metrics import fit_pca
from perturbdiff_scvi.model._counts import sample_counts

SUBSETS = {"1-2": (0, 2), "1-5": (0, 5), "1-10": (0, 10), "11-30": (10, 30), "21-30": (20, 30), "1-30": (0, 30)}


def c2st(pred: np.ndarray, real: np.ndarray, seed: int) -> float:
    """Random-forest C2ST AUROC of two coordinate sets, as ``metrics.c2st_auroc`` computes it."""
    rng = np.random.default_rng(seed)
    n = min(len(pred), len(real), 2000)
    a, b = pred[rng.choice(len(pred), n, replace=False)], real[rng.choice(len(real), n, replace=False)]
    y = np.r_[np.ones(n), np.zeros(n)]
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(forest, np.vstack([a, b]), y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def count_rows(half, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The two count-noise oracles of one half of the real cells (see the module doc)."""
    x = dense(half)
    library = np.asarray(half.layers["counts"].sum(1)).ravel()
    mean = np.log1p(np.expm1(x).mean(0))
    return {
        "real half A, counts resampled": sample_counts(x, library, rng)[1],
        "real half A mean, counts": sample_counts(np.tile(mean, (len(x), 1)), rng.permutation(library), rng)[1],
    }


def score(rows: dict[str, np.ndarray], real, pca, seed: int) -> pd.DataFrame:
    r = pca(dense(real))
    records = []
    for name, x in rows.items():
        z = pca(x)
        rec = {"row": name}
        for label, (lo, hi) in SUBSETS.items():
            rec[f"C2ST PCs {label}"] = c2st(z[:, lo:hi], r[:, lo:hi], seed)
        y = np.r_[np.ones(len(z)), np.zeros(len(r))]
        single = [roc_auc_score(y, np.r_[z[:, k], r[:, k]]) for k in range(z.shape[1])]
        best = int(np.argmax([max(s, 1 - s) for s in single]))
        rec["best single PC"] = best + 1
        rec["its AUROC"] = max(single[best], 1 - single[best])
        records.append(rec)
    return pd.DataFrame(records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", default="kang_heldout,dense_heldout")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, tables = time.time(), []
    for seed in seeds:
        for case in args.cases.split(","):
            train, real, control = case_data(case)
            model = train_model(train.copy(), "default", args.max_steps, seed)
            pca = fit_pca(dense(train), n_comps=30, seed=seed)
            rows: dict[str, np.ndarray] = {}
            kwargs = {"contexts": HELD_OUT_TYPE, "n_cells": real.n_obs, "seed": seed}
            for g in (0.5, 0.0):
                pred = model.predict_population(PERT, guidance_scale=g, **kwargs)
                rows[f"pred (guidance {g})"] = dense(pred)
                rows[f"transport (guidance {g})"] = dense(
                    model.predict_population(PERT, guidance_scale=g, transport="quantile", **kwargs)
                )
                if g == 0.5:
                    oracle = repairs(pred, real, control, np.random.default_rng(seed))
                    for name in ("pred, real marginals", "control, real marginals"):
                        rows[name] = dense(oracle[name])
            rng = np.random.default_rng(seed)
            order = rng.permutation(real.n_obs)
            half_a = real[np.sort(order[: real.n_obs // 2])]
            half_b = real[np.sort(order[real.n_obs // 2 :])]
            halves = {"ceiling (real half A vs half B)": dense(half_a), **count_rows(half_a, rng)}
            table = score(rows, real, pca, seed)
            against_b = score(halves, half_b, pca, seed)
            tables.append(pd.concat([against_b.iloc[:1], table, against_b.iloc[1:]]).assign(case=case, seed=seed))
            print(f"[{case}, seed {seed}] done at {time.time() - start:.0f} s", flush=True)
    results = pd.concat(tables, ignore_index=True)
    results.to_csv(args.out / "classifier.csv", index=False)
    lines = [
        f"# What the classifier sees\n\nCommand: `{' '.join(sys.argv)}`; seeds {seeds}, {args.max_steps} steps, "
        f"{time.time() - start:.0f} s. Values: mean over seeds (best single PC: of the first seed).\n"
    ]
    for case, sub in results.groupby("case", sort=False):
        numeric = sub.drop(columns=["case", "seed", "best single PC"]).groupby("row", sort=False).mean()
        first = sub.groupby("row", sort=False)["best single PC"].first()
        numeric.insert(len(numeric.columns) - 1, "best single PC", first)
        lines += [f"## {case}", "", md(numeric), ""]
    (args.out / "classifier.md").write_text("\n".join(lines) + "\n")
    (args.out / "run.json").write_text(json.dumps({**vars(args), "seeds": seeds}, default=str, indent=2))
    print(f"done in {time.time() - start:.0f} s; {args.out / 'classifier.md'}")


if __name__ == "__main__":
    main()
