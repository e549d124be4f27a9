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

Each row is scored by ``metrics.c2st_auroc`` (random forest, 100 trees, 5 folds, balanced sets) on subsets of
the 30 principal axes of the training cells (1-2, 1-5, 1-10, 11-30, 21-30, 1-30), and by the largest
single-axis AUROC (``max(AUROC, 1 - AUROC)`` of the raw coordinate).

Outputs (``--out``): ``classifier.csv``, ``classifier.md``, ``run.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import PERT, md
from diagnose_realism import HELD_OUT_TYPE
from diagnose_texture import dense, parse_case_args, repairs, trained_cases

from perturbdiff_scvi.metrics import PCAProjection, c2st_auroc, fit_pca
from perturbdiff_scvi.model import OutputOptions
from perturbdiff_scvi.model._counts import sample_counts

SUBSETS = {"1-2": (0, 2), "1-5": (0, 5), "1-10": (0, 10), "11-30": (10, 30), "21-30": (20, 30), "1-30": (0, 30)}


def c2st(pred: np.ndarray, real: np.ndarray, pca: PCAProjection, axes: tuple[int, int], seed: int) -> float:
    """``metrics.c2st_auroc`` of two cell sets on the principal axes ``axes[0] .. axes[1] - 1`` of ``pca``."""
    lo, hi = axes
    sub = PCAProjection(pca.mean_, pca.components_[lo:hi], pca.explained_variance_[lo:hi])
    return c2st_auroc(pred, real, pca=sub, n_pcs=hi - lo, seed=seed)


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
    real_x = dense(real)
    r = pca(real_x)
    records = []
    for name, x in rows.items():
        z = pca(x)
        rec = {"row": name}
        for label, axes in SUBSETS.items():
            rec[f"C2ST PCs {label}"] = c2st(x, real_x, pca, axes, seed)
        y = np.r_[np.ones(len(z)), np.zeros(len(r))]
        single = [roc_auc_score(y, np.r_[z[:, k], r[:, k]]) for k in range(z.shape[1])]
        best = int(np.argmax([max(s, 1 - s) for s in single]))
        rec["best single PC"] = best + 1
        rec["its AUROC"] = max(single[best], 1 - single[best])
        records.append(rec)
    return pd.DataFrame(records)


def main(argv=None) -> None:
    args, seeds = parse_case_args(__doc__.split("\n")[0], argv)
    start, tables = time.time(), []
    for seed, case, train, real, control, model in trained_cases(args, seeds):
        pca = fit_pca(dense(train), n_comps=30, seed=seed)
        rows: dict[str, np.ndarray] = {}
        kwargs = {"contexts": HELD_OUT_TYPE, "n_cells": real.n_obs, "seed": seed}
        for g in (0.5, 0.0):
            pred = model.predict_population(PERT, guidance_scale=g, **kwargs)
            rows[f"pred (guidance {g})"] = dense(pred)
            rows[f"transport (guidance {g})"] = dense(
                model.predict_population(
                    PERT, guidance_scale=g, **kwargs, output_options=OutputOptions(transport="quantile")
                )
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
